"""OPCM on the offline benchmark: task order sensitivity and continual versus all at once.

Merges the benchmark's experts (from `supermerge bench`'s cache, built if missing) with
``opcm`` in the tasks' listed order, in the reversed order and in ``--shuffles`` seeded
random orders, scores each merge on the test splits with the tasks' own heads and prints
a markdown table: normalised score, per-task scores, merge seconds and the merge's peak
RSS rise. Then the continual path: the first K - 1 experts merged, the K-th merged into
that output (``continual:``), compared with the all-at-once merge in the same order
(largest absolute difference of any weight) and timed; ``||forward - reversed||`` over the
model, relative to the merged update's norm, says how far the order moves the weights.

Run: ``python benchmarks/opcm_order.py [--tasks all] [--shuffles 1] [--alpha 0.5]``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import supermerge
from supermerge.eval import default_base, resolve_tasks
from supermerge.eval.experts import ExpertCache, get_experts
from supermerge.run.bench import BenchmarkConfig, _Bench


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def timed_merge(recipe: dict, out: Path) -> tuple[float, int]:
    """Merge; return (wall seconds, peak RSS rise in bytes)."""
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    started = time.perf_counter()
    supermerge.merge(recipe, out)
    return time.perf_counter() - started, _status("VmHWM") - before


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("model*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    parser.add_argument("--shuffles", type=int, default=1, help="seeded random orders")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    tasks, skipped = resolve_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
    base = default_base()
    config = BenchmarkConfig()
    experts = get_experts(base, tasks, config=config.expert, cache=ExpertCache(), workers=2)
    bench = _Bench(base, tuple(tasks), dict(experts), config, Path("."), Path("."))
    names = [t.name for t in tasks]
    orders = {"listed": names, "reversed": names[::-1]}
    for seed in range(args.shuffles):
        orders[f"shuffle {seed}"] = random.Random(seed).sample(names, len(names))
    print(f"tasks: {', '.join(names)} (skipped: {skipped or 'none'}); load average "
          f"{os.getloadavg()}")

    def recipe(order: list[str], **extra) -> dict:
        return {"merge_method": "opcm", "base_model": str(base),
                "parameters": {"alpha": args.alpha},
                "models": [str(experts[name].path) for name in order], **extra}

    rows, folders = {}, {}
    with tempfile.TemporaryDirectory() as work:
        for label, order in orders.items():
            folders[label] = Path(work) / label.replace(" ", "_")
            seconds, peak = timed_merge(recipe(order), folders[label])
            report = bench.score(folders[label], f"opcm {label}", lambda *_: None)
            rows[label] = (order, report, seconds, peak)
            print(f"{label}: normalised {report.normalized:.4f}, merge {seconds:.1f} s, "
                  f"peak {peak / 2**20:.0f} MiB", flush=True)
        first = Path(work) / "first"
        supermerge.merge(recipe(names[:-1]), first)
        continued = Path(work) / "continued"
        seconds, peak = timed_merge({"merge_method": "opcm", "continual": str(first),
                                     "models": [str(experts[names[-1]].path)]}, continued)
        at_once, later = weights(folders["listed"]), weights(continued)
        gap = max(float((at_once[n] - later[n]).abs().max()) for n in at_once)
        reversed_ = weights(folders["reversed"])
        base_w = weights(Path(base))
        moved = math.sqrt(sum(float((at_once[n] - reversed_[n]).double().square().sum())
                              for n in at_once))
        size = math.sqrt(sum(float((at_once[n] - base_w[n]).double().square().sum())
                             for n in at_once if n in base_w))
    print(f"\ncontinual (K-1 merged, then the K-th): {seconds:.1f} s, peak {peak / 2**20:.0f} "
          f"MiB; largest |difference| to all at once: {gap:.2e}")
    print(f"||listed - reversed|| / ||merged update|| = {moved / size:.4f}\n")
    print("| order | " + " | ".join(names) + " | normalised | merge s | peak MiB |")
    print("|---|" + "---:|" * (len(names) + 3))
    for label, (_, report, seconds, peak) in rows.items():
        per_task = report.per_task()
        cells = " | ".join(f"{per_task[t]:.3f}" for t in names)
        print(f"| {label} | {cells} | {report.normalized:.3f} | {seconds:.1f} | "
              f"{peak / 2**20:.0f} |")
    scores = [report.normalized for _, report, _, _ in rows.values()]
    print(f"\nnormalised over {len(scores)} orders: min {min(scores):.3f}, max "
          f"{max(scores):.3f}, spread {max(scores) - min(scores):.3f}")
    for label, (order, *_rest) in rows.items():
        print(f"- {label}: {', '.join(order)}")


if __name__ == "__main__":
    main()
