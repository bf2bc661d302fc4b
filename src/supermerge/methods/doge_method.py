"""``doge``: DOGE, adaptive projective gradient descent on a shared modification Delta.

Formula, per 2-D tensor (m x n, r = min(m, n)) with ``tau_i = w_i (x_i - base)`` and ``K``
experts::

    lambda_i = eta / ||tau_i||_F                    (0 for a zero task vector)
    c        = sum_i lambda_i
    tau_m(D) = sum_i lambda_i (tau_i + D)          = sum_i lambda_i tau_i + c D
    a_i      = rowwise <tau_i[r], tau_i[r] - tau_m(D)[r]>          (one number per row r)
    L(D)     = sum_i sum_r a_i[r]^2
    U~       = [U_1[:, :k] ... U_K[:, :k]],  k = floor(r / K)   (each task's top left
                                                                  singular vectors)
    S        = top floor(r / subspace) left singular vectors of U~  (the shared subspace)
    D_0 = 0,  D_t+1 = Adam(D_t, (I - S S^T) grad L(D_t), lr)    for t < steps
    merged   = base + sum_i lambda_i * mask_i * (tau_i + D_steps)
    mask_i   = the round(density * m n) largest |tau_i| (ties: lowest index first)

Each row of ``tau_i`` stands in for task i's inputs to that output (data-free), so
``a_i[r]`` is the first-order gap between the merged and the fine-tuned model on them; the
gradient is kept out of the subspace the tasks share so that Delta resolves conflicts
without changing the shared knowledge. The coefficients ``lambda_i`` act as per-task
learning rates: each task's update is normalised to the norm ``eta``.

Every other tensor (0-d, 1-D, 3-D and up) is averaged: ``merged = base + sum_i tau_i / K``.
The reference code merges only the encoder's weight matrices and leaves every other tensor
at the base; averaging them is this library's convention for the subspace methods.

Paper: Wei, Tang, Shen, Hu, Yuan & Cao 2025, "Modeling Multi-Task Model Merging as Adaptive
Projective Gradient Descent" (ICML 2025, arXiv 2501.01230). Only the paper's abstract could
be read here; the formula above, and the defaults, follow the authors' released
configuration in FusionBench (``doge_ta``, by a co-author): ``eta`` 0.07, ``subspace`` 6,
``density`` 0.3 (K: 30), Adam with ``lr`` 1e-4 for ``steps`` 400 per layer, lambda_i per
layer (here: per tensor).

Guards and choices:

* a zero task vector gets ``lambda_i = 0`` (the reference code divides by its zero norm):
  it contributes nothing; all task vectors zero gives the base;
* numerically-zero singular components are not taken into ``U~`` (their directions are
  arbitrary); with ``k = 0`` (r < K) or ``floor(r / subspace) = 0`` nothing is projected;
* the gradient is computed in closed form, ``-2 c sum_i a_i[r] tau_i[r]`` per row, and the
  projection as ``S (S^T g)``, never an m x m matrix; Adam is torch's update
  (:func:`~supermerge.methods.primitives.adam_`), deterministic;
* a per-model ``weight`` scales that task's matrix before everything.

By the paper's definition one expert gives ``base + lambda_1 mask_1 (tau_1 + D)``, itself
when ``eta = ||tau_1||`` and ``density = 1`` (the gradient at D = 0 is then exactly 0);
K copies of one expert give it back when ``eta = ||tau||/K`` (sum of coefficients 1).
Cost per matrix: K + 1 thin SVDs, then per step about 2 K m n multiply-adds plus
``2 m n floor(r / subspace)`` for the projection; measured on one CPU thread with K = 8
and the defaults: about 8 s for a 384 x 1536 matrix (1 s of it the SVDs). mergekit has
no DOGE.
"""

from __future__ import annotations

import torch
from pydantic import Field

from supermerge.methods.primitives import (
    Density,
    Weight,
    adam_,
    keep_count,
    nonzero_svd,
    task_vectors,
    top_k_mask,
    weighted_sum,
)
from supermerge.methods.registry import Method, ModelParams, Params, TensorContext, register


class DogeParams(Params):
    """Global parameters of ``doge``."""

    eta: float = Field(
        0.07,
        ge=0.0,
        allow_inf_nan=False,
        description="lambda_i = eta / ||tau_i|| per tensor: each task's update has norm eta "
        "(0.07 in the authors' configuration)",
    )
    density: Density = Field(
        0.3, description="fraction of each task vector's largest-magnitude entries kept"
    )
    subspace: int = Field(
        6,
        ge=1,
        description="the shared subspace has floor(min(m, n) / subspace) directions; the "
        "gradient is kept out of it",
    )
    steps: int = Field(400, ge=0, le=100_000, description="Adam steps on each matrix")
    lr: float = Field(1e-4, gt=0.0, allow_inf_nan=False, description="Adam learning rate")


class DogeModelParams(ModelParams):
    """Per-model parameters of ``doge``."""

    weight: Weight = Field(1.0, description="scales this model's task vector before the merge")


def shared_subspace(deltas: list[torch.Tensor], divisor: int) -> torch.Tensor:
    """Return an m x s orthonormal basis of the tasks' shared left subspace (s may be 0).

    Each task's top ``floor(r / K)`` left singular vectors are concatenated and the top
    ``floor(r / divisor)`` left singular vectors of the concatenation kept. Cost: K + 1 thin
    SVDs.
    """
    r = min(deltas[0].shape)
    k = r // len(deltas)
    columns = [nonzero_svd(d)[0][:, :k] for d in deltas]
    stacked = torch.cat(columns, dim=1)
    if stacked.shape[1] == 0:
        return stacked
    return nonzero_svd(stacked)[0][:, : r // divisor]


def doge_modification(
    deltas: list[torch.Tensor], lambdas: list[float], params: DogeParams
) -> torch.Tensor:
    """Return DOGE's Delta: ``params.steps`` projected Adam steps from 0.

    Cost: :func:`shared_subspace` and per step about 2 K m n + 2 m n s multiply-adds.
    """
    modification = torch.zeros_like(deltas[0])
    total = sum(lambdas)
    if params.steps == 0 or total == 0:
        return modification
    basis = shared_subspace(deltas, params.subspace)
    start = weighted_sum(deltas, lambdas)  # sum_i lambda_i tau_i
    # a_i = <tau_i, tau_i - start> - c <tau_i, D> per row: the first part is fixed
    fixed = [torch.linalg.vecdot(tau, tau - start, dim=1) for tau in deltas]

    def gradient(d: torch.Tensor) -> torch.Tensor:
        grad = torch.zeros_like(d)
        for tau, part in zip(deltas, fixed, strict=True):
            rows = torch.linalg.vecdot(tau, d, dim=1).mul_(-total).add_(part)
            grad.addcmul_(rows.unsqueeze(1), tau, value=-2.0 * total)
        if basis.shape[1]:
            grad.sub_(basis @ (basis.T @ grad))
        return grad

    return adam_(modification, gradient, params.steps, params.lr)


def merge_doge(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: DogeParams,
    models: list[DogeModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return the DOGE merge (2-D) or the weighted mean of task vectors (other tensors).

    Cost: :func:`doge_modification` and K top-k masks for a matrix; otherwise the mean, in
    the first expert's buffer when ``ctx.scratch`` (else K new task vectors).
    """
    weights = [m.weight for m in models]
    taus = task_vectors(base, experts, in_place=ctx.scratch)
    if base.dim() != 2:
        merged = weighted_sum(taus, [w / len(experts) for w in weights], in_place=True)
        return merged.add_(base)
    deltas = [tau.mul_(w) for tau, w in zip(taus, weights, strict=True)]
    norms = [float(torch.linalg.vector_norm(d.double())) for d in deltas]
    lambdas = [params.eta / n if n > 0 else 0.0 for n in norms]
    modification = doge_modification(deltas, lambdas, params)
    merged = base.clone()
    count = keep_count(params.density, base.numel())
    for delta, lam in zip(deltas, lambdas, strict=True):
        if lam == 0:
            continue
        kept = top_k_mask(delta, count)
        merged.add_(torch.where(kept, delta + modification, 0.0), alpha=lam)
    return merged


doge = register(
    Method(
        name="doge",
        fn=merge_doge,
        params=DogeParams,
        model_params=DogeModelParams,
        summary="per matrix, a shared modification of the task vectors found by projected "
        "Adam outside the tasks' shared subspace, coefficients eta/||tau_i||, top-k kept "
        "(DOGE); other tensors averaged",
        paper="Wei et al. 2025, Modeling Multi-Task Model Merging as Adaptive Projective "
        "Gradient Descent (arXiv 2501.01230)",
        needs="none",
    )
)
