"""``linear``: the weighted average of the experts (a model soup).

Formula, per tensor::

    merged = sum_i w_i x_i / sum_i w_i        (normalize: true, the default)
    merged = sum_i w_i x_i                    (normalize: false)

Paper: Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models
improves accuracy without increasing inference time" (arXiv 2203.05482), uniform soup.

Differences from mergekit's ``linear``: none in the formula (mergekit also normalises by
default). mergekit silently skips normalisation when the weights sum to (nearly) 0; here
that is a MethodError, because a weighted *average* with no total weight has no meaning.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from supermerge.errors import MethodError
from supermerge.methods.primitives import Weight, weighted_sum
from supermerge.methods.registry import Method, ModelParams, Params, TensorContext, register


class LinearParams(Params):
    """Global parameters of ``linear``."""

    normalize: bool = Field(
        True, description="divide by the sum of the weights; false: plain weighted sum"
    )


class LinearModelParams(ModelParams):
    """Per-model parameters of ``linear``."""

    weight: Weight = Field(1.0, description="this model's share of the average")


def merge_linear(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    params: LinearParams,
    models: list[LinearModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return the (normalised) weighted sum of the experts.

    Cost: K multiply-adds, in the first expert's buffer when ``ctx.scratch``.
    """
    weights = [m.weight for m in models]
    if params.normalize:
        total = math.fsum(weights)
        if total == 0:
            raise MethodError(
                f"method 'linear' cannot normalise weights {weights}: they sum to 0",
                tensor=ctx.name or None,
                fix="use weights with a non-zero sum, or set normalize: false",
            )
        weights = [w / total for w in weights]
    return weighted_sum(experts, weights, in_place=ctx.scratch)


def linear_coefficients(params: LinearParams, models: list[LinearModelParams]
                        ) -> list[float] | None:
    """With ``normalize`` and a non-zero summed weight, the average is ``base + sum_i
    (w_i / sum w) tau_i`` for any base: return those coefficients; else None."""
    weights = [m.weight for m in models]
    total = math.fsum(weights)
    if not params.normalize or total == 0:
        return None
    return [w / total for w in weights]


linear = register(
    Method(
        name="linear",
        fn=merge_linear,
        params=LinearParams,
        model_params=LinearModelParams,
        summary="weighted average of the models (model soup)",
        paper="Wortsman et al. 2022, Model soups (arXiv 2203.05482)",
        needs="none",
        needs_base=False,
        linear_coefficients=linear_coefficients,
    )
)
