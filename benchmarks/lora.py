"""LoRA benchmark: merging adapters against merging the same experts stored dense.

Builds a Llama-like base of about ``--params`` parameters (benchmarks/streaming.py's
shapes) and K rank-``--rank`` LoRA adapters on every attention and MLP matrix, written
twice: as PEFT adapter folders and as dense models (base + scale B A, bit for bit what the
adapter reads as). Then, each ``supermerge`` command in a subprocess with its peak
anonymous RSS:

- task_arithmetic over the adapters, and over the dense experts (same output);
- the same merge written as an adapter of rank K x rank (``output: adapter``: exact);
- ``supermerge extract`` of the first dense expert at the adapter's rank, with the exact
  and the randomized SVD.

Usage: python benchmarks/lora.py [--params 2e8] [--rank 16] [--experts 2] [--work DIR]
Prints a markdown table and the largest difference between the adapter and dense merges.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from streaming import llm_shapes, peak_anon_rss

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(root: Path, params: float, rank: int, experts: int,
          dtype: torch.dtype) -> tuple[Path, list[Path], list[Path]]:
    """Write the base, the adapters and their dense twins; returns their folders."""
    shapes = llm_shapes(params)
    base = {n: (torch.randn(s, generator=torch.Generator().manual_seed(zlib.crc32(n.encode())))
                * 0.02).to(dtype) for n, s in shapes.items()}
    folder = root / "base"
    folder.mkdir(parents=True)
    save_file(base, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    adapters, dense = [], []
    for k in range(experts):
        gen = torch.Generator().manual_seed(100 + k)
        lora, tuned = {}, dict(base)
        for name, shape in shapes.items():
            if not any(f".{t}." in name for t in TARGETS):
                continue
            a = torch.randn(rank, shape[1], generator=gen) / math.sqrt(shape[1])
            b = torch.randn(shape[0], rank, generator=gen) * 1e-3
            module = name.removesuffix(".weight")
            lora[f"base_model.model.{module}.lora_A.weight"] = a
            lora[f"base_model.model.{module}.lora_B.weight"] = b
            tuned[name] = (base[name].float() + 2.0 * b @ a).to(dtype)  # alpha / r = 2
        adapter = root / f"lora{k}"
        adapter.mkdir()
        save_file(lora, str(adapter / "adapter_model.safetensors"))
        (adapter / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
             "base_model_name_or_path": str(folder), "target_modules": list(TARGETS)}))
        expert = root / f"dense{k}"
        expert.mkdir()
        save_file(tuned, str(expert / "model.safetensors"))
        (expert / "config.json").write_text(json.dumps({"model_type": "llama"}))
        adapters.append(adapter)
        dense.append(expert)
    return folder, adapters, dense


def run(command: list[str]) -> tuple[float, int, str]:
    """Run a supermerge command; returns (seconds, peak anonymous RSS bytes, stdout)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "supermerge.cli.main", *command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stop, box = threading.Event(), [0]
    watcher = threading.Thread(target=peak_anon_rss, args=(proc.pid, stop, box))
    watcher.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - started
    stop.set()
    watcher.join()
    if proc.returncode:
        raise RuntimeError(f"{command[0]} failed:\n{err.decode()}")
    return seconds, box[0], out.decode()


def merge(root: Path, label: str, base: Path, models: list[Path], **extra) -> tuple:
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [str(m) for m in models], "parameters": {"lambda": 0.5}, **extra}
    path = root / f"{label}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return run(["merge", str(path), "-o", str(root / f"out-{label}"), "--threads", "2"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=2e8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    root = args.work or Path(tempfile.mkdtemp(prefix="supermerge-lora-"))
    try:
        base, adapters, dense = build(root, args.params, args.rank, args.experts,
                                      getattr(torch, args.dtype))
        size = sum(f.stat().st_size for f in base.iterdir()) / 2**30
        rows = [("task_arithmetic over adapters", merge(root, "adapters", base, adapters)),
                ("task_arithmetic over dense experts", merge(root, "dense", base, dense)),
                (f"the same, output: adapter (rank {args.experts * args.rank})",
                 merge(root, "to-adapter", base, adapters, output="adapter",
                       rank=args.experts * args.rank)),
                (f"extract dense expert 0 at rank {args.rank}",
                 run(["extract", str(base), str(dense[0]), "-o", str(root / "extracted"),
                      "--rank", str(args.rank)])),
                ("the same, --svd randomized",
                 run(["extract", str(base), str(dense[0]), "-o", str(root / "fast"),
                      "--rank", str(args.rank), "--svd", "randomized"]))]
        a = load_file(root / "out-adapters" / "model.safetensors")
        d = load_file(root / "out-dense" / "model.safetensors")
        worst = max(float((a[n].float() - d[n].float()).abs().max()) for n in a)
        print(f"base: {size:.2f} GiB {args.dtype}, {args.experts} adapters of rank "
              f"{args.rank} on {', '.join(TARGETS)}\n")
        print("| run | seconds | peak anon RSS GiB |\n|---|---|---|")
        for label, (seconds, rss, _) in rows:
            print(f"| {label} | {seconds:.1f} | {rss / 2**30:.2f} |")
        print(f"\nadapter merge vs dense merge: max abs difference {worst:.3g}")
        for label, (_, _, out) in rows[2:]:
            print(f"\n{label}:\n{out.strip()}")
    finally:
        if args.work is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
