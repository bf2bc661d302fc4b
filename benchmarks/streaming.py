"""Streaming-merge benchmark: supermerge against the I/O bound, with peak anonymous RSS.

Generates a base and 3 fine-tuned checkpoints shaped like a decoder LLM (embeddings,
attention and MLP matrices per layer, an untied head) of about ``--params`` parameters,
then measures in one run:

- the I/O bound: reading every input file once from disk (evicted from the page cache) and
  writing one output of the base's size with plain buffered file I/O (no fsync, as the
  merge; the fastest of 3 runs);
- ``supermerge merge`` (a subprocess each, so RSS is its own, inputs evicted from the
  page cache first) for task_arithmetic, ties, dare_ties, breadcrumbs, della and slerp, as
  a ratio to the I/O bound, with its CPU seconds (user + system, and system alone, from
  the child's rusage), its minor page faults, the load average before it, and its peak
  anonymous RSS against the
  engine's bound of (K + 2) x the largest tensor + 0.5 GB; ties once more with a torch
  thread per core (``--compute-threads``), which leaves the methods one thread of their own.

``--baseline SRC`` runs every merge a second time, right after the first, with ``SRC`` (a
``src`` folder of another supermerge, e.g. ``git archive`` of an older commit) first on
``PYTHONPATH``: before/after ratios and CPU seconds under the same load, in the same run.
On a shared machine, wall times vary with the other load; CPU seconds vary much less.

Usage: python benchmarks/streaming.py [--params 5e8] [--dtype bfloat16] [--work DIR]
           [--methods ties,della] [--baseline OLD/src]
Prints a markdown table. Files go to a temporary folder (removed at the end) unless --work.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

METHODS = {
    "task_arithmetic": {"lambda": 0.5},
    "ties": {"density": 0.2},
    "dare_ties": {"density": 0.5},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01},
    "della": {"density": 0.5, "epsilon": 0.1},
    "slerp": {"t": 0.5},
}
GOALS = {"task_arithmetic": 1.5, "ties": 1.5, "dare_ties": 1.5, "breadcrumbs": 1.5,
         "della": 1.5}  # issue 13: the ranking methods at disk speed


def llm_shapes(target_params: float) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a Llama-like model with about ``target_params`` parameters."""
    hidden, inter, vocab = 1024, 2816, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((target_params - 2 * vocab * hidden) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def generate(root: Path, shapes, dtype: torch.dtype, k: int = 3) -> list[Path]:
    """Write base + k experts (one shard per ~1 GB); returns their directories."""
    dirs = []
    for m in range(k + 1):
        gen = torch.Generator().manual_seed(m)
        directory = root / ("base" if m == 0 else f"expert{m}")
        directory.mkdir(parents=True)
        shard, size, index = {}, 0, 0
        for name, shape in shapes.items():
            base_gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            tensor = torch.randn(shape, generator=base_gen) * 0.02
            if m:
                tensor += 0.001 * torch.randn(shape, generator=gen)
            shard[name] = tensor.to(dtype)
            size += shard[name].nbytes
            if size > 2**30:
                save_file(shard, str(directory / f"part{index}.safetensors"))
                shard, size, index = {}, 0, index + 1
        if shard:
            save_file(shard, str(directory / f"part{index}.safetensors"))
        dirs.append(directory)
    return dirs


def write_indexes(dirs: list[Path]) -> list[Path]:
    """Make each folder a Hugging Face model directory: an index over its shards and a config."""
    for directory in dirs:
        weight_map = {}
        for part in sorted(directory.glob("part*.safetensors")):
            with safe_open(str(part), "pt") as f:
                weight_map.update({name: part.name for name in f.keys()})  # noqa: SIM118
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
        (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return dirs


def evict(dirs: list[Path]) -> None:
    """Drop the checkpoints' files from the page cache (posix_fadvise DONTNEED), so the next
    run reads them from disk, as a merge of checkpoints larger than memory does."""
    for directory in dirs:
        for part in directory.glob("part*.safetensors"):
            fd = os.open(part, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def io_bound(dirs: list[Path], out: Path, repeats: int = 3, synced: bool = False) -> float:
    """Seconds to read every input byte from disk and write one base-sized output with plain
    file I/O, the fastest of ``repeats`` runs.

    The same I/O a merge does: inputs evicted from the page cache first, and, like
    ``supermerge merge``, no fsync (the page cache takes the output); ``synced`` adds an
    fsync of the output, which the merge does not pay (this benchmark's bound before
    2026-11-29). Single runs vary by up to 2x on a shared machine, hence the minimum.
    """
    chunk = 64 * 2**20
    times = []
    for _ in range(repeats):
        evict(dirs)
        started = time.perf_counter()
        for directory in dirs:
            for part in sorted(directory.glob("part*.safetensors")):
                with open(part, "rb") as f:
                    while f.read(chunk):
                        pass
        out.mkdir()
        for part in sorted(dirs[0].glob("part*.safetensors")):
            with open(part, "rb") as src, open(out / part.name, "wb") as dst:
                while block := src.read(chunk):
                    dst.write(block)
                if synced:
                    dst.flush()
                    os.fsync(dst.fileno())
        times.append(time.perf_counter() - started)
        shutil.rmtree(out)
    return min(times)


def peak_anon_rss(pid: int, stop: threading.Event, box: list[int]) -> None:
    """Poll /proc/PID/status for RssAnon every 20 ms; the maximum lands in box[0]."""
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    box[0] = max(box[0], int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.02)


@dataclass
class Run:
    """One merge: wall seconds, CPU seconds (user, system), minor page faults, peak
    anonymous RSS, the 1-minute load average before it."""

    seconds: float
    user: float
    system: float
    faults: int
    rss: int
    load: float


def run_merge(root: Path, dirs: list[Path], method: str, dtype: str,
              extra: tuple[str, ...] = (), src: Path | None = None) -> Run:
    """Run `supermerge merge` in a subprocess (with ``src`` first on PYTHONPATH if given)."""
    experts = dirs[1:3] if method == "slerp" else dirs[1:]
    recipe = {"merge_method": method, "base_model": str(dirs[0]),
              "models": [{"model": str(d)} for d in experts], "parameters": METHODS[method],
              "dtype": dtype}
    recipe_path = root / f"{method}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    out = root / f"out-{method}"
    command = [sys.executable, "-m", "supermerge.cli.main", "merge", str(recipe_path), "-o",
               str(out), "--threads", "2", "--shard-size", str(2**30), *extra]
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    evict(dirs)
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    stop, box = threading.Event(), [0]
    watcher = threading.Thread(target=peak_anon_rss, args=(proc.pid, stop, box))
    watcher.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    stop.set()
    watcher.join()
    if proc.returncode:
        raise RuntimeError(f"{method} failed:\n{err.decode()}")
    shutil.rmtree(out)
    return Run(seconds, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime,
               after.ru_minflt - before.ru_minflt, box[0], load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=1e8,
                        help="model size in parameters (default 1e8; the README uses 5e8)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a src folder of another supermerge to run after each merge")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    root = Path(tempfile.mkdtemp(prefix="sm-bench-", dir=args.work))
    cores = os.cpu_count() or 1
    try:
        shapes = llm_shapes(args.params)
        total = sum(torch.Size(s).numel() for s in shapes.values())
        largest = max(torch.Size(s).numel() for s in shapes.values()) * 4
        dirs = write_indexes(generate(root, shapes, dtype))
        bound = io_bound(dirs, root / "io-out")
        synced = io_bound(dirs, root / "io-out", synced=True)
        budget = (len(dirs) + 1) * largest + 2**29  # (K + 2) x largest (float32) + 0.5 GB
        print(f"{total / 1e6:.0f} M parameters, {args.dtype}, 3 experts, {cores} cores; "
              f"I/O bound {bound:.2f} s ({synced:.2f} s with the output fsync'd); "
              f"RSS bound {budget / 2**30:.2f} GiB\n")
        print("| method | code | seconds | x I/O bound | goal | CPU s (system) | minor faults | "
              "load | peak anon RSS GiB | within RSS bound |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        runs = [(method, method, ()) for method in methods]
        if "ties" in methods:
            runs.append(("ties", f"ties, {cores} torch threads",
                         ("--compute-threads", str(cores))))
        versions = [("this", None)] + ([("baseline", args.baseline)] if args.baseline else [])
        for method, label, extra in runs:
            for code, src in versions:
                r = run_merge(root, dirs, method, args.dtype, extra, src)
                goal = f"<= {GOALS[method]}" if label in GOALS else ""
                print(f"| {label} | {code} | {r.seconds:.2f} | {r.seconds / bound:.2f} | {goal} "
                      f"| {r.user + r.system:.1f} ({r.system:.1f}) | {r.faults / 1e3:.0f} k "
                      f"| {r.load:.1f} | "
                      f"{r.rss / 2**30:.2f} | {'yes' if r.rss <= budget else 'no'} |",
                      flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
