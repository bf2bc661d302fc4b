"""``dare_ties``: DARE each task vector, then TIES sign election and disjoint mean.

Formula, per tensor, with ``dare`` as in :mod:`supermerge.methods.dare_linear_method`::

    d_i    = dare(tau_i, density_i)               no magnitude trim
    gamma  = sign(sum_i d_i)                      elected sign, unweighted by default
    A      = {i : sign(d_i) = gamma}              per entry
    merged = base + lambda * sum_{i in A} w_i d_i / sum_{i in A} w_i

Paper: Yu et al. 2024 (DARE, arXiv 2311.03099), used as a drop-in for TIES's trim step
(Yadav et al. 2023, arXiv 2306.01708), as the DARE paper combines them. The sign
election, tie rules and the ``normalize`` / ``sign_on_weighted`` options are those of
``ties``. The default density, 0.5, is explained in ``dare_linear``.

Differences from mergekit's ``dare_ties``: mergekit's defaults are density 1.0 and
``normalize: false`` (a disjoint weighted *sum*); ours are 0.5 and the disjoint *mean*
(set ``normalize: false`` for mergekit's). mergekit elects signs on weighted deltas
(``sign_on_weighted: true`` here), turns a zero summed sign into +1, and draws masks from
the global generator; the rescale notes of ``dare_linear`` apply (``rescale: false`` keeps
the surviving entries unscaled in both). ``int8_mask`` is accepted and changes nothing.
"""

from __future__ import annotations

import torch
from pydantic import Field

from supermerge.methods.primitives import (
    Density,
    DropSignConsensusParams,
    Weight,
    add_sign_consensus_,
    dare_task_vectors,
)
from supermerge.methods.registry import Method, ModelParams, TensorContext, register


class DareTiesModelParams(ModelParams):
    """Per-model parameters of ``dare_ties``."""

    weight: Weight = Field(1.0, description="this model's weight in the disjoint mean")
    density: Density = Field(
        0.5, description="probability that an entry of the task vector is kept (1 - drop rate)"
    )


def merge_dare_ties(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: DropSignConsensusParams,
    models: list[DareTiesModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return the DARE + TIES merge.

    Cost: K draws, then the sign and one accumulator; in place in the experts' buffers
    when ``ctx.scratch``, else K new task vectors; on up to ``ctx.threads`` threads.
    """
    densities = [m.density for m in models]
    sparse = list(dare_task_vectors(base, experts, densities, ctx.seed, in_place=ctx.scratch,
                                    rescale=params.rescale, threads=ctx.threads))
    return add_sign_consensus_(base, sparse, models, params, threads=ctx.threads)


dare_ties = register(
    Method(
        name="dare_ties",
        fn=merge_dare_ties,
        params=DropSignConsensusParams,
        model_params=DareTiesModelParams,
        summary="randomly drop and rescale task vectors, then TIES sign election and mean",
        paper="Yu et al. 2024, Language Models are Super Mario (DARE) (arXiv 2311.03099)",
        needs="none",
    )
)
