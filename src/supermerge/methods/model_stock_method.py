"""``model_stock``: Model Stock, interpolate from the base toward the experts' average.

Formula, per tensor (or per row with ``filter_wise``), with ``tau_i = x_i - base`` and
``K >= 2`` experts::

    cos    = mean over pairs i < j of <tau_i, tau_j> / (|tau_i| |tau_j|)   0 for a zero tau
    cos    = clamp(cos, 0, 1)
    t      = K cos / (1 + (K - 1) cos)                                     in [0, 1]
    merged = t * mean_i(x_i) + (1 - t) * base = base + t * mean_i(tau_i)

Paper: Jang, Yun & Han 2024, "Model Stock: All we need is just a few fine-tuned models"
(arXiv 2403.19522), eq. for ``t`` with the angle ``theta`` between fine-tuned models
(their Figure/derivation assumes every pair meets at the same angle). The paper merges per
layer (per tensor here) and states the formula with one angle; for ``K > 2`` we average the
pairwise cosines (mergekit's reading). Unweighted: ``t`` is derived from the geometry; a
``weight`` given to a model is accepted and ignored, as mergekit does.

Degenerate inputs: a task vector of zero norm makes its pairs' cosine 0; ``cos = 0`` gives
``t = 0`` (the base). Copies of one expert give ``cos = 1``, ``t = 1``: that expert.

Differences:

* negative mean cosines are clamped to 0 (``t = 0``: the base). Unclamped, the formula
  extrapolates away from the average (``t < 0``) and divides by zero at
  ``cos = -1 / (K - 1)``; mergekit and FusionBench do not clamp (FusionBench adds 1e-8 to
  the denominator);
* FusionBench averages the pairwise *angles* and takes their cosine; mergekit and we
  average the cosines (equal for K = 2);
* ``filter_wise: true`` computes ``t`` per row (``shape[0]``; 0-d and 1-D tensors are one
  row), as mergekit's option of the same name; the default is per tensor as in the paper;
* mergekit needs the base plus two models and errors otherwise, as we do (K >= 2).
"""

from __future__ import annotations

import torch
from pydantic import Field

from supermerge.errors import MethodError
from supermerge.methods.primitives import (
    BLOCK,
    IgnoredWeightModelParams,
    task_vectors,
    weighted_sum,
)
from supermerge.methods.registry import Method, Params, TensorContext, register


class ModelStockParams(Params):
    """Global parameters of ``model_stock``."""

    filter_wise: bool = Field(
        False,
        description="compute the interpolation ratio per row (shape[0]) instead of per "
        "tensor (mergekit's option)",
    )


def gram(rows: list[torch.Tensor]) -> torch.Tensor:
    """Return ``G[r, i, j] = <rows_i[r], rows_j[r]>`` in float64 for K matrices of one shape.

    Converts about ``BLOCK`` entries of each matrix to float64 at a time, so the cost is
    K^2 dot products and K blocks of temporaries, never a float64 copy of a whole tensor.
    """
    count, width = rows[0].shape
    total = torch.zeros(count, len(rows), len(rows), dtype=torch.float64, device=rows[0].device)
    step_rows, step_cols = max(1, BLOCK // width), min(width, BLOCK)
    for r in range(0, count, step_rows):
        for c in range(0, width, step_cols):
            block = torch.stack([m[r : r + step_rows, c : c + step_cols] for m in rows]).double()
            total[r : r + step_rows] += torch.einsum("irc,jrc->rij", block, block)
    return total


def interpolation_ratio(taus: list[torch.Tensor], rows: bool) -> torch.Tensor:
    """Return Model Stock's ``t`` (per row when ``rows``), a float32 column ``(R, 1)``.

    Cost: K^2 dot products, in float64 (:func:`gram`).
    """
    k = len(taus)
    width = taus[0][0].numel() if rows and taus[0].dim() >= 2 else taus[0].numel()
    dots = gram([tau.reshape(-1, width) for tau in taus])
    norms = dots.diagonal(dim1=1, dim2=2).sqrt()
    total = torch.zeros_like(norms[:, 0])
    for i in range(k):
        for j in range(i + 1, k):
            denominator = norms[:, i] * norms[:, j]
            total += torch.where(denominator > 0, dots[:, i, j] / denominator, 0.0)
    cos = (total / (k * (k - 1) / 2)).clamp(0.0, 1.0)
    t = k * cos / (1 + (k - 1) * cos)
    return t.float().unsqueeze(1)


def merge_model_stock(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: ModelStockParams,
    models: list[IgnoredWeightModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return ``base + t * mean_i(tau_i)``.

    Cost: K^2 dot products and the mean, in the first expert's buffer when ``ctx.scratch``
    (else K new task vectors).
    """
    k = len(experts)
    if k < 2:
        raise MethodError(
            f"method 'model_stock' needs at least 2 fine-tuned models, got {k}: the "
            "interpolation ratio comes from the angle between them",
            tensor=ctx.name or None,
            fix="list at least 2 models under `models:` (besides the base)",
        )
    if base.numel() == 0:
        return base.clone()
    taus = list(task_vectors(base, experts, in_place=ctx.scratch))
    t = interpolation_ratio(taus, params.filter_wise)
    mean = weighted_sum(taus, [1.0 / k] * k, in_place=True)
    step = mean.view(t.shape[0], -1).mul_(t).view(base.shape)
    return torch.add(base, step, out=step)


model_stock = register(
    Method(
        name="model_stock",
        fn=merge_model_stock,
        params=ModelStockParams,
        model_params=IgnoredWeightModelParams,
        summary="interpolate from the base toward the experts' average by a ratio set by "
        "the angle between their task vectors",
        paper="Jang et al. 2024, Model Stock (arXiv 2403.19522)",
        needs="none",
        min_models=2,
    )
)
