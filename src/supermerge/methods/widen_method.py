"""``widen``: WIDEN, weight disentanglement into magnitudes and directions, ranked importance.

Formula, per tensor of 2 or more dimensions (viewed as ``W = shape[0] x rest``, one column
per input) with ``tau_i = w_i (x_i - base)`` and ``W_i = base + tau_i``::

    m_i[j]   = ||W_i[:, j]||,   m_0[j] = ||base[:, j]||                 column magnitudes
    dM_i[j]  = |m_i[j] - m_0[j]|
    dD_i[j]  = 1 - cos(W_i[:, j], base[:, j])                          direction change
    R(d)[j]  = rank of d[j] among d's columns (ascending, ties lowest index first) / n
    S(x)_i[j]= softmax_i(x_i[j])        over the K models, then
               S(x)_i[j] = s  where x_i[j] > t * mean_j(x_i[j])         score calibration
    weight_i = (S(R(dM))_i + S(R(dD))_i) / 2                            one per column
    merged   = base + lambda * sum_i weight_i[j] * tau_i[:, j]

A 0-d or 1-D tensor (biases, norms) is scored entrywise on its raw change:
``merged = base + lambda * sum_i S(|tau|)_i * tau_i`` (no ranking), as in the reference code.

Paper: Yu, Yu, Yu, Huang & Li 2024, "Extend Model Merging from Fine-Tuned to Pre-Trained
Large Language Models via Weight Disentanglement" (arXiv 2408.03092). Ranking each model's
changes within itself makes models whose changes differ in scale (a chat model and a
further pre-trained one) comparable. Defaults are the reference code's: ``threshold`` t =
1.0 (the paper's above-average ratio) and ``calibration`` s = 1.0 (the paper's score
calibration value); ``lambda`` 1.

Differences from the reference code: it transposes token embedding matrices (one column per
token) by parameter name; this per-tensor function sees no names and ranks every matrix's
dim-1 columns. Tensors of 3 or more dimensions (convolutions), which the reference code does
not accept, are viewed as ``shape[0] x rest``. A column that is zero in the base and the
expert has direction change 1 (cosine 0) instead of NaN; zero task vectors give the base.

By the paper's definition one expert gets weight 1 everywhere (softmax of one score, or
``s``) and is returned; K copies of one expert get ``1/K`` each on the columns below the
threshold (the expert) and ``s`` each above it (``base + K s tau`` there: with
``calibration`` 1/K the expert everywhere). A per-model ``weight`` scales that model's task
vector before everything. Cost: a few passes over the K task vectors, K column norms and
dot products, and two sorts of n column scores per model; no SVD. mergekit has no WIDEN.
"""

from __future__ import annotations

import torch
from pydantic import Field

from supermerge.methods.primitives import TaskVectorParams, Weight, task_vectors
from supermerge.methods.registry import Method, ModelParams, TensorContext, register


class WidenParams(TaskVectorParams):
    """Global parameters of ``widen``."""

    threshold: float = Field(
        1.0,
        ge=0.0,
        allow_inf_nan=False,
        description="t: a score above t times the model's mean score is calibrated to s",
    )
    calibration: float = Field(
        1.0,
        allow_inf_nan=False,
        description="s: the importance given to the scores above the threshold",
    )


class WidenModelParams(ModelParams):
    """Per-model parameters of ``widen``."""

    weight: Weight = Field(1.0, description="scales this model's task vector before the merge")


def rank_fraction(scores: torch.Tensor) -> torch.Tensor:
    """Return each entry's ascending rank along dim 1 divided by its length (in [0, 1)).

    Ties rank lowest index first (a stable sort). Cost: one stable sort per row.
    """
    order = torch.sort(scores, dim=1, stable=True).indices
    steps = torch.arange(scores.shape[1], dtype=scores.dtype) / scores.shape[1]
    return torch.empty_like(scores).scatter_(1, order, steps.expand_as(scores))


def importance(scores: torch.Tensor, threshold: float, calibration: float) -> torch.Tensor:
    """Return WIDEN's importance of K x n ``scores``: softmax over the K models, set to
    ``calibration`` where a score exceeds ``threshold`` times its model's mean score.
    """
    above = scores > scores.mean(dim=1, keepdim=True) * threshold
    return torch.softmax(scores, dim=0).masked_fill_(above, calibration)


def merge_widen(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: WidenParams,
    models: list[WidenModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return the WIDEN merge.

    Cost: K column norms and column dot products (or entrywise magnitudes for 0-d and 1-D
    tensors), two stable sorts per model and one weighted sum; in the experts' buffers when
    ``ctx.scratch``, else K new task vectors.
    """
    taus = [tau.mul_(m.weight) for tau, m in
            zip(task_vectors(base, experts, in_place=ctx.scratch), models, strict=True)]
    t, s = params.threshold, params.calibration
    if base.dim() < 2:
        flat = torch.stack([tau.reshape(-1) for tau in taus])
        weights = importance(flat.abs(), t, s).view(len(taus), *base.shape)
    else:
        base2 = base.reshape(base.shape[0], -1)
        norm0 = torch.linalg.vector_norm(base2, dim=0)
        magnitude, direction = [], []
        for tau in taus:
            tuned = base2 + tau.reshape(base2.shape)
            magnitude.append((torch.linalg.vector_norm(tuned, dim=0) - norm0).abs_())
            direction.append(1 - torch.cosine_similarity(tuned, base2, dim=0))
        weights = (importance(rank_fraction(torch.stack(magnitude)), t, s)
                   + importance(rank_fraction(torch.stack(direction)), t, s)) / 2
        weights = weights.unsqueeze(1)  # K x 1 x columns, broadcast over rows
    merged = torch.zeros_like(base)
    for tau, weight in zip(taus, weights, strict=True):
        shaped = tau.reshape(base.shape[0], -1) if base.dim() >= 2 else tau
        merged.add_(shaped.mul_(weight).view(base.shape))
    return merged.mul_(params.scale).add_(base)


widen = register(
    Method(
        name="widen",
        fn=merge_widen,
        params=WidenParams,
        model_params=WidenModelParams,
        summary="per column, weights from the within-model ranks of the magnitude and "
        "direction changes, softmax across models and calibrated (WIDEN)",
        paper="Yu et al. 2024, Extend Model Merging from Fine-Tuned to Pre-Trained Large "
        "Language Models via Weight Disentanglement (arXiv 2408.03092)",
        needs="none",
    )
)
