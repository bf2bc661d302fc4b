"""``magmax``: MagMax, per entry the task-vector value of the largest magnitude.

Formula, per tensor, with ``u_i = w_i (x_i - base)``::

    i*(j)  = argmax_i |u_i[j]|            ties: the later model wins
    merged = base + lambda * u_{i*(j)}[j]

Paper: Marczak, Twardowski, Trzcinski & Cygert 2024, "MagMax: Leveraging Model Merging for
Seamless Continual Learning" (ECCV 2024, arXiv 2407.06322). The paper applies it to the
task vectors of sequentially fine-tuned models; the rule itself is per entry and needs no
order. Sign is kept: the selected entry may be negative.

Defaults: ``lambda = 0.5``, the value of the official 8-dataset reproduction script (and
FusionBench's default); weights 1 (the paper is unweighted: a weight scales that model's
task vector before the selection, so weight 0 removes a model).

Differences: ties in magnitude (e.g. ``+a`` and ``-a``) go to the later model, as in the
official code (``>=`` while folding left to right) and FusionBench. mergekit has no MagMax.
"""

from __future__ import annotations

import torch
from pydantic import Field

from supermerge.methods.primitives import TaskVectorParams, Weight, blocks, task_vectors
from supermerge.methods.registry import Method, ModelParams, TensorContext, register


class MagMaxParams(TaskVectorParams):
    """Global parameters of ``magmax``."""

    scale: float = Field(
        0.5,
        alias="lambda",
        allow_inf_nan=False,
        description="lambda: multiplies the selected task vector before it is added to the "
        "base (0.5 in the paper's script)",
    )


class MagMaxModelParams(ModelParams):
    """Per-model parameters of ``magmax``."""

    weight: Weight = Field(
        1.0, description="scales this model's task vector before the per-entry selection"
    )


def merge_magmax(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: MagMaxParams,
    models: list[MagMaxModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return ``base + lambda * (entry of largest magnitude)``.

    Cost: K passes, by blocks; in the first expert's buffer when ``ctx.scratch``, else one
    new tensor at a time besides the selection.
    """
    selected: torch.Tensor | None = None
    for tau, m in zip(task_vectors(base, experts, in_place=ctx.scratch), models, strict=True):
        u = tau.mul_(m.weight)
        if selected is None:
            selected = u
            continue
        for u_part, part in blocks(u, selected):
            torch.where(u_part.abs() >= part.abs(), u_part, part, out=part)
    assert selected is not None  # the registry guarantees at least one expert
    return torch.add(base, selected, alpha=params.scale, out=selected)


magmax = register(
    Method(
        name="magmax",
        fn=merge_magmax,
        params=MagMaxParams,
        model_params=MagMaxModelParams,
        summary="per entry, the task-vector value of the largest magnitude",
        paper="Marczak et al. 2024, MagMax (arXiv 2407.06322)",
        needs="none",
    )
)
