"""``ties``: TIES-Merging, trim, elect sign, disjoint merge.

Formula, per tensor, with ``tau_i = x_i - base``::

    t_i    = trim(tau_i, density_i)              keep the round(density_i * n) largest |tau_i|
    gamma  = sign(sum_i t_i)                      elected sign (summed mass), unweighted
    A      = {i : sign(t_i) = gamma}              per entry
    merged = base + lambda * sum_{i in A} w_i t_i / sum_{i in A} w_i

Paper: Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models"
(arXiv 2306.01708). With uniform weights this is the paper's Algorithm 1 (lambda = 1 is
the paper's recommendation without validation data; density 0.2 is its top-20%).
``trim_scope: model`` trims against each model's whole task vector, as the paper does
(the top-k of the flattened model); ``tensor`` (the default, mergekit's) trims each tensor
to its own top-k. See :mod:`supermerge.methods.primitives` for the tie rules.

Differences from the paper's reference code: it keeps ``int(d * density) + 1`` entries and
every entry tied with the threshold; it breaks an exactly-zero summed sign with the sign
of the whole model's sum. We keep exactly ``round(density * n)`` entries (tensor scope)
and leave a zero elected sign at 0 (the entry merges to 0, as the paper's equation says).

Differences from mergekit's ``ties``:

* density defaults to 0.2 here, 1.0 (no trim) in mergekit;
* mergekit elects signs on ``w_i * tau_i`` (and tests agreement on them): set
  ``sign_on_weighted: true`` for that; with positive weights only the election differs;
* mergekit turns a zero summed sign into +1; we leave it at 0;
* mergekit keeps ``int(density * n)`` entries (floor, and refuses to keep none), ties in
  argsort order; we round and keep ties lowest index first;
* ``normalize`` defaults to true in both (the disjoint weighted mean); ``rescale: true``
  scales each trimmed task vector back to its L1 norm in both (off by default);
  ``int8_mask`` is accepted and changes nothing.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from pydantic import Field

from supermerge.errors import MethodError
from supermerge.methods.primitives import (
    L1_RESCALE_NOTE,
    Density,
    GlobalMagnitudeThreshold,
    MagnitudeThresholds,
    SignConsensusParams,
    Weight,
    add_sign_consensus_,
    l1_rescaled_,
    magnitude_trim_,
    prepared_task_vectors,
    threshold_trim_,
)
from supermerge.methods.registry import Method, ModelParams, TensorContext, register


class TiesParams(SignConsensusParams):
    """Global parameters of ``ties``."""

    trim_scope: Literal["tensor", "model"] = Field(
        "tensor",
        description="trim each tensor to its own top-k (tensor) or each model's whole task "
        "vector to one global top-k (model, the paper's; costs two extra reading passes)",
    )
    rescale: bool = Field(False, description=L1_RESCALE_NOTE)


class TiesModelParams(ModelParams):
    """Per-model parameters of ``ties``."""

    weight: Weight = Field(1.0, description="this model's weight in the disjoint mean")
    density: Density = Field(
        0.2, description="fraction of the task vector's largest-magnitude entries kept"
    )


def merge_ties(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: TiesParams,
    models: list[TiesModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return the TIES merge.

    Cost: K trims (a top-k selection each, or a threshold), then the sign and one
    accumulator; in place in the experts' buffers when ``ctx.scratch``, else K new task
    vectors. The trims (one model each) and then the election (by blocks) run on up to
    ``ctx.threads`` threads.
    """
    if params.trim_scope == "model":
        trims = [partial(threshold_trim_, threshold=t) for t in _thresholds(ctx, len(experts))]
    else:
        trims = [partial(magnitude_trim_, density=m.density) for m in models]

    def trim(i: int, tau: torch.Tensor) -> torch.Tensor:
        return l1_rescaled_(trims[i], tau) if params.rescale else trims[i](tau)

    trimmed = list(prepared_task_vectors(base, experts, trim, in_place=ctx.scratch,
                                         threads=ctx.threads))
    return add_sign_consensus_(base, trimmed, models, params, threads=ctx.threads)


def _thresholds(ctx: TensorContext, count: int) -> tuple[float, ...]:
    stat = ctx.statistic
    if not isinstance(stat, MagnitudeThresholds) or len(stat.thresholds) != count:
        raise MethodError(
            "ties with trim_scope: model needs the whole-model magnitude thresholds",
            tensor=ctx.name or None,
            fix="run the merge through the engine (or Method.__call__), which computes them",
        )
    return stat.thresholds


def model_threshold_statistic(
    params: TiesParams, models: list[TiesModelParams]
) -> GlobalMagnitudeThreshold | None:
    """Return the whole-model threshold statistic for ``trim_scope: model``, else None."""
    if params.trim_scope != "model":
        return None
    return GlobalMagnitudeThreshold([m.density for m in models])


ties = register(
    Method(
        name="ties",
        fn=merge_ties,
        params=TiesParams,
        model_params=TiesModelParams,
        summary="trim task vectors to their top-k, elect signs, average the agreeing ones",
        paper="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models "
        "(arXiv 2306.01708)",
        needs="none",
        statistic=model_threshold_statistic,
    )
)
