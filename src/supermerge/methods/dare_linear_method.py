"""``dare_linear``: DARE (drop and rescale) each task vector, then task arithmetic.

Formula, per tensor, with ``tau_i = x_i - base`` and an independent mask ``m_i``::

    m_i[j] ~ Bernoulli(density_i)                 drop probability p_i = 1 - density_i
    dare(tau_i) = m_i * tau_i / density_i         rescale by exactly 1 / (1 - p_i)
    merged = base + lambda * sum_i w_i dare(tau_i)

Paper: Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch" (arXiv 2311.03099). The masks are drawn from a
``torch.Generator`` seeded by (the tensor's seed, the model's index): the merge is
reproducible and independent of thread order. density 1 draws nothing and keeps all.

The default density, 0.5, is a choice: the paper shows that large fine-tuned language
models survive dropping 90% (even 99%) of their deltas, but smaller models do not; 0.5 is
the conservative middle, close to the 0.53 of mergekit's README example. For large
decoder models try 0.1 (the paper's drop rate 0.9).

``normalize: true`` divides the weighted sum by the sum of the weights (mergekit's, off by
default in both); ``rescale: false`` keeps the surviving entries unscaled (as mergekit's
``rescale: false``); ``int8_mask`` is accepted and changes nothing.

Differences from mergekit's ``dare_linear``: density defaults to 1.0 (no drop) there;
mergekit draws masks from torch's global generator (not reproducible per tensor), and its
``rescale: true`` (the default) scales each dropped task vector back to its L1 norm, ours
by exactly ``1/density`` (the paper's).
"""

from __future__ import annotations

import torch
from pydantic import Field

from supermerge.methods.primitives import (
    Density,
    DropParams,
    Weight,
    dare_task_vectors,
    normalized_weights,
    weighted_sum,
)
from supermerge.methods.registry import Method, ModelParams, TensorContext, register


class DareLinearModelParams(ModelParams):
    """Per-model parameters of ``dare_linear``."""

    weight: Weight = Field(1.0, description="coefficient of this model's task vector")
    density: Density = Field(
        0.5, description="probability that an entry of the task vector is kept (1 - drop rate)"
    )


def merge_dare_linear(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: DropParams,
    models: list[DareLinearModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return ``base + lambda * sum_i w_i dare(tau_i)``.

    Cost: K draws (one model per thread, up to ``ctx.threads``); in place in the experts'
    buffers when ``ctx.scratch``, else one new tensor at a time besides the sum (K with
    several threads).
    """
    densities = [m.density for m in models]
    sparse = dare_task_vectors(base, experts, densities, ctx.seed, in_place=ctx.scratch,
                               rescale=params.rescale, threads=ctx.threads)
    weights = normalized_weights([m.weight for m in models], params.normalize)
    total = weighted_sum(sparse, weights, in_place=True)
    return torch.add(base, total, alpha=params.scale, out=total)


dare_linear = register(
    Method(
        name="dare_linear",
        fn=merge_dare_linear,
        params=DropParams,
        model_params=DareLinearModelParams,
        summary="randomly drop task-vector entries, rescale the rest, then add them up",
        paper="Yu et al. 2024, Language Models are Super Mario (DARE) (arXiv 2311.03099)",
        needs="none",
    )
)
