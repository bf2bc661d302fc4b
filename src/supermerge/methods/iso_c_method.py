"""``iso_c``: Isotropic merging in the common subspace (Iso-C), a flat singular spectrum.

Formula, per 2-D tensor, with ``tau_i = w_i (x_i - base)``::

    M        = sum_i tau_i = U S V^T              thin SVD of the task-arithmetic sum
    sigma    = mean(S)                           over the r non-zero singular values
    merged   = base + lambda * sigma * U V^T

Every other tensor (0-d, 1-D, 3-D and up) is averaged:
``merged = base + lambda * sum_i tau_i / K``, as in the reference code (the paper's method
is defined on weight matrices).

Paper: Marczak, Magistri, Cygert, Twardowski, Bagdanov & van de Weijer 2025, "No Task Left
Behind: Isotropic Model Merging with Common and Task-Specific Subspaces" (ICML 2025,
arXiv 2502.04959), Iso-C: keep the directions of the summed task matrix and replace its
spectrum, dominated by a few components, by the uniform one of the same mean, so that every
direction (every task) is scaled alike. ``lambda`` is the paper's ``alpha``; the paper
picks it on held-out validation data; 1.0 (the default here, and FusionBench's) needs none.

Choices where the paper and the reference code are silent:

* singular components that are numerically zero (a rank-deficient sum: tasks that cancel,
  or fewer rows than tasks) are left out, and ``sigma`` is the mean of the others: their
  singular vectors are arbitrary, and the reference code would add them with weight
  ``sigma`` (noise). For a full-rank sum (the usual case) this is exactly the reference
  computation; all task vectors zero gives the base;
* a per-model ``weight`` scales that task's matrix before the sum (weight 1: the paper).

By construction one expert gives ``base + lambda * sigma * U V^T`` of its own task matrix
(itself only when its spectrum is already flat), and K copies of one expert give K times
that (the sum's spectrum). Cost: one thin SVD of an m x n matrix per tensor, float32.
FusionBench's ``iso_c`` is the reference code; mergekit has no Iso-C.
"""

from __future__ import annotations

import torch
from pydantic import Field

from supermerge.methods.primitives import (
    TaskVectorParams,
    Weight,
    nonzero_svd,
    task_vectors,
    weighted_sum,
)
from supermerge.methods.registry import Method, ModelParams, TensorContext, register


class IsoModelParams(ModelParams):
    """Per-model parameters of ``iso_c`` and ``iso_cts``."""

    weight: Weight = Field(1.0, description="scales this model's task vector before the merge")


def isotropic(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """Return ``mean(s) * u @ vh``: the factors with their spectrum flattened to its mean.

    ``u`` (m x c) and ``vh`` (c x n) hold the kept directions; an empty ``s`` (nothing
    kept) gives the m x n zero matrix. Cost: one m x c x n product.
    """
    if s.numel() == 0:
        return torch.zeros(u.shape[0], vh.shape[1], dtype=u.dtype, device=u.device)
    return (u * s.mean()) @ vh


def iso_c_matrix(total: torch.Tensor) -> torch.Tensor:
    """Return Iso-C's ``sigma * U V^T`` of the summed task matrix ``total``.

    Cost: one thin SVD.
    """
    return isotropic(*nonzero_svd(total))


def merge_iso_c(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: TaskVectorParams,
    models: list[IsoModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return the Iso-C merge (2-D) or the weighted mean of task vectors (other tensors).

    Cost: the sum in the first expert's buffer when ``ctx.scratch`` (else one new tensor),
    and for a matrix one thin SVD and one product.
    """
    taus = task_vectors(base, experts, in_place=ctx.scratch)
    weights = [m.weight for m in models]
    if base.dim() == 2:
        merged = iso_c_matrix(weighted_sum(taus, weights, in_place=True))
    else:
        merged = weighted_sum(taus, [w / len(experts) for w in weights], in_place=True)
    return torch.add(base, merged, alpha=params.scale, out=merged)


iso_c = register(
    Method(
        name="iso_c",
        fn=merge_iso_c,
        params=TaskVectorParams,
        model_params=IsoModelParams,
        summary="per matrix, the task-arithmetic sum with its singular spectrum flattened "
        "to its mean (Iso-C); other tensors averaged",
        paper="Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common "
        "and Task-Specific Subspaces (arXiv 2502.04959)",
        needs="none",
    )
)
