"""``della_linear``: DELLA's MagPrune (magnitude-ranked drop and rescale), then task arithmetic.

Formula, per tensor, with ``d_i = MagPrune(tau_i)`` as in :mod:`supermerge.methods.della_method`
(drop probabilities linearly spaced over ``[p - epsilon/2, p + epsilon/2]``, the largest
magnitude least likely dropped, kept entries divided by their keep probability)::

    merged = base + lambda * sum_i w_i d_i

Paper: Deep, Bhardwaj & Poria 2024, "DELLA-Merging" (arXiv 2406.11617), without its Elect
step (mergekit's ``della_linear``): DARE with MagPrune's magnitude-ranked probabilities
instead of a uniform one. Seeding, the reading of the paper, the defaults
(density 0.5, epsilon 0.1, lambda 1.0) and the ``epsilon`` range are those of ``della``.

Differences from mergekit's ``della_linear``: as for ``della`` (epsilon is the full width
here, twice mergekit's; kept entries are rescaled by ``1 / (1 - p)``; row ranking and a
per-tensor, per-model generator). mergekit's ``normalize`` (divide by the summed weights,
off by default) and ``rescale: false`` mean what they mean there.
"""

from __future__ import annotations

import torch

from supermerge.methods.primitives import (
    DropParams,
    MagPruneModelParams,
    magprune_task_vectors,
    normalized_weights,
    weighted_sum,
)
from supermerge.methods.registry import Method, TensorContext, register


def merge_della_linear(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: DropParams,
    models: list[MagPruneModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return ``base + lambda * sum_i w_i MagPrune(tau_i)``.

    Cost: K row sorts and K draws (one model per thread, up to ``ctx.threads``); in place
    in the experts' buffers when ``ctx.scratch``.
    """
    densities, epsilons = [m.density for m in models], [m.epsilon for m in models]
    pruned = magprune_task_vectors(
        base, experts, densities, epsilons, ctx.seed, in_place=ctx.scratch, rescale=params.rescale,
        threads=ctx.threads,
    )
    weights = normalized_weights([m.weight for m in models], params.normalize)
    total = weighted_sum(pruned, weights, in_place=True)
    return torch.add(base, total, alpha=params.scale, out=total)


della_linear = register(
    Method(
        name="della_linear",
        fn=merge_della_linear,
        params=DropParams,
        model_params=MagPruneModelParams,
        summary="drop task-vector entries with magnitude-ranked probabilities, rescale, "
        "then add them up (no sign election)",
        paper="Deep et al. 2024, DELLA-Merging (arXiv 2406.11617)",
        needs="none",
    )
)
