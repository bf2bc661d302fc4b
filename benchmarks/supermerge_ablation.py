"""SuperMerge ablation on the offline benchmark: objective x basis x the other choices.

Runs `supermerge` (or ``--method adamerging``) with each variant below on the same experts,
tasks and validation data as `supermerge bench` (experts from its cache, built if
missing), scores each merge on the test splits with the tasks' own heads, and prints a
markdown table: normalised score, per-task scores, wall and CPU seconds of the learned
merge, its peak RSS rise. Every variant runs in this one process, one after another, so
their times compare (the load average of the machine is printed beside each).

Run: ``python benchmarks/supermerge_ablation.py --tasks all [--variants 'a;b'] [--json out]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time
from pathlib import Path

import torch

from supermerge.eval import default_base, resolve_tasks
from supermerge.eval.experts import ExpertCache, get_experts
from supermerge.run.bench import BenchmarkConfig, _Bench

VARIANTS: dict[str, dict] = {
    "paper (labels, task_vectors)": {"objective": "labels", "basis": "task_vectors"},
    "labels, tsv": {"objective": "labels", "basis": "tsv"},
    "distill, task_vectors": {"objective": "distill", "basis": "task_vectors"},
    "distill, tsv": {"objective": "distill", "basis": "tsv"},
    "labels+distill, tsv": {"objective": "labels+distill", "basis": "tsv"},
    "distill, tsv, logits only": {"objective": "distill", "basis": "tsv", "feature_weight": 0},
    "default": {},
}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    parser.add_argument("--variants", default="", help="semicolon-separated names (default: all)")
    parser.add_argument("--extra", default="", help="JSON {name: params} of more variants")
    parser.add_argument("--common", default="{}", help="JSON params added to every variant")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", default="supermerge", choices=["supermerge", "adamerging"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "supermerge.eval"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    variants = dict(VARIANTS) | json.loads(args.extra or "{}")
    chosen = [v for v in args.variants.split(";") if v] or list(variants)
    common = json.loads(args.common)
    tasks, skipped = resolve_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
    base = default_base()
    config = BenchmarkConfig()
    experts = get_experts(base, tasks, config=config.expert, cache=ExpertCache(), workers=2)
    bench = _Bench(base, tuple(tasks), dict(experts), config, Path("."), Path("."))
    print(f"tasks: {', '.join(t.name for t in tasks)} (skipped: {skipped or 'none'}); "
          f"load average at start {os.getloadavg()}")
    rows = {}
    for name in chosen:
        params = {**common, **variants[name]}
        started, cpu = time.perf_counter(), cpu_seconds()
        row = bench.learned(args.method, lambda *_: None, params=params)
        row["wall_s"], row["cpu_s"] = time.perf_counter() - started, cpu_seconds() - cpu
        rows[name] = row
        print(f"{name}: normalised {row['normalized']:.4f}, average {row['average']:.4f}, "
              f"held-out {row.get('objective')} loss {row.get('heldout_loss')}, "
              f"merge {row['seconds']:.0f} s, peak {row['peak_rss_mib']:.0f} MiB, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    names = [t.name for t in tasks]
    print("\n| variant | " + " | ".join(names) + " | normalised | merge s | CPU s | peak MiB |")
    print("|---|" + "---:|" * (len(names) + 4))
    for name, row in rows.items():
        cells = " | ".join(f"{row['per_task'][t]:.3f}" for t in names)
        print(f"| {name} | {cells} | {row['normalized']:.3f} | {row['seconds']:.0f} | "
              f"{row['cpu_s']:.0f} | {row['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
