"""``passthrough``: return the one input model's tensor, optionally scaled.

Formula, per tensor: ``merged = scale * x`` (``scale`` 1: the tensor itself, bit for bit).

Useful to copy a model through the engine (re-shard, convert dtype, write a model card), or,
with a per-tensor ``scale`` (a filter list), to silence or damp chosen tensors, as
mergekit's ``scale`` does; with a recipe's ``slices`` (one source each) it stacks layer
ranges (frankenmerges, depth up-scaling: :mod:`supermerge.engine.slices`). Method:
mergekit's ``passthrough`` (Goddard et al. 2024, arXiv 2403.13257). A ``weight`` is
accepted and ignored, as in mergekit.
"""

from __future__ import annotations

import torch
from pydantic import Field

from supermerge.methods.primitives import IgnoredWeightModelParams
from supermerge.methods.registry import Method, Params, TensorContext, register


class PassthroughModelParams(IgnoredWeightModelParams):
    """Per-model parameters of ``passthrough``."""

    scale: float = Field(
        1.0, allow_inf_nan=False,
        description="multiplies the tensor (mergekit's; 0 silences it, 1 copies it exactly)"
    )


def merge_passthrough(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    params: Params,
    models: list[PassthroughModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return the single expert itself, times ``scale`` unless it is 1.

    Cost: nothing, or one multiplication (in the expert's buffer when ``ctx.scratch``).
    """
    scale = models[0].scale
    if scale == 1:
        return experts[0]
    return experts[0].mul_(scale) if ctx.scratch else experts[0] * scale


passthrough = register(
    Method(
        name="passthrough",
        fn=merge_passthrough,
        params=Params,
        model_params=PassthroughModelParams,
        summary="return the single input model, optionally scaled per tensor",
        paper="mergekit's passthrough (arXiv 2403.13257)",
        needs="none",
        needs_base=False,
        min_models=1,
        max_models=1,
    )
)
