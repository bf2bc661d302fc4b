"""Learned merges whose task vectors stay on disk: ``MergedModel(memory="stream")``.

In memory, a :class:`~supermerge.learn.model.MergedModel` holds the K stacked task vectors
of every tensor: K model sizes. Streamed, it holds none of them:

- **Spill.** At construction each tensor's K task vectors (after ``prepare``, e.g. TSV's
  basis, computed once per tensor: that needs the tensor's K vectors together; without
  ``prepare`` one vector is resident at a time) are written to one safetensors file in a
  temporary folder under the workdir (:class:`SpilledVectors`) and dropped. The file is
  memory-mapped; each use takes one expert's vector of one tensor as a view of the map (no
  copy) and, once used, hands its pages back (``madvise(MADV_DONTNEED)``): pages of a map
  stay in the process's resident set until then, so a K-model file read through one map
  would otherwise put K model sizes back into the RSS this mode exists to bound.
- **One merge, its gradient by re-reading.** A tensor's merge ``base + sum_i c_i tau_i``
  is an autograd function (``_Merge``) that adds the vectors one at a time and keeps none:
  its backward pass reads them again for ``d/dc_i = <dL/dtheta_j, tau_ij>``.
- **Blocks built when they run.** Each numbered transformer block's forward is replaced,
  for one call of the model (:func:`streamed_blocks`), by a run under activation
  checkpointing (``torch.utils.checkpoint``, non-reentrant) of a function that builds the
  block's merged weights from the coefficients, then runs the block on them. The forward
  pass keeps only the block's inputs; the backward pass runs the function again, block by
  block, and the merge's backward turns each merged tensor's gradient into K numbers. So
  one block's merged weights (and one task vector) are resident at a time, plus the
  blocks' boundary activations; without checkpointing autograd would keep every block's
  merged weights from the forward pass to the backward pass: a merged model.
- **The rest** (embeddings, final norm, pooler: tensors outside the numbered blocks, or
  tied to one outside their block) is merged as in memory, once per step, as autograd
  leaves whose gradients are reduced against tau read again
  (:meth:`~supermerge.learn.model.MergedModel.merged_leaves`). A block that uses such a
  tensor gets the same leaf, so its recomputation in the backward pass sees it.

Why this design: it is exact (the merge and its gradient are the in-memory mode's
formulas on the same values, so the coefficients agree up to the order of float sums), the
module's code is untouched (its blocks' forward is swapped for one call; the blocks' own
hooks still see their outputs), and the memory bound does not depend on K. The cost: one
more forward pass of each block, and the blocks' task vectors read three times per task
and step (forward, recomputation, gradient) where the in-memory mode passes over its
resident copy twice per step (benchmarks/learned_memory.py measures both).
"""

from __future__ import annotations

import contextlib
import mmap
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from supermerge.io import CheckpointWriter
from supermerge.io.checkpoint import safetensors_offsets
from supermerge.names import block_of

Build = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]
"""Coefficients (K x J, map(W)) -> one block's merged tensors by their names in the block."""

_SPILL = "vectors.safetensors"
_RELEASE = getattr(mmap, "MADV_DONTNEED", None)  # absent where madvise is (Windows)


def named_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return the module's numbered transformer blocks with their names, in order of
    definition."""
    return [(name, m) for name, m in module.named_modules()
            if name and block_of(name + ".") == name]


def uncached(name: str, value: Any) -> Any:
    """A keyword argument as a re-run block gets it: no key/value cache (a second run must
    not append to the first one's), ``use_cache`` off."""
    if name == "use_cache":
        return False
    if name in {"cache", "past_key_values", "past_key_value", "layer_past"} or \
            type(value).__name__.endswith("Cache"):
        return None
    return value


class SpilledVectors:
    """Every merged tensor's K task vectors in a safetensors file, read one at a time.

    ``vectors`` yields, per tensor of ``layout`` ((name, shape) pairs, in order), its K
    task vectors (a ``[K, *shape]`` stack or any iterable of K tensors), each written as it
    comes, so that no more than the caller's stack is resident. The file lives in a
    temporary folder under ``workdir`` (default: the system's), removed by :meth:`close`
    or when this object is garbage-collected, and is memory-mapped: :meth:`each` costs
    no copy (page faults into the page cache, or reads from the disk).
    """

    def __init__(self, layout: Sequence[tuple[str, tuple[int, ...]]], k: int,
                 dtype: torch.dtype, vectors: Iterable[Iterable[torch.Tensor]], *,
                 device: torch.device, workdir: str | Path | None = None) -> None:
        self.k, self.dtype, self._device = k, dtype, device
        self._folder = tempfile.TemporaryDirectory(prefix="supermerge-vectors-", dir=workdir)
        self._keys = [[f"{i}/{name}" for i in range(k)] for name, _ in layout]
        out = Path(self._folder.name) / "vectors"
        try:
            with CheckpointWriter(out, single_file=_SPILL, layout=[
                    (key, shape, dtype) for keys, (_, shape) in zip(self._keys, layout, strict=True)
                    for key in keys]) as writer:
                for keys, tensors in zip(self._keys, vectors, strict=True):
                    for key, vector in zip(keys, tensors, strict=True):
                        writer.add(key, vector.to(device="cpu", dtype=dtype).contiguous())
                writer.commit()
            self._offsets = safetensors_offsets(out / _SPILL)
            with open(out / _SPILL, "rb") as file:  # private: writable views, never written
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        except BaseException:
            self._folder.cleanup()
            raise

    def each(self, index: int) -> Iterator[torch.Tensor]:
        """Yield tensor ``index``'s task vectors, expert by expert: views of the map, each
        one's pages handed back to the page cache when the next is asked for (use them
        before; a view kept longer stays valid, it only faults its pages in again)."""
        for key in self._keys[index]:
            info, offset = self._offsets[key]
            count = info.nbytes // info.dtype.itemsize
            vector = torch.frombuffer(self._map, dtype=info.dtype, count=count,
                                      offset=offset) if count else torch.empty(0, dtype=info.dtype)
            yield vector.view(info.shape).to(self._device)
            start = offset - offset % mmap.PAGESIZE
            if info.nbytes and _RELEASE is not None:
                self._map.madvise(_RELEASE, start, offset + info.nbytes - start)

    def merge(self, index: int, base: torch.Tensor, coefficients: torch.Tensor
              ) -> torch.Tensor:
        """Return ``base + sum_i coefficients[i] * tau_i`` of tensor ``index``, differentiable
        w.r.t. ``coefficients`` (K, or K x rows: one per output row). Holds one task vector
        at a time, here and in the backward pass (which reads them again)."""
        return _Merge.apply(coefficients, base, self, index)

    def products(self, index: int, gradient: torch.Tensor, rows: int | None) -> torch.Tensor:
        """Return ``<gradient, tau_i>`` of tensor ``index`` per expert (K), or per expert and
        output row (K x ``rows``), in the vectors' dtype. Reads each task vector once."""
        return torch.stack([_dot(vector, gradient, rows) for vector in self.each(index)])

    def close(self) -> None:
        """Remove the file (its map closes when no view of it is left)."""
        with contextlib.suppress(BufferError):  # views alive: it closes with the last one
            self._map.close()
        self._folder.cleanup()


def _dot(vector: torch.Tensor, gradient: torch.Tensor, rows: int | None) -> torch.Tensor:
    """``<gradient, vector>``, per output row when ``rows`` is given, in the vector's dtype."""
    if rows is None:
        return torch.dot(vector.reshape(-1), gradient.reshape(-1).to(vector.dtype))
    return torch.einsum("rc,rc->r", vector.reshape(rows, -1),
                        gradient.reshape(rows, -1).to(vector.dtype))


class _Merge(torch.autograd.Function):
    """``base + sum_i c_i * tau_i`` with the task vectors read from a :class:`SpilledVectors`
    one at a time (c: K scalars, or K x rows); the backward pass reads them again for
    ``d/dc_i = <gradient, tau_i>`` instead of keeping them."""

    @staticmethod
    def forward(ctx: Any, coefficients: torch.Tensor, base: torch.Tensor,
                spill: SpilledVectors, index: int) -> torch.Tensor:
        rows = coefficients.shape[1] if coefficients.dim() == 2 else None
        ctx.spill, ctx.index, ctx.rows, ctx.dtype = spill, index, rows, coefficients.dtype
        c = coefficients.to(spill.dtype)
        delta = torch.zeros(base.shape, dtype=spill.dtype, device=base.device)
        view = delta.view(rows, -1) if rows else delta.view(-1)
        for i, vector in enumerate(spill.each(index)):
            if rows:
                view.addcmul_(c[i].unsqueeze(-1), vector.view(view.shape))
            else:
                view.add_(vector.view(view.shape), alpha=float(c[i]))
        if base.dtype != delta.dtype:
            return base + delta.to(base.dtype)
        return delta.add_(base)  # base + delta, as the in-memory mode adds, without a copy

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        products = ctx.spill.products(ctx.index, gradient, ctx.rows)
        return products.to(ctx.dtype), None, None, None


class _Bare(nn.Module):
    """Runs ``block``'s own class forward: not an instance forward swapped in by
    :func:`streamed_blocks`, and without the block's hooks (its caller ran those)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.block).forward(self.block, *args, **kwargs)


def _run(block: nn.Module, build: Build, coefficients: torch.Tensor, *args: Any,
         **kwargs: Any) -> Any:
    """Run ``block`` on the weights ``build(coefficients)`` makes; returns its output."""
    weights = {f"block.{name}": tensor for name, tensor in build(coefficients).items()}
    return functional_call(_Bare(block), weights, args, kwargs)


def _streamed_forward(block: nn.Module, build: Build, coefficients: torch.Tensor,
                      *args: Any, **kwargs: Any) -> Any:
    """The forward swapped into a block: built and run under activation checkpointing when
    a gradient is wanted (its key/value cache dropped: the block runs twice), else once."""
    if not (torch.is_grad_enabled() and coefficients.requires_grad):
        return _run(block, build, coefficients, *args, **kwargs)
    kwargs = {name: uncached(name, value) for name, value in kwargs.items()}
    return checkpoint(_run, block, build, coefficients, *args, use_reentrant=False, **kwargs)


@contextmanager
def streamed_blocks(blocks: Sequence[tuple[nn.Module, Build]],
                    coefficients: torch.Tensor) -> Iterator[None]:
    """Within, each block builds its weights with its ``Build`` from ``coefficients`` when
    it runs and frees them after (see the module's docstring); the blocks' forward methods
    are restored on exit. Costs nothing until a block runs."""
    saved = [block.__dict__.get("forward") for block, _ in blocks]
    for block, build in blocks:
        block.forward = partial(_streamed_forward, block, build, coefficients)
    try:
        yield
    finally:
        for (block, _), own in zip(blocks, saved, strict=True):
            if own is None:
                del block.forward
            else:
                block.forward = own
