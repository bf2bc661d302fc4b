"""Read-only views of checkpoints for ``supermerge inspect``: a summary, or a per-tensor diff."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from supermerge.io import Checkpoint


@dataclass(frozen=True)
class CheckpointSummary:
    """Totals of a checkpoint, from headers alone."""

    tensors: int
    parameters: int
    bytes: int
    dtypes: dict[str, int]


def summarize_checkpoint(ckpt: Checkpoint) -> CheckpointSummary:
    """Return tensor count, parameter count, bytes and parameters per dtype. Reads no weight."""
    dtypes: dict[str, int] = {}
    params = size = 0
    for info in ckpt.infos().values():
        numel = int(torch.Size(info.shape).numel())
        params += numel
        size += info.nbytes
        key = str(info.dtype).removeprefix("torch.")
        dtypes[key] = dtypes.get(key, 0) + numel
    return CheckpointSummary(len(ckpt.names()), params, size, dtypes)


@dataclass(frozen=True)
class TensorDiff:
    """How one tensor of ``other`` differs from the same tensor of ``reference``."""

    name: str
    status: str  # "same", "differs", "only in reference", "only in other", "shape differs"
    delta_norm: float | None = None  # ||other - reference|| (the task vector's norm)
    relative: float | None = None  # delta_norm / ||reference||


def compare_checkpoints(reference: Checkpoint, other: Checkpoint) -> Iterator[TensorDiff]:
    """Yield one TensorDiff per tensor name of either checkpoint, reading one pair at a time."""
    for name in reference.names():
        if name not in other:
            yield TensorDiff(name, "only in reference")
            continue
        if tuple(reference.info(name).shape) != tuple(other.info(name).shape):
            yield TensorDiff(name, "shape differs")
            continue
        ref = reference.read(name).double()
        delta = float(torch.linalg.vector_norm(other.read(name).double() - ref))
        norm = float(torch.linalg.vector_norm(ref))
        yield TensorDiff(name, "same" if delta == 0 else "differs", delta,
                         delta / norm if norm > 0 else None)
    for name in other.names():
        if name not in reference:
            yield TensorDiff(name, "only in other")
