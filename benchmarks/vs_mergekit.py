"""supermerge against mergekit 0.1.5, side by side, on the same synthetic bf16 Llama checkpoints.

Builds a base and 3 experts (a ``transformers`` LlamaConfig of about ``--params`` parameters,
random seeded weights written with safetensors by ``streaming.generate``) in a temporary
folder, measures this disk's sequential read + write throughput in the same run
(``streaming.io_bound``), then, for every merge method both tools have, runs the mergekit CLI
(``mergekit-yaml``) and the supermerge CLI (``supermerge merge``), one after the other, each
in a subprocess on a warm page cache (inputs read once just before), and prints a markdown
table:

- CPU seconds (user + system, from the child's rusage) of each tool and their ratio;
- each tool's wall time divided by the disk bound: (bytes read + bytes written) over the
  measured throughput;
- the largest absolute difference of the two outputs in float32, where both compute the same
  thing (``n/a`` for the methods that drop entries at random: their masks differ).

The two configs carry the same numbers with every default that differs between the tools
(README, "Differences from mergekit") set explicitly: mergekit computes in float32 and writes
bfloat16 (``dtype: float32``, ``out_dtype: bfloat16``), as supermerge does; supermerge elects
signs on the weighted task vectors (``sign_on_weighted: true``); ``normalize`` and DARE's
``rescale: false`` (mergekit's rescale is an L1 norm, ours 1/keep) are written in both.

mergekit is never a dependency of supermerge: it lives in its own virtual environment
(``--mergekit-venv``, default ``~/.cache/supermerge/mergekit-venv``), created on first use
with ``torch==2.13.0`` installed first (a bare torch requirement pulls a CUDA build) and then
``mergekit==0.1.5`` (the ``[bench]`` extra names the same pin). If that fails, the reason is
printed and only supermerge's columns are filled.

Threads: mergekit runs with its defaults (torch's intra-op threads: one per core); supermerge
with its CLI defaults (2 reader threads, torch threads on the cores the readers leave).

Usage: python benchmarks/vs_mergekit.py [--params 1.34e8] [--methods ties,slerp]
           [--mergekit-venv DIR] [--no-mergekit] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming import evict, generate, io_bound, write_indexes  # noqa: E402

MERGEKIT = "mergekit==0.1.5"
TORCH = "torch==2.13.0"
WEIGHTS = (1.0, 0.7, 0.4)  # the experts' weights, distinct so sign_on_weighted matters
SRC = Path(__file__).resolve().parents[1] / "src"


@dataclass(frozen=True)
class Method:
    """One merge method as both tools run it.

    ``models``: which checkpoints it merges ("base+3", "base+2", "base+1" with the base first
    among the models, as slerp and nearswap take it, "3" or "1" without a base);
    ``params`` go to both tools, ``ours`` to supermerge only; ``weighted`` gives each expert
    its weight from WEIGHTS; ``random``: it drops entries at random (outputs not compared).
    """

    models: str
    params: dict
    ours: dict | None = None
    weighted: bool = True
    random: bool = False


SIGN = {"sign_on_weighted": True}
METHODS = {
    "linear": Method("3", {"normalize": True}),
    "task_arithmetic": Method("base+3", {"normalize": False}),
    "ties": Method("base+3", {"density": 0.2, "normalize": True}, SIGN),
    "dare_ties": Method("base+3", {"density": 0.5, "rescale": False, "normalize": False}, SIGN,
                        random=True),
    "dare_linear": Method("base+3", {"density": 0.5, "rescale": False, "normalize": False},
                          random=True),
    "breadcrumbs": Method("base+3", {"density": 0.9, "gamma": 0.01, "normalize": False}),
    "breadcrumbs_ties": Method("base+3", {"density": 0.9, "gamma": 0.01, "normalize": True},
                               SIGN),
    "della": Method("base+3", {"density": 0.5, "epsilon": 0.1, "lambda": 1.0, "rescale": False,
                               "normalize": False}, SIGN, random=True),
    "della_linear": Method("base+3", {"density": 0.5, "epsilon": 0.1, "lambda": 1.0,
                                      "rescale": False, "normalize": False}, random=True),
    "sce": Method("base+3", {"select_topk": 0.5}),
    "slerp": Method("base+1", {"t": 0.5}, weighted=False),
    "nuslerp": Method("base+2", {"nuslerp_flatten": True}),
    "multislerp": Method("base+3", {"normalize_weights": True}),
    "karcher": Method("3", {"max_iter": 10, "tol": 1e-5}, weighted=False),
    "model_stock": Method("base+3", {"filter_wise": False}, weighted=False),
    "nearswap": Method("base+1", {"t": 0.001}, weighted=False),
    "arcee_fusion": Method("base+1", {}, weighted=False),
    "ram": Method("base+3", {"epsilon": 1e-5}, weighted=False),
    "ramplus_tl": Method("base+3", {"epsilon": 1e-5, "r": 0.1, "alpha": 0.2}, weighted=False),
    "passthrough": Method("1", {}, weighted=False),
}


def llama_config(params: float, hidden: int = 1024, intermediate: int = 2816,
                 vocab: int = 32000) -> LlamaConfig:
    """A Llama config of about ``params`` parameters (untied head), its layer count chosen."""
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, vocab_size=vocab,
                       num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                       num_key_value_heads=max(1, hidden // 64), tie_word_embeddings=False,
                       architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")


def build_models(root: Path, config: LlamaConfig) -> list[Path]:
    """Write base + 3 bf16 experts shaped by ``config`` (HF folders); returns their paths.
    Costs 4 model sizes of disk and the time to draw their random numbers."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    dirs = write_indexes(generate(root, shapes, torch.bfloat16))
    for directory in dirs:
        config.to_json_file(directory / "config.json")
    return dirs


def inputs(dirs: list[Path], method: Method) -> tuple[Path | None, list[Path]]:
    """The base (or None) and the listed models of ``method``."""
    base, experts = dirs[0], dirs[1:]
    return {"base+3": (base, experts), "base+2": (base, experts[:2]),
            "base+1": (base, [base, experts[0]]), "3": (None, experts),
            "1": (None, experts[:1])}[method.models]


def configs(name: str, dirs: list[Path]) -> tuple[dict, dict]:
    """The (mergekit, supermerge) configs of method ``name`` on ``dirs`` (base first)."""
    method = METHODS[name]
    base, models = inputs(dirs, method)
    entries = []
    for i, model in enumerate(models):
        entry: dict = {"model": str(model)}
        if method.weighted:
            entry["parameters"] = {"weight": WEIGHTS[i]}
        entries.append(entry)
    common: dict = {"merge_method": name, "models": entries}
    if base is not None:
        common["base_model"] = str(base)
    if method.params:
        common["parameters"] = dict(method.params)
    ours = {**common, "dtype": "bfloat16"}
    if method.ours:
        ours["parameters"] = {**method.params, **method.ours}
    return {**common, "dtype": "float32", "out_dtype": "bfloat16"}, ours


def files(directory: Path) -> list[Path]:
    """The safetensors files of a model folder."""
    return sorted(directory.glob("*.safetensors"))


def read_bytes(dirs: list[Path], name: str) -> int:
    """Bytes of weights that method ``name`` reads (each listed checkpoint once)."""
    base, models = inputs(dirs, METHODS[name])
    unique = {*models, *([base] if base else [])}
    return sum(f.stat().st_size for d in unique for f in files(d))


def warm(dirs: list[Path]) -> None:
    """Read every checkpoint file once, so the merges that follow find them in page cache."""
    for directory in dirs:
        for part in files(directory):
            with open(part, "rb") as f:
                while f.read(64 * 2**20):
                    pass


@dataclass
class Timing:
    """One merge: wall seconds, CPU seconds (user + system of the child), load before it."""

    wall: float
    cpu: float
    load: float


def timed(command: list[str], env: dict | None = None) -> Timing:
    """Run ``command`` to completion; raises RuntimeError with its stderr's tail if it fails."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(proc.stderr.decode(errors="replace").strip()[-600:])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Timing(wall, cpu, load)


def run_supermerge(recipe: Path, out: Path) -> Timing:
    """``supermerge merge`` of this checkout (src first on PYTHONPATH), CLI defaults."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    return timed([sys.executable, "-m", "supermerge", "merge", str(recipe), "-o", str(out),
                  "-q"], env)


def run_mergekit(cli: Path, recipe: Path, out: Path) -> Timing:
    """``mergekit-yaml`` on CPU, no tokenizer copied."""
    return timed([str(cli), str(recipe), str(out), "--no-copy-tokenizer",
                  "--no-cuda"])


def mergekit_cli(venv: Path) -> tuple[Path | None, str]:
    """mergekit-yaml of ``venv``, creating the venv (torch first, then mergekit) if needed.

    Returns (path, "") or (None, why not). Costs a few minutes the first time.
    """
    cli, python = venv / "bin" / "mergekit-yaml", venv / "bin" / "python"
    check = [str(python), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"]
    if cli.exists() and subprocess.run(check, capture_output=True, text=True).stdout.strip() \
            == MERGEKIT.split("==")[1]:
        return cli, ""
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "-q", TORCH],
             [str(python), "-m", "pip", "install", "-q", MERGEKIT]]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True)
        if proc.returncode:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return None, f"`{' '.join(step[-3:])}` failed: {' / '.join(tail)}"
    return cli, ""


def max_abs_diff(a: Path, b: Path) -> float:
    """Largest |a - b| over every tensor of two model folders, in float32; raises ValueError
    if their tensor names differ. Reads both outputs once."""
    def open_all(directory: Path) -> dict:
        handles = {}
        for part in files(directory):
            f = safe_open(str(part), "pt")
            handles.update({name: f for name in f.keys()})  # noqa: SIM118
        return handles

    left, right = open_all(a), open_all(b)
    if left.keys() != right.keys():
        raise ValueError(f"tensor names differ: {sorted(left.keys() ^ right.keys())[:3]}")
    worst = 0.0
    for name, f in left.items():
        x = f.get_tensor(name).float()
        y = right[name].get_tensor(name).float()
        worst = max(worst, (x - y).abs().max().item() if x.numel() else 0.0)
    return worst


@dataclass
class Row:
    """One method's results; a side's Timing is None when it did not run (note says why)."""

    method: str
    bound: float
    ours: Timing | None = None
    theirs: Timing | None = None
    diff: str = ""
    note: str = ""


def compare(root: Path, dirs: list[Path], name: str, cli: Path | None,
            throughput: float) -> Row:
    """Merge with both tools (mergekit skipped when ``cli`` is None) and compare outputs."""
    theirs_cfg, ours_cfg = configs(name, dirs)
    written = sum(f.stat().st_size for f in files(dirs[0]))
    if METHODS[name].models == "1":  # passthrough writes the one model it reads
        written = sum(f.stat().st_size for f in files(inputs(dirs, METHODS[name])[1][0]))
    row = Row(name, (read_bytes(dirs, name) + written) / throughput)
    outs = {side: root / f"out-{side}-{name}" for side in ("mergekit", "supermerge")}
    for side, cfg in (("mergekit", theirs_cfg), ("supermerge", ours_cfg)):
        if side == "mergekit" and cli is None:
            continue
        recipe = root / f"{side}-{name}.yml"
        recipe.write_text(yaml.safe_dump(cfg))
        warm(dirs)
        try:
            if side == "mergekit":
                row.theirs = run_mergekit(cli, recipe, outs[side])
            else:
                row.ours = run_supermerge(recipe, outs[side])
        except RuntimeError as err:
            row.note += f"{side} failed: {' '.join(str(err).split())[-300:]} "
    if row.ours and row.theirs:
        try:
            row.diff = ("n/a (random masks)" if METHODS[name].random
                        else f"{max_abs_diff(outs['mergekit'], outs['supermerge']):.3g}")
        except ValueError as err:
            row.diff = str(err)
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    return row


def table(rows: list[Row]) -> str:
    """The markdown table of ``rows``."""
    def cpu(t: Timing | None) -> str:
        return f"{t.cpu:.1f}" if t else "-"

    def ratio(t: Timing | None, bound: float) -> str:
        return f"{t.wall / bound:.1f}" if t else "-"

    lines = ["| method | mergekit CPU s | supermerge CPU s | CPU ratio | "
             "wall / disk bound (mergekit / supermerge) | max abs diff (float32) | load | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = f"{r.theirs.cpu / r.ours.cpu:.1f}x" if r.ours and r.theirs else "-"
        loads = "/".join(f"{t.load:.1f}" for t in (r.theirs, r.ours) if t)
        lines.append(f"| {r.method} | {cpu(r.theirs)} | {cpu(r.ours)} | {share} | "
                     f"{ratio(r.theirs, r.bound)} / {ratio(r.ours, r.bound)} | {r.diff or '-'} "
                     f"| {loads or '-'} | {r.note.strip()} |")
    return "\n".join(lines)


def throughput_of(dirs: list[Path], root: Path) -> float:
    """Bytes per second of this disk for the sequential read of every input plus the write of
    one base-sized output (``streaming.io_bound``: inputs evicted first, fastest of 3)."""
    read = sum(f.stat().st_size for d in dirs for f in files(d))
    written = sum(f.stat().st_size for f in files(dirs[0]))
    seconds = io_bound(dirs, root / "io-out")
    evict(dirs)
    return (read + written) / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=1.34e8,
                        help="parameters per model (default 1.34e8)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--mergekit-venv", type=Path,
                        default=Path.home() / ".cache" / "supermerge" / "mergekit-venv")
    parser.add_argument("--no-mergekit", action="store_true", help="supermerge's side only")
    parser.add_argument("--work", type=Path, default=None, help="folder for the temporary files")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.no_mergekit:
        cli, why = None, "skipped (--no-mergekit)"
    else:
        cli, why = mergekit_cli(args.mergekit_venv)
    if cli is None:
        print(f"mergekit unavailable: {why}; only supermerge's columns are filled\n")
    root = Path(tempfile.mkdtemp(prefix="sm-vs-mergekit-", dir=args.work))
    try:
        config = llama_config(args.params)
        dirs = build_models(root, config)
        total = sum(f.stat().st_size for f in files(dirs[0])) // 2
        throughput = throughput_of(dirs, root)
        print(f"{total / 1e6:.0f} M parameters per model ({config.num_hidden_layers} layers), "
              f"bfloat16, base + 3 experts, {os.cpu_count()} cores, warm page cache; disk "
              f"read + write {throughput / 2**20:.0f} MiB/s; load {os.getloadavg()[0]:.1f}\n",
              flush=True)
        rows = []
        for name in methods:
            rows.append(compare(root, dirs, name, cli, throughput))
            print(table(rows).splitlines()[-1], flush=True, file=sys.stderr)
        print(table(rows))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
