"""Peak memory and step time of a learned merge with its task vectors in memory or streamed.

For a BERT built from a config (random weights; costs do not depend on the values) and
K experts (the base plus small perturbations, each with its own classifier, read lazily
from safetensors files), runs one flat SuperMerge (``objective: labels``, so no expert is
run; ``--basis`` as given) with ``memory: in_memory`` and with ``memory: stream``, each in
a fresh process (glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB so that freed tensors
leave the RSS), and prints per K and mode:

- the peak RSS rise of the merge over the process with the base module loaded, in MiB and
  in model sizes (one weight set; the base module itself, one more, is outside the rise);
  the goal for the streamed mode is at most 3 model sizes for any K;
- the median CPU time (user + system, all threads; steadier than wall time on a shared
  machine) and wall time of the timed steps, and the streamed/in-memory ratio of each
  (goal at most 2), measured in the same run (the files in page cache);
- the CPU seconds of the whole process (start-up and construction included), and the
  load average before and after.

Run: ``python benchmarks/learned_memory.py`` (a few minutes on 2 loaded cores).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from learned import (
    HEAD,
    build_model,
    describe,
    expert_files,
    in_fresh_process,
    lazy_experts,
    make_tasks,
    model_arguments,
)

from supermerge.learn import supermerge

MODES = ("in_memory", "stream")


def run_merge(k: int, memory: str, paths: dict[str, Path], args: argparse.Namespace
              ) -> tuple[int, float, float, float]:
    """(peak RSS rise in bytes, median CPU and wall seconds of the timed steps, CPU seconds
    of the process) of one flat SuperMerge; run it in a fresh process."""
    torch.set_num_threads(args.threads)
    base = build_model(args)
    stamps: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as workdir:
        merge = supermerge(base, base.state_dict(), lazy_experts(paths), make_tasks(k, args),
                           head_prefix=HEAD, objective="labels", basis=args.basis,
                           memory=memory, select="off", steps=args.steps + 1,
                           batch_size=args.per_task, holdout=0.0, eval_every=10**9,
                           workdir=workdir,
                           progress=lambda *_: stamps.append((time.process_time(),
                                                             time.perf_counter())))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # the first progress call ends step 1: step 1 and the final evaluation are not timed
    cpu, wall = (statistics.median(b[i] - a[i] for a, b in zip(stamps[:-2], stamps[1:-1],
                                                                 strict=True)) for i in (0, 1))
    return merge.peak_rss, cpu, wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = model_arguments(__doc__.splitlines()[0], experts=[2, 4, 8, 16], hidden=256,
                             vocab=8000, seq=64)
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--basis", choices=["task_vectors", "tsv"], default="task_vectors")
    args = parser.parse_args()
    base = build_model(args)
    size = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    print(f"{describe(args, base)}; basis {args.basis}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| K | memory | peak RSS rise | model sizes | step CPU / wall | stream / in memory "
          "(CPU, wall) | process CPU s |")
    print("|---|---|---|---|---|---|---|")
    for k in args.experts:
        with expert_files(base, k) as paths:
            results = {memory: in_fresh_process(run_merge, k, memory, paths, args)
                       for memory in MODES}
        _, cpu0, wall0, _ = results["in_memory"]
        for memory, (peak, cpu, wall, process) in results.items():
            print(f"| {k} | {memory} | {peak / 2**20:.0f} MiB | {peak / size:.2f} | "
                  f"{cpu * 1e3:.0f} / {wall * 1e3:.0f} ms | {cpu / cpu0:.2f}, {wall / wall0:.2f} "
                  f"| {process:.1f} |", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
