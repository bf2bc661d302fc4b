"""``task_arithmetic``: add a weighted sum of task vectors to the base.

Formula, per tensor, with ``tau_i = x_i - base``::

    merged = base + lambda * sum_i w_i tau_i

Paper: Ilharco et al. 2023, "Editing Models with Task Arithmetic" (arXiv 2212.04089).
Negative weights subtract a task (the paper's "forgetting via negation").

``normalize: true`` divides the weighted sum by the sum of the weights (mergekit's option
of the same name, off by default in both; skipped when the weights sum to less than 1e-8
in magnitude, as mergekit does); ``int8_mask`` is accepted and changes nothing.

Differences from mergekit's ``task_arithmetic``: none.
"""

from __future__ import annotations

import torch
from pydantic import Field

from supermerge.methods.primitives import (
    Weight,
    WeightNormalizeParams,
    normalized_weights,
    task_vectors,
    weighted_sum,
)
from supermerge.methods.registry import Method, ModelParams, TensorContext, register


class TaskArithmeticModelParams(ModelParams):
    """Per-model parameters of ``task_arithmetic``."""

    weight: Weight = Field(
        1.0, description="coefficient of this model's task vector (negative: subtract it)"
    )


def merge_task_arithmetic(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: WeightNormalizeParams,
    models: list[TaskArithmeticModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return ``base + lambda * sum_i w_i (x_i - base)`` (divided by ``sum_i w_i`` when
    ``normalize``).

    Cost: 2K + 1 passes; in the first expert's buffer when ``ctx.scratch``, else one new
    tensor at a time besides the sum.
    """
    taus = task_vectors(base, experts, in_place=ctx.scratch)
    weights = normalized_weights([m.weight for m in models], params.normalize)
    total = weighted_sum(taus, weights, in_place=True)
    return torch.add(base, total, alpha=params.scale, out=total)


def task_arithmetic_coefficients(params: WeightNormalizeParams,
                                 models: list[TaskArithmeticModelParams]) -> list[float]:
    """Return each task vector's coefficient: ``lambda * w_i`` (over ``sum_i w_i`` when
    ``normalize``), as :func:`merge_task_arithmetic` applies them."""
    weights = normalized_weights([m.weight for m in models], params.normalize)
    return [params.scale * w for w in weights]


task_arithmetic = register(
    Method(
        name="task_arithmetic",
        fn=merge_task_arithmetic,
        params=WeightNormalizeParams,
        model_params=TaskArithmeticModelParams,
        summary="base + lambda * weighted sum of task vectors",
        paper="Ilharco et al. 2023, Editing Models with Task Arithmetic (arXiv 2212.04089)",
        needs="none",
        linear_coefficients=task_arithmetic_coefficients,
    )
)
