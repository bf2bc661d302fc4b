"""``passthrough``: return the one input model's tensor unchanged.

Useful to copy a model through the engine (re-shard, convert dtype, write a model card).
Method: mergekit's ``passthrough`` (Goddard et al. 2024, arXiv 2403.13257). Difference:
mergekit's passthrough also stacks layer slices (frankenmerges) and takes a ``scale``;
here it takes exactly one model and no parameter.
"""

from __future__ import annotations

import torch

from supermerge.methods.primitives import UnweightedModelParams
from supermerge.methods.registry import Method, Params, TensorContext, register


def merge_passthrough(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    params: Params,
    models: list[UnweightedModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return the single expert itself. Cost: nothing."""
    return experts[0]


passthrough = register(
    Method(
        name="passthrough",
        fn=merge_passthrough,
        params=Params,
        model_params=UnweightedModelParams,
        summary="return the single input model unchanged",
        paper="mergekit's passthrough (arXiv 2403.13257)",
        needs="none",
        needs_base=False,
        min_models=1,
        max_models=1,
    )
)
