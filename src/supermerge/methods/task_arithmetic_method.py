"""``task_arithmetic``: add a weighted sum of task vectors to the base.

Formula, per tensor, with ``tau_i = x_i - base``::

    merged = base + lambda * sum_i w_i tau_i

Paper: Ilharco et al. 2023, "Editing Models with Task Arithmetic" (arXiv 2212.04089).
Negative weights subtract a task (the paper's "forgetting via negation").

Differences from mergekit's ``task_arithmetic``: none by default. mergekit also accepts
``normalize: true`` (divide by the sum of the weights); here use weights that sum to 1,
or ``linear``, which is the same merge when the weights are normalised.
"""

from __future__ import annotations

import torch
from pydantic import Field

from supermerge.methods.primitives import TaskVectorParams, Weight, task_vectors, weighted_sum
from supermerge.methods.registry import Method, ModelParams, TensorContext, register


class TaskArithmeticModelParams(ModelParams):
    """Per-model parameters of ``task_arithmetic``."""

    weight: Weight = Field(
        1.0, description="coefficient of this model's task vector (negative: subtract it)"
    )


def merge_task_arithmetic(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: TaskVectorParams,
    models: list[TaskArithmeticModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return ``base + lambda * sum_i w_i (x_i - base)``.

    Cost: 2K + 1 passes; in the first expert's buffer when ``ctx.scratch``, else one new
    tensor at a time besides the sum.
    """
    taus = task_vectors(base, experts, in_place=ctx.scratch)
    total = weighted_sum(taus, [m.weight for m in models], in_place=True)
    return torch.add(base, total, alpha=params.scale, out=total)


task_arithmetic = register(
    Method(
        name="task_arithmetic",
        fn=merge_task_arithmetic,
        params=TaskVectorParams,
        model_params=TaskArithmeticModelParams,
        summary="base + lambda * weighted sum of task vectors",
        paper="Ilharco et al. 2023, Editing Models with Task Arithmetic (arXiv 2212.04089)",
        needs="none",
    )
)
