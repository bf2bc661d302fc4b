"""Data-parallel learned merging (SuperMerge, AdaMerging) with ``torch.distributed``.

Start one process per device with ``torchrun`` (gloo on CPU, nccl on GPU)::

    torchrun --nproc-per-node 4 my_merge.py                       # one machine
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank 0 \\
             --rdzv-backend c10d --rdzv-endpoint head:29500 my_merge.py   # each node

where ``my_merge.py`` calls :func:`init_from_env` and then :func:`learn_data_parallel`
(or ``learn_coefficients(..., parallel=...)`` on a :class:`MergedModel` it built); or, for
a learn recipe, ``torchrun ... --no-python supermerge learn RECIPE -o OUT --data-parallel``.

What is sharded: the *work on the validation batches*. Every process holds the whole
merge (the module, the base, the K task vectors, W) and all of the small validation set;
it draws the same split and the same batches as every other process (one seeded
generator), runs the forward and backward passes of its contiguous shard of each batch
only, and weights that shard's loss by its share of the batch. The gradient of W (K x J
scalars) and the losses are then summed over the processes (all-reduce), so every process
takes the same Adam step, the one a single process would take: the coefficients agree
with a single-process run up to floating-point rounding. (For causal language models the
loss is a mean over tokens; a shard is weighted by its share of the *examples*, which is
exact when every example scores the same number of tokens.)

Memory per process, in bytes, for P merged parameters in the module, K experts, task
vectors held in ``vector_dtype`` (4 bytes for float32, 2 for bfloat16)::

    P x 4 (base)  +  K x P x vector_bytes (task vectors)  +  P x 4 (one merged copy)
      +  P x 4 (gradient of the merged copy, none with stream_gradients)
      +  activations of one shard

so data parallelism divides the time per step, not the weights' memory; the hierarchical
merge (``hierarchical: true``, ``fan_in`` g) bounds K to g per node.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from supermerge.learn.data import Task, TaskData
from supermerge.learn.errors import LearnError
from supermerge.learn.hierarchical import LearnedMerge, State
from supermerge.learn.model import Head
from supermerge.learn.registry import get_learned_method
from supermerge.progress import Progress


class TorchDataParallel:
    """The ``parallel`` hook of ``learn_coefficients`` over a ``torch.distributed`` group.

    Process ``rank`` of ``world`` runs the ``rank``-th of ``world`` contiguous, near-equal
    parts of every batch. The process group must be initialised (see :func:`init_from_env`).
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise LearnError("torch.distributed is not initialised",
                             fix="start the script with torchrun and call init_from_env() "
                             "(or torch.distributed.init_process_group) first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else None

    def shard(self, batch: TaskData) -> tuple[TaskData, float]:
        """Return this process's contiguous part of ``batch`` and its share of the batch."""
        n = len(batch)
        index = torch.tensor_split(torch.arange(n), self.world)[self.rank]
        return batch.select(index), len(index) / n if n else 0.0

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the group in place (through the GPU for nccl)."""
        if self.device is None or tensor.device == self.device:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
            return
        staged = tensor.to(self.device)
        dist.all_reduce(staged, op=dist.ReduceOp.SUM, group=self.group)
        tensor.copy_(staged)


def init_from_env(backend: Literal["gloo", "nccl"] | None = None) -> TorchDataParallel:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    ``backend`` defaults to nccl when CUDA is available, else gloo; with nccl each process
    takes the GPU ``LOCAL_RANK``. Returns the hook for the default group. Costs one
    rendezvous with every other process.
    """
    if "WORLD_SIZE" not in os.environ:
        raise LearnError("no torchrun environment (WORLD_SIZE is not set)",
                         fix="start the script with torchrun --nproc-per-node N script.py")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return TorchDataParallel()


def learn_data_parallel(
    method: str,
    module: nn.Module,
    base_state: State,
    experts: Mapping[str, State],
    tasks: Sequence[Task],
    *,
    parallel: TorchDataParallel,
    head_prefix: str | None = None,
    heads: Mapping[str, Head] | None = None,
    progress: Progress | None = None,
    **params: Any,
) -> LearnedMerge:
    """Run SuperMerge or AdaMerging data-parallel; returns the same LearnedMerge on every rank.

    Takes what :func:`supermerge.learn.supermerge` / :func:`~supermerge.learn.adamerging`
    take (``params`` by their recipe names, flat or hierarchical) plus ``parallel``. Every
    rank must call it with the same arguments; export the result from rank 0 only. Costs a
    single-process run's steps, each divided among the ranks, plus two all-reduces of
    K x J numbers and two of a scalar per step.
    """
    chosen = get_learned_method(method)
    if not chosen.parallel:
        raise LearnError(f"{method} has no data-parallel mode", fix="run it in one process")
    outcome = chosen.run(module, experts, tasks, base_state=base_state,
                         head_prefix=head_prefix, heads=heads, progress=progress,
                         parallel=parallel, **params)
    assert outcome.merge is not None  # data-parallel methods train
    return outcome.merge
