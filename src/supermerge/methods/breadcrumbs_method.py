"""``breadcrumbs``: Model Breadcrumbs, drop the outliers and the small entries, then add.

Formula, per tensor, with ``tau_i = x_i - base`` of ``n`` entries ranked by ``|tau_i|``
from the largest (ties: the lower flat index ranks higher)::

    top_i  = min(round(gamma_i * n), n - k_i)     outliers dropped
    k_i    = round(density_i * n)                 kept: ranks top_i + 1 ... top_i + k_i
    b_i    = tau_i on the kept ranks, 0 elsewhere (the smallest entries are dropped too)
    merged = base + lambda * sum_i w_i b_i

Paper: Davari & Belilovsky 2023, "Model Breadcrumbs: Scaling Multi-Task Model Merging with
Sparse Masks" (arXiv 2312.06795): per layer, mask out the largest-magnitude entries of each
task vector (outliers) and the smallest (negligible perturbations), then task arithmetic.
``density`` is the fraction of *all* entries kept, ``gamma`` the fraction removed at the top
(the paper's and mergekit's parametrisation). ``gamma = 0`` is a magnitude top-k, i.e.
task arithmetic on TIES-trimmed vectors without the sign election.

Defaults are choices, not the paper's (which tunes both per benchmark): ``density`` 0.9 and
``gamma`` 0.01 (mergekit's default gamma and its example recipes), ``lambda`` 1.0 as for
``task_arithmetic`` (the reference code's default multiplier is 0.4).

Differences:

* the reference code masks each *row* (the last dimension) of a tensor, removing
  ``int(gamma * row)`` then keeping ``int(density * row)``; we rank the whole tensor (the
  paper's "layer-wise", mergekit's choice) and round;
* mergekit's ``magnitude_outliers`` slices ``indices[n_bot:-n_top]``: with ``n_top = 0``
  (``gamma: 0``, or a tensor with fewer than ``1 / gamma`` entries) that slice is empty and
  the whole task vector is dropped, silently returning the base. Here ``gamma = 0`` keeps
  the top ``density`` fraction;
* like mergekit, when ``gamma + density > 1`` the requested density wins and fewer outliers
  are removed; mergekit's ``density: 1`` skips the outlier removal entirely, ours drops
  nothing either (``top = n - k = 0``);
* mergekit's ``normalize`` (divide by the summed weights) and ``rescale`` (scale each
  masked task vector back to its L1 norm) mean what they mean there, off by default in
  both; ``int8_mask`` is accepted and changes nothing.
"""

from __future__ import annotations

from functools import partial

import torch
from pydantic import Field

from supermerge.methods.primitives import (
    L1_RESCALE_NOTE,
    Density,
    Weight,
    WeightNormalizeParams,
    l1_rescaled_,
    magnitude_band_,
    normalized_weights,
    prepared_task_vectors,
    weighted_sum,
)
from supermerge.methods.registry import Method, ModelParams, TensorContext, register


class BreadcrumbsParams(WeightNormalizeParams):
    """Global parameters of ``breadcrumbs``."""

    rescale: bool = Field(False, description=L1_RESCALE_NOTE)


class BreadcrumbsModelParams(ModelParams):
    """Per-model parameters of ``breadcrumbs``."""

    weight: Weight = Field(1.0, description="coefficient of this model's masked task vector")
    density: Density = Field(
        0.9,
        description="fraction of all task-vector entries kept (ranked just below the "
        "removed outliers)",
    )
    gamma: Density = Field(
        0.01, description="fraction of the largest-magnitude entries removed as outliers"
    )


def merge_breadcrumbs(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: BreadcrumbsParams,
    models: list[BreadcrumbsModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return ``base + lambda * sum_i w_i band(tau_i)``.

    Cost: two top-k selections per model (one model per thread, up to ``ctx.threads``), a
    few temporaries while one is ranked; in place in the experts' buffers when
    ``ctx.scratch``.
    """
    def band(i: int, tau: torch.Tensor) -> torch.Tensor:
        m = models[i]
        keep = partial(magnitude_band_, density=m.density, gamma=m.gamma)
        return l1_rescaled_(keep, tau) if params.rescale else keep(tau)

    masked = prepared_task_vectors(base, experts, band, in_place=ctx.scratch,
                                   threads=ctx.threads)
    weights = normalized_weights([m.weight for m in models], params.normalize)
    total = weighted_sum(masked, weights, in_place=True)
    return torch.add(base, total, alpha=params.scale, out=total)


breadcrumbs = register(
    Method(
        name="breadcrumbs",
        fn=merge_breadcrumbs,
        params=BreadcrumbsParams,
        model_params=BreadcrumbsModelParams,
        summary="drop each task vector's largest outliers and smallest entries, then add them",
        paper="Davari & Belilovsky 2023, Model Breadcrumbs (arXiv 2312.06795)",
        needs="none",
    )
)
