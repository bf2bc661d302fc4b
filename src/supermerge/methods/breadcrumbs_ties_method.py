"""``breadcrumbs_ties``: Model Breadcrumbs' masks, then TIES's sign election.

Formula, per tensor, with ``b_i`` the Breadcrumbs band of ``tau_i = x_i - base`` (see
``breadcrumbs``: the ``round(gamma_i n)`` largest magnitudes and everything below the
next ``round(density_i n)`` zeroed)::

    gamma  = sign(sum_i b_i)                      elected sign, unweighted by default
    A      = {i : sign(b_i) = gamma}              per entry
    merged = base + lambda * sum_{i in A} w_i b_i                  (normalize: false)
    merged = base + lambda * sum_{i in A} w_i b_i / sum_{i in A} w_i   (normalize: true)

Method: mergekit's ``breadcrumbs_ties`` (generalized task arithmetic with the
``magnitude_outliers`` sparsification and the ``sum`` sign consensus), combining Davari &
Belilovsky 2023, "Model Breadcrumbs" (arXiv 2312.06795) with Yadav et al. 2023,
"TIES-Merging" (arXiv 2306.01708). The band, its tie rules and its differences from
mergekit are ``breadcrumbs``'s; the election and its options (``sign_on_weighted``, a
zero summed sign merging to 0, ``rescale``) are ``ties``'s.

Defaults: ``normalize`` false, as mergekit's ``breadcrumbs_ties`` (a disjoint weighted
*sum*, as Breadcrumbs itself sums; ``ties`` and ``dare_ties`` average by default);
``rescale`` false (true: each band scaled back to its task vector's L1 norm, as mergekit);
``int8_mask`` accepted and a no-op. The per-model ``density`` (0.9) and ``gamma`` (0.01)
are ``breadcrumbs``'s, so switching between the two methods changes only the election;
mergekit's density default is 1.0, which drops nothing (not even the outliers).
"""

from __future__ import annotations

from functools import partial

import torch
from pydantic import Field

from supermerge.methods.breadcrumbs_method import BreadcrumbsModelParams
from supermerge.methods.primitives import (
    L1_RESCALE_NOTE,
    SignConsensusParams,
    add_sign_consensus_,
    l1_rescaled_,
    magnitude_band_,
    prepared_task_vectors,
)
from supermerge.methods.registry import Method, TensorContext, register


class BreadcrumbsTiesParams(SignConsensusParams):
    """Global parameters of ``breadcrumbs_ties``."""

    normalize: bool = Field(
        False,
        description="divide by the summed weight of the experts that agree with the elected "
        "sign (the disjoint mean); false (mergekit's default here): disjoint weighted sum",
    )
    rescale: bool = Field(False, description=L1_RESCALE_NOTE)


def merge_breadcrumbs_ties(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: BreadcrumbsTiesParams,
    models: list[BreadcrumbsModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return the Breadcrumbs bands merged by TIES's election.

    Cost: two top-k selections per model (and two L1 norms with ``rescale``), then the sign
    and one accumulator; in place in the experts' buffers when ``ctx.scratch``, else K new
    task vectors; on up to ``ctx.threads`` threads.
    """
    def band(i: int, tau: torch.Tensor) -> torch.Tensor:
        m = models[i]
        keep = partial(magnitude_band_, density=m.density, gamma=m.gamma)
        return l1_rescaled_(keep, tau) if params.rescale else keep(tau)

    banded = list(prepared_task_vectors(base, experts, band, in_place=ctx.scratch,
                                        threads=ctx.threads))
    return add_sign_consensus_(base, banded, models, params, threads=ctx.threads)


breadcrumbs_ties = register(
    Method(
        name="breadcrumbs_ties",
        fn=merge_breadcrumbs_ties,
        params=BreadcrumbsTiesParams,
        model_params=BreadcrumbsModelParams,
        summary="drop each task vector's outliers and smallest entries, then TIES sign "
        "election and disjoint sum",
        paper="Davari & Belilovsky 2023, Model Breadcrumbs (arXiv 2312.06795) + TIES election "
        "(arXiv 2306.01708), as mergekit's breadcrumbs_ties",
        needs="none",
    )
)
