"""``ram``: Reinforced Agent Merging, sum the entries one model changed, average the shared ones.

Formula, per tensor, with ``tau_i = x_i - base`` and ``K`` experts::

    a_i    = |tau_i| > epsilon                     entry i is active (changed) in model i
    c      = sum_i a_i                             how many models change the entry
    merged = base + sum_i a_i tau_i / max(c, 1)

An entry no model changes (``c = 0``) keeps the base's value (entries of magnitude at most
``epsilon`` count as unchanged and are dropped); one changed by a single model (unique,
``c = 1``) takes that model's change whole; one changed by several (shared) takes the mean
of their changes. Unweighted.

Paper: "Reinforced Agent Merging" (arXiv 2601.13572): on-policy RL leaves sparse,
heterogeneous task vectors, and averaging dilutes each agent's few changes; RAM keeps the
unique ones whole. As in mergekit's ``ram`` (``mergekit/merge_methods/ram.py``), whose
parameter name and default (``epsilon`` 1e-5) are used. :func:`ram_delta_` also serves
``ramplus_tl`` (which rescales the unique entries).

Differences from mergekit: none in the formula. mergekit divides each shared entry by ``c``
before summing, we sum and then divide (rounding differs in the last bit). Neither weights
its models: a ``weight`` is accepted and ignored, as in mergekit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from supermerge.methods.primitives import IgnoredWeightModelParams, task_vectors
from supermerge.methods.registry import Method, Params, TensorContext, register


class RamParams(Params):
    """Global parameters of ``ram``."""

    epsilon: float = Field(
        1e-5,
        ge=0.0,
        allow_inf_nan=False,
        description="a task-vector entry counts as changed when its magnitude exceeds this",
    )


def ram_delta_(
    taus: Sequence[torch.Tensor], epsilon: float, r: float = 0.0, alpha: float = 0.0
) -> torch.Tensor:
    """Return the RAM merged task vector ``sum_i lambda_i^[c=1] a_i tau_i / max(c, 1)``.

    ``a_i = |tau_i| > epsilon``, ``c = sum_i a_i``. The unique entries (``c = 1``) of model
    i are multiplied by ``lambda_i = 1 + r * clamp(rho_i, 0, alpha)`` (RAM+), with ``rho_i``
    the ratio of model i's shared active entries (``c > 1``) to its unique ones (divided by
    at least ``epsilon``, as mergekit does); ``r = 0`` gives plain RAM. Overwrites ``taus``;
    the result is in ``taus[0]``'s buffer. Cost: K boolean masks, one int32 counter, and
    one temporary for each boosted model.
    """
    active = [tau.abs() > epsilon for tau in taus]
    count = torch.zeros(taus[0].shape, dtype=torch.int32, device=taus[0].device)
    for mask in active:
        count.add_(mask)
    unique = count == 1 if r != 0 else None
    for tau, mask in zip(taus, active, strict=True):
        tau.mul_(mask)
        if unique is not None:
            mine = mask.logical_and_(unique)  # the mask is not needed after this
            unique_count = int(torch.count_nonzero(mine))
            shared_count = int(torch.count_nonzero(tau)) - unique_count
            rho = shared_count / max(unique_count, epsilon)
            boost = 1 + r * min(max(rho, 0.0), alpha)
            if boost != 1:
                tau.mul_(torch.where(mine, boost, 1.0))
    total = taus[0]
    for tau in taus[1:]:
        total.add_(tau)
    return total.div_(count.clamp_min_(1))


def merge_ram(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: RamParams,
    models: list[IgnoredWeightModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return ``base + ram_delta_(tau)``.

    Cost: K boolean masks and a counter; in the experts' buffers when ``ctx.scratch``,
    else K new task vectors.
    """
    taus = list(task_vectors(base, experts, in_place=ctx.scratch))
    delta = ram_delta_(taus, params.epsilon)
    return torch.add(base, delta, out=delta)


ram = register(
    Method(
        name="ram",
        fn=merge_ram,
        params=RamParams,
        model_params=IgnoredWeightModelParams,
        summary="keep entries one model changed whole, average those several models changed",
        paper="Reinforced Agent Merging (arXiv 2601.13572), as in mergekit's ram",
        needs="none",
    )
)
