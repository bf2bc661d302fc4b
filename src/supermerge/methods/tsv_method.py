"""``tsv``: Task Singular Vectors merging (TSV-M), decorrelate the tasks' top singular vectors.

Formula, per 2-D tensor (m x n, r = min(m, n)) with ``Delta_i = w_i (x_i - base)`` and ``K``
experts::

    Delta_i = U_i S_i V_i^T                      thin SVD of each task matrix
    k       = floor(r / K)                       components kept per task
    U = [U_1[:, :k] ... U_K[:, :k]],  S = diag(S_1[:k] ... S_K[:k]),  V = [V_1[:, :k] ...]
    U_perp  = P_U Q_U^T  where U = P_U Sigma_U Q_U^T      (polar factor: the orthonormal
    V_perp  = P_V Q_V^T  where V = P_V Sigma_V Q_V^T       matrix closest to U, Procrustes)
    merged  = base + lambda * U_perp S V_perp^T

Every other tensor (0-d, 1-D, 3-D and up), and a matrix with ``r < K`` (``k = 0``), is
averaged: ``merged = base + lambda * sum_i w_i tau_i / K`` (the reference code averages
non-matrix tensors; it would keep nothing of a matrix with ``k = 0``).

Paper: Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri & Rodola 2025, "Task
Singular Vectors: Reducing Task Interference in Model Merging" (CVPR 2025,
arXiv 2412.00081), TSV-Merge: keep each task's top 1/T singular components (TSV-C), then
remove the interference between tasks by orthogonalising the concatenated singular vectors
(the closest orthonormal matrix, computed from an SVD of the concatenation) before
reconstructing. Note the result approximates the *sum* of the low-rank task matrices (not
their mean); ``lambda`` is the paper's ``alpha``, 1.0 by default as in the paper, which
needs no validation search.

Choices where the reference code is silent or fragile:

* singular components below ``s_max * max(m, n) * eps`` (numerically zero: a zero or
  low-rank task matrix) are not concatenated: their directions are arbitrary and would
  only distort the orthogonalisation of the others;
* the polar factor keeps only the components of the concatenation's SVD that are not
  numerically zero. When the concatenated vectors are linearly dependent (duplicate or
  collinear task vectors) the full polar factor is not unique and its arbitrary part would
  add noise; restricted this way, K copies of one task vector give its rank-k
  approximation, and one expert (K = 1, k = r) gives itself back. For linearly independent
  vectors (the usual case) this is exactly the reference computation;
* a per-model ``weight`` scales that task's matrix (its singular values) and its term in
  the mean (weight 1: the paper).

The reference code skips CLIP's ``text_projection`` matrix (averaged); here every 2-D
tensor is decomposed. Cost: one thin SVD per task matrix plus two on the
(m x Kk) and (Kk x n) concatenations; float32. FusionBench's TSV-M is the reference code
(the choices above apply); mergekit has no TSV.
"""

from __future__ import annotations

import torch
from pydantic import Field

from supermerge.methods.primitives import TaskVectorParams, Weight, task_vectors, weighted_sum
from supermerge.methods.registry import Method, ModelParams, TensorContext, register


class TsvModelParams(ModelParams):
    """Per-model parameters of ``tsv``."""

    weight: Weight = Field(
        1.0, description="scales this model's task vector (its singular values)"
    )


def _tolerance(singular_values: torch.Tensor, shape: tuple[int, ...]) -> float:
    """Return the rank tolerance ``s_max * max(shape) * eps`` (numpy's matrix_rank)."""
    if singular_values.numel() == 0:
        return 0.0
    eps = torch.finfo(singular_values.dtype).eps
    return float(singular_values.max()) * max(shape) * eps


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """Return ``P Q^T`` from the thin SVD ``matrix = P Sigma Q^T``, without null components.

    The closest matrix with orthonormal columns (or rows, if wider than tall) to ``matrix``
    on its range. Cost: one thin SVD.
    """
    p, sigma, qh = torch.linalg.svd(matrix, full_matrices=False)
    keep = sigma > _tolerance(sigma, tuple(matrix.shape))
    return p[:, keep] @ qh[keep, :]


def tsv_matrix(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Return the TSV-M merge of 2-D task matrices with ``min(m, n) >= K``.

    Cost: K + 2 thin SVDs.
    """
    u_perp, singular, vh_perp, _ = _orthogonalised(deltas)
    if singular.numel() == 0:
        return torch.zeros_like(deltas[0])
    return (u_perp * singular) @ vh_perp


def tsv_components(deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """Return each task's part of the TSV-M merge: its kept singular values on its columns
    of the orthogonalised singular vectors. They sum to :func:`tsv_matrix` exactly (the
    merge is a sum over the concatenated columns), so learned coefficients on them start
    from TSV-M. Cost: the SVDs of :func:`tsv_matrix` and K matrix products.
    """
    u_perp, singular, vh_perp, counts = _orthogonalised(deltas)
    parts, start = [], 0
    for count in counts:
        cols = slice(start, start + count)
        parts.append((u_perp[:, cols] * singular[cols]) @ vh_perp[cols]
                     if count else torch.zeros_like(deltas[0]))
        start += count
    return parts


def _orthogonalised(deltas: list[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Return (U_perp, S, V_perp^T, components kept per task) of TSV-M's construction."""
    k = min(deltas[0].shape) // len(deltas)
    us, ss, vhs = [], [], []
    for delta in deltas:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        keep = s[:k] > _tolerance(s, tuple(delta.shape))
        us.append(u[:, :k][:, keep])
        ss.append(s[:k][keep])
        vhs.append(vh[:k][keep])
    singular = torch.cat(ss)
    counts = [len(s) for s in ss]
    if singular.numel() == 0:
        return torch.empty(0), singular, torch.empty(0), counts
    return polar_factor(torch.cat(us, dim=1)), singular, polar_factor(torch.cat(vhs, dim=0)), counts


def merge_tsv(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: TaskVectorParams,
    models: list[TsvModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return the TSV-M merge (2-D) or the weighted mean of task vectors (other tensors).

    Cost: the SVDs of :func:`tsv_matrix`, or the mean in the first expert's buffer when
    ``ctx.scratch`` (else K new task vectors).
    """
    weights = [m.weight for m in models]
    taus = task_vectors(base, experts, in_place=ctx.scratch)
    if base.dim() == 2 and min(base.shape) >= len(experts):
        deltas = [tau.mul_(w) for tau, w in zip(taus, weights, strict=True)]
        merged = tsv_matrix(deltas)
    else:
        merged = weighted_sum(taus, [w / len(experts) for w in weights], in_place=True)
    return torch.add(base, merged, alpha=params.scale, out=merged)


tsv = register(
    Method(
        name="tsv",
        fn=merge_tsv,
        params=TaskVectorParams,
        model_params=TsvModelParams,
        summary="per matrix, keep each task's top singular vectors, orthogonalise them "
        "across tasks and reconstruct (TSV-M); other tensors averaged",
        paper="Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in "
        "Model Merging (arXiv 2412.00081)",
        needs="none",
    )
)
