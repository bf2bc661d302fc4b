"""Cost of learned merging on a small transformer: step time and peak memory.

For a BERT built from a config (random weights; costs do not depend on the values) and
K = 2, 4, 8 experts (the base plus small perturbations, each with its own classifier),
measures:

- the time of one SuperMerge step (K tasks, ``--per-task`` examples each) against one
  plain fine-tuning step (Adam on all weights) of the same model on the same examples,
  each the fastest of ``--steps`` (robust to other load on shared machines), with the
  default gradient reduction and with ``stream_gradients``;
- the peak RSS rise of a flat SuperMerge against a hierarchical one (fan-in g), each in a
  fresh process with the experts read lazily from safetensors files, against the ideal
  ratio (g + 1) / (K + 1); also the hierarchical one with ``stream_gradients``. The
  processes run with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB so that freed
  tensors leave the RSS (by default glibc keeps many for reuse).

Prints a markdown table. Run: ``python benchmarks/learned.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification

from supermerge.io import open_checkpoint
from supermerge.learn import (
    CheckpointState,
    MergedModel,
    Task,
    TaskData,
    learn_coefficients,
    supermerge,
)

HEAD = "classifier."


def build_model(args: argparse.Namespace) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden,
        num_labels=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config).eval()


def expert_names(k: int) -> list[str]:
    return [f"task{i}" for i in range(k)]


def write_experts(base: torch.nn.Module, k: int, folder: Path) -> dict[str, Path]:
    """Save K experts (base + 1 % noise, a fresh classifier each) as safetensors files."""
    generator = torch.Generator().manual_seed(1)
    paths = {}
    for name in expert_names(k):
        state = {
            n: (t + 0.01 * t.std().nan_to_num() * torch.randn(t.shape, generator=generator))
            if t.is_floating_point() else t
            for n, t in base.state_dict().items()
        }
        paths[name] = folder / f"{name}.safetensors"
        save_file({n: t.contiguous() for n, t in state.items()}, paths[name])
    return paths


def make_tasks(k: int, args: argparse.Namespace) -> list[Task]:
    generator = torch.Generator().manual_seed(2)
    return [
        Task(name, TaskData(
            {"input_ids": torch.randint(0, args.vocab, (args.per_task, args.seq),
                                        generator=generator)},
            torch.randint(0, 4, (args.per_task,), generator=generator),
        ))
        for name in expert_names(k)
    ]


def lazy_experts(paths: dict[str, Path]) -> dict[str, CheckpointState]:
    return {name: CheckpointState(open_checkpoint(path)) for name, path in paths.items()}


def supermerge_step(k: int, paths: dict[str, Path], args: argparse.Namespace,
                    stream: bool) -> float:
    """Seconds of the fastest of ``--steps`` SuperMerge steps (timed between progress calls)."""
    base = build_model(args)
    model = MergedModel.from_experts(base, base.state_dict(), lazy_experts(paths),
                                     head_prefix=HEAD)
    stamps: list[float] = []
    learn_coefficients(model, make_tasks(k, args), steps=args.steps + 1,
                       batch_size=args.per_task, holdout=0.0, eval_every=10**9,
                       stream_gradients=stream,
                       progress=lambda *_: stamps.append(time.perf_counter()))
    return min(b - a for a, b in itertools.pairwise(stamps))


def finetune_step(k: int, args: argparse.Namespace) -> float:
    """Seconds of the fastest of ``--steps`` plain fine-tuning steps (Adam, all weights) on
    the same K x per-task examples."""
    model = build_model(args)
    tasks = make_tasks(k, args)
    ids = torch.cat([t.data.inputs["input_ids"] for t in tasks])
    labels = torch.cat([t.data.labels for t in tasks])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for _ in range(args.steps + 1):  # the first step allocates Adam's state
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(input_ids=ids).logits, labels).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def peak_rss(k: int, hierarchical: bool, stream: bool, paths: dict[str, Path],
             args: argparse.Namespace) -> int:
    """Peak RSS rise (bytes) of one merge, measured by the library; run in a fresh process."""
    torch.set_num_threads(args.threads)
    base = build_model(args)
    result = supermerge(base, base.state_dict(), lazy_experts(paths), make_tasks(k, args),
                        head_prefix=HEAD, hierarchical=hierarchical, fan_in=args.fan_in,
                        steps=args.memory_steps, batch_size=args.per_task, holdout=0.0,
                        stream_gradients=stream)
    return result.peak_rss


@contextmanager
def exact_rss() -> Iterator[None]:
    """Processes started inside return freed tensors to the system (glibc, Linux)."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 2**10)
    try:
        yield
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]


@contextmanager
def expert_files(base: torch.nn.Module, k: int) -> Iterator[dict[str, Path]]:
    """K experts of ``base`` written to a temporary folder (:func:`write_experts`), by name."""
    with tempfile.TemporaryDirectory() as folder:
        yield write_experts(base, k, Path(folder))


def in_fresh_process(function, *args):  # noqa: ANN001, ANN002, ANN201
    """Return ``function(*args)`` run in a fresh process that frees memory exactly."""
    with exact_rss(), multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def model_arguments(description: str, *, experts: list[int], hidden: int, vocab: int,
                    seq: int) -> argparse.ArgumentParser:
    """A parser of the model, data and thread options, with these defaults."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--experts", type=int, nargs="+", default=experts)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--vocab", type=int, default=vocab)
    parser.add_argument("--seq", type=int, default=seq)
    parser.add_argument("--per-task", type=int, default=4, help="examples per task per step")
    parser.add_argument("--threads", type=int, default=1)
    return parser


def describe(args: argparse.Namespace, base: torch.nn.Module) -> str:
    """The model and batch measured, in words."""
    state = base.state_dict().values()
    size = sum(t.numel() * t.element_size() for t in state)
    largest = max(t.numel() * t.element_size() for t in state)
    return (f"BERT {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: one weight "
            f"set {size / 1e6:.1f} MB (largest tensor {largest / 1e6:.1f} MB); batch "
            f"{args.per_task} x {args.seq} tokens per task; {args.threads} thread(s)")


def main() -> None:
    parser = model_arguments(__doc__.splitlines()[0], experts=[2, 4, 8], hidden=128,
                             vocab=30522, seq=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the fastest counts)")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--fan-in", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = build_model(args)
    print(f"{describe(args, base)}; fan-in g = {args.fan_in}\n")
    print("| K | fine-tune step | SuperMerge step (ratio) | streamed step (ratio) | flat peak "
          "| hierarchical peak (ratio) | streamed hierarchical (ratio) | (g+1)/(K+1) |")
    print("|---|---|---|---|---|---|---|---|")
    for k in args.experts:
        with expert_files(base, k) as paths:
            tune_s = finetune_step(k, args)
            steps = [supermerge_step(k, paths, args, stream) for stream in (False, True)]
            peaks = [in_fresh_process(peak_rss, k, hierarchical, stream, paths, args)
                     for hierarchical, stream in ((False, False), (True, False), (True, True))]
        step_cells = " | ".join(f"{s * 1e3:.0f} ms ({s / tune_s:.2f})" for s in steps)
        peak_cells = " | ".join(f"{p / 2**20:.0f} MiB ({p / peaks[0]:.2f})" for p in peaks[1:])
        print(f"| {k} | {tune_s * 1e3:.0f} ms | {step_cells} | {peaks[0] / 2**20:.0f} MiB | "
              f"{peak_cells} | {(args.fan_in + 1) / (k + 1):.2f} |", flush=True)


if __name__ == "__main__":
    main()
