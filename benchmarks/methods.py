"""Per-method micro-benchmark: ns per entry and peak extra memory when merging one tensor.

Merges one float32 tensor (by default 2816 x 1024, an MLP matrix of the 0.5 B Llama-shaped
model of ``benchmarks/streaming.py``, its values rounded to bfloat16 as that benchmark's
checkpoints are) from a base and K = 3 experts (2 for the methods that take exactly two)
the way the streaming engine calls a method: ``TensorContext.scratch`` is True, so the
experts are the method's to overwrite. Prints per method:

- ns per entry of the tensor: the best of ``--repeat`` calls in wall-clock time, and in
  the process's CPU time (all threads; steadier than wall time on a shared machine). The
  experts are copied back before each call and a whole-model statistic is computed
  beforehand, both untimed;
- the peak extra memory of one call, from the process's peak RSS (large allocations are
  served by mmap, as in the CLI, so a freed tensor leaves the RSS at once): bytes above the
  inputs, output included, also in tensors of this size ("x n").

Usage: python benchmarks/methods.py [--rows 2816] [--cols 1024] [--repeat 5]
       [--threads 2] [--dtype bfloat16] [--python] [method ...]
``--python`` measures the Python path instead (``scratch=False``: the experts are copied).
Run it on a quiet machine: two cores shared with other jobs make every number noisy.
"""

from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

import torch

from supermerge.methods import TensorContext, available_methods, get_method

PARAMETERS = {  # as in benchmarks/streaming.py where it has the method
    "task_arithmetic": {"lambda": 0.5},
    "ties": {"density": 0.2},
    "dare_ties": {"density": 0.5},
    "slerp": {"t": 0.5},
}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def prepare(name: str, base: torch.Tensor, sources: list[torch.Tensor]):
    """Return (fn, typed, models, statistic, experts) for one method."""
    method = get_method(name)
    k = method.max_models or len(sources)
    glob, defaults = method.split_defaults(PARAMETERS.get(name, {}))
    typed, models = method.validate(glob, [dict(defaults) for _ in range(k)])
    statistic = None
    stat = method.statistic(typed, models) if method.statistic else None
    if stat is not None:
        for p in range(stat.passes):
            for i, source in enumerate(sources[:k]):
                stat.observe(p, i, source - base)
            stat.finish_pass(p)
        statistic = stat.result()
    return method.fn, typed, models, statistic, [s.clone() for s in sources[:k]]


def measure(name: str, base, sources, repeat: int, scratch: bool) -> tuple[float, float, int]:
    """Return (best wall seconds, best CPU seconds, peak extra bytes) of one merge."""
    fn, typed, models, statistic, experts = prepare(name, base, sources)
    ctx = TensorContext(name="model.layers.0.mlp.up_proj.weight", seed=1234,
                        statistic=statistic, position=0.5, scratch=scratch)
    wall, cpu, peak = float("inf"), float("inf"), 0
    for _ in range(repeat):
        for expert, source in zip(experts, sources, strict=False):
            expert.copy_(source)
        before = _status("VmRSS")
        _reset_peak()
        started, started_cpu = time.perf_counter(), time.process_time()
        result = fn(base if get_method(name).needs_base else None, experts, typed, models, ctx)
        wall = min(wall, time.perf_counter() - started)
        cpu = min(cpu, time.process_time() - started_cpu)
        peak = max(peak, _status("VmHWM") - before)
        del result
    return wall, cpu, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="*", help="default: every registered method")
    parser.add_argument("--rows", type=int, default=2816)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="the checkpoints' dtype the inputs are rounded to")
    parser.add_argument("--python", action="store_true", help="scratch=False (Python callers)")
    args = parser.parse_args()
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD, as the CLI sets it
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    stored = getattr(torch, args.dtype)
    base = (0.02 * torch.randn(args.rows, args.cols, generator=gen)).to(stored).float()
    sources = [(base + 0.001 * torch.randn(base.shape, generator=gen)).to(stored).float()
               for _ in range(3)]
    n = base.numel()
    names = args.methods or [m.name for m in available_methods()]
    print(f"{args.rows} x {args.cols} {args.dtype} values in float32, K = 3 (2 for two-model "
          f"methods), {args.threads} threads, scratch={not args.python}, best of {args.repeat}\n")
    print("| method | ns / entry (wall) | ns / entry (CPU) | peak extra MiB | x n |")
    print("|---|---|---|---|---|")
    for name in names:
        wall, cpu, extra = measure(name, base, sources, args.repeat, not args.python)
        print(f"| {name} | {wall / n * 1e9:.1f} | {cpu / n * 1e9:.1f} | "
              f"{extra / 2**20:.0f} | {extra / (4 * n):.1f} |", flush=True)


if __name__ == "__main__":
    main()
