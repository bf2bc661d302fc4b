"""``consensus``: Consensus merging, keep only the weights that at least k tasks use.

Formula, per tensor, with ``tau_t = x_t - base``::

    tau_MTL = sum_t w_t tau_t                                     task arithmetic vector
    m_t     = |tau_t| >= lambda_t * |tau_MTL - tau_t|             TALL mask of task t
    c       = [sum_t m_t >= k]                                    consensus mask
    merged  = base + lambda * (c * tau_MTL)

Paper: Wang, Dimitriadis, Ortiz-Jimenez, Fleuret & Frossard 2024, "Localizing Task
Information for Improved Model Merging and Compression" (arXiv 2405.07813). A TALL mask
marks where task t's fine-tuned weights are closer to the merged model than to the base
(by the factor ``lambda_t``); weights used by fewer than ``k`` tasks are "selfish"
(k = 2) or "catastrophic" (used by none) and are removed from the task arithmetic vector.
``k = 0`` keeps everything (task arithmetic); ``k > K`` keeps nothing (the base);
``tall_lambda = 0`` marks every weight for every task. The mask is
:func:`supermerge.methods.primitives.tall_masks`; the per-task TALL reconstruction is the
``tall_masks`` method's.

Defaults: ``k = 2`` (the paper's); ``tall_lambda = 0.4``, the middle of the paper's
validation grid {0.2, ..., 0.6} (the paper picks it per task on validation data);
``lambda = 1.0`` as for ``task_arithmetic`` (the paper reuses the scaling tuned for the
underlying merge). With weights, ``tau_MTL`` is the weighted sum and the masks still compare
each task's own (unweighted) fine-tuned weights, as ``|theta_0 - theta_t|`` versus
``|theta_MTL - theta_t|``; with unit weights this is the paper's formula.

Differences from the reference code (and FusionBench, which copies it): they test the mask
with a strict ``>``, which drops entries where both sides are 0 even at lambda 0; they
build ``tau_MTL`` from task arithmetic or TIES (Consensus TIES); here only from task
arithmetic (Consensus TIES is not offered yet). mergekit has no Consensus merging.
"""

from __future__ import annotations

import torch
from pydantic import Field

from supermerge.methods.primitives import (
    TallModelParams,
    TaskVectorParams,
    blocks,
    consensus_mask,
    tall_masks,
    task_vectors,
    weighted_sum,
)
from supermerge.methods.registry import Method, TensorContext, register


class ConsensusParams(TaskVectorParams):
    """Global parameters of ``consensus``."""

    k: int = Field(
        2,
        ge=0,
        description="keep a weight only where at least k tasks' TALL masks are set "
        "(0: task arithmetic; 2: drop selfish and catastrophic weights)",
    )


def merge_consensus(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: ConsensusParams,
    models: list[TallModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return ``base + lambda * consensus_mask * tau_MTL``.

    Cost: the sum, then the TALL masks and their count by blocks (temporaries of one
    block); K new task vectors unless ``ctx.scratch``.
    """
    taus = list(task_vectors(base, experts, in_place=ctx.scratch))
    multi_task = weighted_sum(taus, [m.weight for m in models])
    if params.k > 0:
        lambdas = [m.tall_lambda for m in models]
        for total, *parts in blocks(multi_task, *taus):
            selfish = consensus_mask(tall_masks(parts, lambdas, total), params.k).logical_not_()
            total.masked_fill_(selfish, 0.0)
    return torch.add(base, multi_task, alpha=params.scale, out=multi_task)


consensus = register(
    Method(
        name="consensus",
        fn=merge_consensus,
        params=ConsensusParams,
        model_params=TallModelParams,
        summary="task arithmetic restricted to the weights that at least k tasks' TALL "
        "masks select",
        paper="Wang et al. 2024, Localizing Task Information for Improved Model Merging "
        "and Compression (arXiv 2405.07813)",
        needs="none",
    )
)
