"""Bases the learned coefficients act on: the raw task vectors, or TSV-M's decorrelated parts.

A basis maps one tensor's stacked task vectors ``[K, *shape]`` to the K tensors the merge
weights: ``merged = base + sum_i map(W[i, group]) * basis_i``.

- ``task_vectors``: ``basis_i = tau_i`` (the SuperMerge paper).
- ``tsv``: for a matrix with ``min(m, n) >= K``, ``basis_i`` is task i's part of the TSV-M
  merge (its top ``min(m, n) / K`` singular directions after the tasks' singular vectors
  are orthogonalised, :func:`~supermerge.methods.tsv_method.tsv_components`); every other
  tensor is ``tau_i / K``, the mean TSV-M takes there. With every coefficient at ``c`` the
  merge is exactly TSV-M with ``lambda = c``; learning then re-weights each task's
  decorrelated part per tensor (as CART and AdaRank learn over singular directions).
"""

from __future__ import annotations

from typing import Literal

import torch

from supermerge.methods.tsv_method import tsv_components

Basis = Literal["task_vectors", "tsv"]
BASES: tuple[Basis, ...] = ("task_vectors", "tsv")


def tsv_basis(stacked: torch.Tensor) -> torch.Tensor:
    """Return TSV-M's per-task parts of one tensor's task vectors ``[K, *shape]`` (same
    shape). Cost: K + 2 thin SVDs for a matrix, one division otherwise."""
    k = len(stacked)
    if stacked.dim() == 3 and min(stacked.shape[1:]) >= k:
        wide = stacked if stacked.dtype == torch.float64 else stacked.float()
        return torch.stack(tsv_components(list(wide))).to(stacked.dtype)
    return stacked / k


PREPARE = {"task_vectors": None, "tsv": tsv_basis}
"""The ``prepare`` function of :class:`~supermerge.learn.model.MergedModel` per basis."""
