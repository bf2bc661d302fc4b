"""``tall_masks``: TALL masks, one task-arithmetic model plus a bit mask per task.

Formula, per tensor, with ``tau_t = x_t - base``::

    tau_MTL = lambda * sum_t w_t tau_t                     the multi-task vector
    shared  = base + tau_MTL                               task arithmetic, serves every task
    m_t     = |tau_t| >= lambda_t * |tau_MTL - tau_t|      TALL mask of task t
    theta_t = base + m_t * tau_MTL                         task t's model (needs the task id)

Paper: Wang, Dimitriadis, Ortiz-Jimenez, Fleuret & Frossard 2024, "Localizing Task
Information for Improved Model Merging and Compression" (arXiv 2405.07813). The mask marks
where the fine-tuned model theta_t is at least ``lambda_t`` times closer to the multi-task
model ``theta_MTL = base + tau_MTL`` than to the base (``|theta_0 - theta_t| >= lambda_t
|theta_MTL - theta_t|``); applying it to ``tau_MTL`` retrieves the task's model from the
multi-task one, which the paper uses to compress K checkpoints into one model and K bit
masks. ``tall_lambda = 0`` keeps every entry (theta_t is the shared model).

The result is not one model: the engine writes the shared model and the K masks (1 bit per
entry) beside it, and :func:`supermerge.engine.task_state.load_task_state` rebuilds task
t's model from them. The mask is :func:`supermerge.methods.primitives.tall_masks`, the one
Consensus merging counts.

Defaults: ``lambda = 1`` and unit weights, the paper's ``tau_MTL = sum_t tau_t`` (the
paper retrieves from the unscaled sum); ``tall_lambda = 0.4``, the middle of the paper's
validation grid {0.2, ..., 0.6} (the paper picks it per task on validation data; set it per
model here). With ``lambda != 1`` the masks compare against, and retrieve from, the scaled
multi-task model, so the shared model, the masks and the retrieved models all refer to the
one ``theta_MTL`` (the Consensus method instead masks the unscaled sum, then scales).

Differences from the reference code (and FusionBench): they test the mask with a strict
``>``, which drops entries where both sides are 0 even at lambda 0; they can also build
``tau_MTL`` with TIES (not offered here). mergekit has no TALL masks.
"""

from __future__ import annotations

import torch
from pydantic import Field

from supermerge.methods import primitives
from supermerge.methods.primitives import (
    TallModelParams,
    TaskVectorParams,
    task_vectors,
    weighted_sum,
)
from supermerge.methods.registry import (
    Method,
    TaskSpecific,
    TensorContext,
    register,
)


class TallMasksParams(TaskVectorParams):
    """Global parameters of ``tall_masks``."""

    scale: float = Field(
        1.0,
        alias="lambda",
        allow_inf_nan=False,
        description="lambda: multiplies the summed task vectors into tau_MTL, the shared "
        "model's task vector and the one the masks retrieve from (1 in the paper)",
    )


def merge_tall_masks(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: TallMasksParams,
    models: list[TallModelParams],
    ctx: TensorContext,
) -> TaskSpecific:
    """Return ``base + tau_MTL`` with each task's TALL mask and scale 1.

    Cost: K task vectors (in place on the experts when ``ctx.scratch``), one accumulator,
    K boolean masks.
    """
    taus = list(task_vectors(base, experts, in_place=ctx.scratch))
    multi_task = weighted_sum(taus, [m.weight * params.scale for m in models])
    masks = list(primitives.tall_masks(taus, [m.tall_lambda for m in models], multi_task))
    return TaskSpecific(shared=multi_task.add_(base), masks=masks, scales=(1.0,) * len(taus))


tall_masks = register(
    Method(
        name="tall_masks",
        fn=merge_tall_masks,
        params=TallMasksParams,
        model_params=TallModelParams,
        summary="task arithmetic plus one TALL bit mask per task; evaluated with the task id, "
        "each task retrieves its masked part of the multi-task vector",
        paper="Wang et al. 2024, Localizing Task Information for Improved Model Merging "
        "and Compression (arXiv 2405.07813)",
        needs="task id",
        per_task=True,
    )
)
