"""``iso_cts``: Isotropic merging in common and task-specific subspaces (Iso-CTS).

Formula, per 2-D tensor (m x n, r = min(m, n)) with ``tau_i = w_i (x_i - base)`` and
``K`` experts::

    s        = floor((r - floor(f * r)) / K)        task-specific directions per task
    k        = r - K * s                             common directions
    M        = sum_i tau_i = U S V^T                 the common subspace: top k of the sum
    tau_i'   = tau_i - U_k U_k^T tau_i               each task without the common subspace
    tau_i'   = U_i S_i V_i^T                         its top s directions
    U~ = [U_k U_1[:, :s] ... U_K[:, :s]],   S~ = [S_k S_1[:s] ... S_K[:s]],   V~ likewise
    U_perp   = P_U Q_U^T  where U~ = P_U Sigma Q_U^T      (polar factor, as in TSV)
    V_perp   = P_V Q_V^T  where V~ = P_V Sigma Q_V^T
    merged   = base + lambda * mean(S~) * U_perp V_perp^T

Every other tensor (0-d, 1-D, 3-D and up) is averaged:
``merged = base + lambda * sum_i tau_i / K``, as in the reference code. When ``s = 0``
(fewer directions than tasks left over) this is Iso-C (:mod:`iso_c_method`).

Paper: Marczak, Magistri, Cygert, Twardowski, Bagdanov & van de Weijer 2025, "No Task Left
Behind: Isotropic Model Merging with Common and Task-Specific Subspaces" (ICML 2025,
arXiv 2502.04959), Iso-CTS: the least significant directions of the summed task matrix are
replaced by each task's most significant directions outside the common subspace, the
concatenated bases are orthogonalised, and the spectrum is flattened as in Iso-C. The
defaults are the paper's: ``common_fraction`` f = 0.8, ``lambda`` (its alpha) 1.0 (the paper
picks alpha on validation data; 1.0 is FusionBench's default and needs none).

Choices where the reference code differs or is silent:

* the reference code rounds ``(r - floor(f r)) / K`` to the nearest integer; here it is
  floored, so the common subspace never shrinks below ``floor(f r)`` (rounding up can make
  it negative for small r);
* numerically-zero singular components (of the sum, or of a projected task) are left out,
  and the polar factors keep only their non-zero components (:func:`~supermerge.methods.
  tsv_method.polar_factor`): duplicated or collinear directions (identical experts) are not
  completed with arbitrary ones. For full-rank, linearly independent factors (the usual
  case) this is the reference computation; all task vectors zero gives the base.
  K copies of one expert therefore do not give it back: their task-specific directions
  coincide and count once;
* a per-model ``weight`` scales that task's matrix (weight 1: the paper).

One expert (K = 1) gives Iso-C of its own matrix: its task-specific directions are the rest
of its own spectrum. Cost per matrix: K + 3 thin SVDs (the sum, K projected tasks, the two
concatenations) and K m x k x n projections, float32. FusionBench's ``iso_cts`` is the
reference code; mergekit has no Iso-CTS.
"""

from __future__ import annotations

import torch
from pydantic import Field

from supermerge.methods.iso_c_method import IsoModelParams, isotropic
from supermerge.methods.primitives import (
    TaskVectorParams,
    nonzero_svd,
    task_vectors,
    weighted_sum,
)
from supermerge.methods.registry import Method, TensorContext, register
from supermerge.methods.tsv_method import polar_factor


class IsoCtsParams(TaskVectorParams):
    """Global parameters of ``iso_cts``."""

    common_fraction: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="fraction f of the r = min(m, n) directions kept from the summed task "
        "matrix (the common subspace); the rest is shared equally among the tasks",
    )


def iso_cts_matrix(deltas: list[torch.Tensor], common_fraction: float) -> torch.Tensor:
    """Return Iso-CTS's ``mean(S~) U_perp V_perp^T`` of 2-D task matrices.

    Cost: K + 3 thin SVDs and K projections on the common subspace.
    """
    r, count = min(deltas[0].shape), len(deltas)
    per_task = (r - int(common_fraction * r)) // count
    u, s, vh = nonzero_svd(weighted_sum(deltas, [1.0] * count))
    common = r - count * per_task
    if per_task == 0:
        return isotropic(u, s, vh)
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    for delta in deltas:
        outside = delta - us[0] @ (us[0].T @ delta)
        u_i, s_i, vh_i = nonzero_svd(outside)
        us.append(u_i[:, :per_task])
        ss.append(s_i[:per_task])
        vhs.append(vh_i[:per_task])
    singular = torch.cat(ss)
    if singular.numel() == 0:
        return torch.zeros_like(deltas[0])
    return isotropic(polar_factor(torch.cat(us, 1)), singular, polar_factor(torch.cat(vhs, 0)))


def merge_iso_cts(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: IsoCtsParams,
    models: list[IsoModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return the Iso-CTS merge (2-D) or the weighted mean of task vectors (other tensors).

    Cost: :func:`iso_cts_matrix` and one new tensor for the sum, or the mean in the first
    expert's buffer when ``ctx.scratch`` (else K new task vectors).
    """
    weights = [m.weight for m in models]
    taus = task_vectors(base, experts, in_place=ctx.scratch)
    if base.dim() == 2:
        deltas = [tau.mul_(w) for tau, w in zip(taus, weights, strict=True)]
        merged = iso_cts_matrix(deltas, params.common_fraction)
    else:
        merged = weighted_sum(taus, [w / len(experts) for w in weights], in_place=True)
    return torch.add(base, merged, alpha=params.scale, out=merged)


iso_cts = register(
    Method(
        name="iso_cts",
        fn=merge_iso_cts,
        params=IsoCtsParams,
        model_params=IsoModelParams,
        summary="per matrix, the summed task matrix's top directions plus each task's own "
        "top directions outside them, orthogonalised, with a flat spectrum (Iso-CTS); "
        "other tensors averaged",
        paper="Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common "
        "and Task-Specific Subspaces (arXiv 2502.04959)",
        needs="none",
    )
)
