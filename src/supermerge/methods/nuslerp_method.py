"""``nuslerp``: spherical interpolation of two task vectors, added to the base.

Formula, per tensor, with ``tau_i = x_i - base`` and ``slerp`` as in ``slerp``::

    merged = base + slerp(tau_1, tau_2, t)
    merged = slerp(x_1, x_2, t)                      without a base model (mergekit's)
    t      = w_2 / (w_1 + w_2)                       when ``t`` is not given (0.5 if the
                                                     weights sum to less than 1e-6)

Which vectors are interpolated, each with its own angle and its own linear fall-back:

* the whole tensor (default; mergekit's ``nuslerp_flatten: true``);
* each row ``tau[r, ...]`` of a tensor of two or more dimensions: ``row_wise: true``;
* mergekit's ``nuslerp_flatten: false``: each vector along the last dimension (the rows of
  a matrix), or with ``nuslerp_row_wise: true`` each vector along the first dimension (the
  columns of a matrix). 0-d and 1-d tensors are always interpolated whole.

Method: mergekit's ``nuslerp`` (Goddard et al. 2024, arXiv 2403.13257), after Shoemake
1985. The models' ``weight`` sets ``t`` as in mergekit; ``t``, our spelling, may be given
instead (then the weights must be equal). Differences from mergekit: mergekit falls back to
linear interpolation only when ``|sin theta| < 1e-8`` and not on zero norms; we use
``epsilon`` and fall back on zero norms.
"""

from __future__ import annotations

import math
from typing import Self

import torch
from pydantic import Field, model_validator

from supermerge.errors import MethodError
from supermerge.methods.primitives import InterpolationParams, Weight, slerp_, task_vectors
from supermerge.methods.registry import Method, ModelParams, TensorContext, register


class NuslerpParams(InterpolationParams):
    """Global parameters of ``nuslerp``."""

    t: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="interpolation position (0: the first model, 1: the second); unset: "
        "w_2 / (w_1 + w_2) from the models' weights, as mergekit (0.5 for equal weights)",
    )
    row_wise: bool = Field(
        False, description="interpolate each row of a matrix separately instead of the whole"
    )
    nuslerp_flatten: bool = Field(
        True, description="mergekit's: false interpolates vectors along one dimension "
        "(the last, or the first with nuslerp_row_wise) instead of the whole tensor"
    )
    nuslerp_row_wise: bool = Field(
        False, description="mergekit's: with nuslerp_flatten false, interpolate the vectors "
        "along the first dimension (the columns of a matrix) instead of the last"
    )

    @model_validator(mode="after")
    def _one_mode(self) -> Self:
        if self.row_wise and self.nuslerp_row_wise:
            raise ValueError("row_wise (rows) and nuslerp_row_wise (columns) contradict each "
                             "other; give one of them")
        return self


class NuslerpModelParams(ModelParams):
    """Per-model parameters of ``nuslerp``."""

    weight: Weight = Field(
        1.0, description="sets t = w_2 / (w_1 + w_2) when t is not given (mergekit's)"
    )


def interpolation_position(params: NuslerpParams, models: list[NuslerpModelParams]) -> float:
    """Return ``t``: the given one, else ``w_2 / (w_1 + w_2)`` (0.5 when the weights sum to
    less than 1e-6 in magnitude, as mergekit). MethodError if ``t`` and unequal weights are
    both given."""
    w1, w2 = (m.weight for m in models)
    if params.t is not None:
        if w1 != w2:
            raise MethodError(
                f"nuslerp got both t = {params.t} and the weights {w1}, {w2}, which set t too",
                fix="give either `t` or the models' weights (mergekit's spelling)")
        return params.t
    total = math.fsum((w1, w2))
    return 0.5 if abs(total) < 1e-6 else w2 / total


def merge_nuslerp(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    params: NuslerpParams,
    models: list[NuslerpModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return ``base + slerp(tau_1, tau_2, t)`` (``slerp(x_1, x_2, t)`` without a base).

    Cost: one dot and two norms per interpolated vector; in the first expert's buffer when
    ``ctx.scratch``, else two new tensors (and one transposed copy of each for columns).
    """
    t = interpolation_position(params, models)
    if base is None:
        first, second = (e if ctx.scratch else e.clone() for e in experts)
    else:
        first, second = task_vectors(base, experts, in_place=ctx.scratch)
    if params.row_wise or params.nuslerp_flatten or first.dim() < 2:
        delta = slerp_(first, second, t, params.epsilon, rows=params.row_wise)
    elif params.nuslerp_row_wise:  # vectors along dim 0: interpolate the transposes' rows
        a, b = (x.transpose(0, -1).contiguous() for x in (first, second))
        width = a.shape[-1]
        out = slerp_(a.view(-1, width), b.view(-1, width), t, params.epsilon, rows=True)
        delta = first.copy_(out.view(a.shape).transpose(0, -1))
    else:  # vectors along the last dimension
        width = first.shape[-1]
        slerp_(first.view(-1, width), second.view(-1, width), t, params.epsilon, rows=True)
        delta = first
    return delta if base is None else torch.add(base, delta, out=delta)


nuslerp = register(
    Method(
        name="nuslerp",
        fn=merge_nuslerp,
        params=NuslerpParams,
        model_params=NuslerpModelParams,
        summary="spherical interpolation of two task vectors, added to the base (of the "
        "two models without a base)",
        paper="mergekit's nuslerp (arXiv 2403.13257), after Shoemake 1985",
        needs="none",
        needs_base=False,
        min_models=2,
        max_models=2,
    )
)
