"""``nuslerp``: spherical interpolation of two task vectors, added to the base.

Formula, per tensor, with ``tau_i = x_i - base`` and ``slerp`` as in ``slerp``::

    merged = base + slerp(tau_1, tau_2, t)

``row_wise: true`` interpolates each row ``tau[r, :]`` of a tensor with two or more
dimensions separately (its own angle and its own linear fall-back); 0-d and 1-d tensors
are always interpolated whole.

Method: mergekit's ``nuslerp`` (Goddard et al. 2024, arXiv 2403.13257), after Shoemake
1985. Differences from mergekit: mergekit derives ``t = w_2 / (w_1 + w_2)`` from the
models' weights, here ``t`` is given (weights are not used); mergekit's own row mode is
spelled ``nuslerp_flatten: false`` (its ``nuslerp_row_wise: true`` interpolates dim-0
vectors, i.e. columns); our ``row_wise: true`` equals ``nuslerp_flatten: false,
nuslerp_row_wise: false``. mergekit falls back to linear interpolation only when
``|sin theta| < 1e-8`` and not on zero norms; we use ``epsilon`` and fall back on zero
norms. mergekit also runs without a base (plain slerp): use ``slerp`` for that.
"""

from __future__ import annotations

import torch
from pydantic import Field

from supermerge.methods.primitives import (
    InterpolationParams,
    UnweightedModelParams,
    slerp_,
    task_vectors,
)
from supermerge.methods.registry import Method, TensorContext, register


class NuslerpParams(InterpolationParams):
    """Global parameters of ``nuslerp``."""

    row_wise: bool = Field(
        False, description="interpolate each row of a matrix separately instead of the whole"
    )


def merge_nuslerp(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: NuslerpParams,
    models: list[UnweightedModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return ``base + slerp(tau_1, tau_2, t)``.

    Cost: one dot and two norms per row; in the first expert's buffer when ``ctx.scratch``,
    else two new task vectors.
    """
    first, second = task_vectors(base, experts, in_place=ctx.scratch)
    delta = slerp_(first, second, params.t, params.epsilon, rows=params.row_wise)
    return torch.add(base, delta, out=delta)


nuslerp = register(
    Method(
        name="nuslerp",
        fn=merge_nuslerp,
        params=NuslerpParams,
        model_params=UnweightedModelParams,
        summary="spherical interpolation of two task vectors, added to the base",
        paper="mergekit's nuslerp (arXiv 2403.13257), after Shoemake 1985",
        needs="none",
        min_models=2,
        max_models=2,
    )
)
