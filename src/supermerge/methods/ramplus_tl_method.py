"""``ramplus_tl``: RAM+ (tensor-local), RAM with each model's unique entries boosted.

Formula, per tensor, with ``a_i``, ``c`` as in ``ram`` (``a_i = |tau_i| > epsilon``,
``c = sum_i a_i``)::

    u_i      = #{entries with a_i and c = 1}       model i's unique changes
    s_i      = #{entries with a_i and c > 1}       model i's shared changes
    rho_i    = s_i / max(u_i, epsilon)
    lambda_i = 1 + r * clamp(rho_i, 0, alpha)
    merged   = base + sum_i a_i tau_i (lambda_i where c = 1, else 1) / max(c, 1)

The shared entries are averaged as in ``ram``; the unique ones are scaled up by
``lambda_i`` (at most ``1 + r * alpha``) to make up for the dilution a model suffers where
its changes are averaged with others'. ``r = 0`` (or ``alpha = 0``) is ``ram``.

Paper: "Reinforced Agent Merging" (arXiv 2601.13572), RAM+. As in mergekit's
``ramplus_tl`` ("tensor-local", ``mergekit/merge_methods/ram.py``): ``rho`` is counted per
tensor, not over the whole model as the paper's RAM+ does. Parameter names and defaults
are mergekit's: ``epsilon`` 1e-5, ``r`` 0.1, ``alpha`` 0.2.

Differences from mergekit: none in the formula (rounding as noted in ``ram``); a
``weight`` is accepted and ignored, as in mergekit.
"""

from __future__ import annotations

import torch
from pydantic import Field

from supermerge.methods.primitives import IgnoredWeightModelParams, task_vectors
from supermerge.methods.ram_method import RamParams, ram_delta_
from supermerge.methods.registry import Method, TensorContext, register


class RamPlusParams(RamParams):
    """Global parameters of ``ramplus_tl``."""

    r: float = Field(
        0.1,
        ge=0.0,
        allow_inf_nan=False,
        description="rescaling strength: unique entries are scaled by 1 + r * clamp(rho, 0, "
        "alpha)",
    )
    alpha: float = Field(
        0.2,
        ge=0.0,
        allow_inf_nan=False,
        description="upper bound on the shared-to-unique ratio rho (so lambda <= 1 + r * alpha)",
    )


def merge_ramplus_tl(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: RamPlusParams,
    models: list[IgnoredWeightModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return ``base + ram_delta_(tau, r, alpha)``.

    Cost: as ``ram``, plus two counts and one temporary per boosted model.
    """
    taus = list(task_vectors(base, experts, in_place=ctx.scratch))
    delta = ram_delta_(taus, params.epsilon, params.r, params.alpha)
    return torch.add(base, delta, out=delta)


ramplus_tl = register(
    Method(
        name="ramplus_tl",
        fn=merge_ramplus_tl,
        params=RamPlusParams,
        model_params=IgnoredWeightModelParams,
        summary="RAM with each model's unique entries scaled up by its shared-to-unique ratio",
        paper="Reinforced Agent Merging, RAM+ (arXiv 2601.13572), tensor-local as in "
        "mergekit's ramplus_tl",
        needs="none",
    )
)
