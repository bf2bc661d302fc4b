"""``nearswap``: take the other model's value where it lies near the base, step toward it elsewhere.

Formula, per tensor and entry, with ``x`` the one expert and ``d = |x - base|``::

    w      = clamp(t / max(d, 1e-6), 0, 1)
    merged = w * x + (1 - w) * base  =  lerp(base, x, w)

Where ``d <= t`` the entry is the expert's; elsewhere it moves from the base toward the
expert by exactly ``t`` (``w * d = t``): for ``t >= 1e-6`` this is
``base + clamp(x - base, -t, t)``, the task vector clipped entrywise to ``[-t, t]``. ``t``
is in the weights' own units (0: the base; large: the expert).

Method: mergekit's ``nearswap`` (``mergekit/merge_methods/nearswap.py``, mergekit 0.1.x),
after alchemonaut's QuartetAnemoi-70B-t0.0001 merge (Hugging Face model card); no paper.
The parameter name ``t``, the 1e-6 floor on ``d`` and the formula are mergekit's.

Differences from mergekit: mergekit requires ``t``; ours defaults to 1e-4 (the value of
the model the method is named after and of mergekit's own test). mergekit clamps a
negative ``t`` to the base; we refuse it. A ``weight`` is accepted and ignored, as in
mergekit.
"""

from __future__ import annotations

import torch
from pydantic import Field

from supermerge.methods.primitives import IgnoredWeightModelParams
from supermerge.methods.registry import Method, Params, TensorContext, register

_FLOOR = 1e-6  # mergekit's floor on |x - base| (w = t / 1e-6 where the models agree)


class NearswapParams(Params):
    """Global parameters of ``nearswap``."""

    t: float = Field(
        1e-4,
        ge=0.0,
        allow_inf_nan=False,
        description="distance, in weight units, within which an entry takes the other "
        "model's value; farther entries move toward it by t (0: the base)",
    )


def merge_nearswap(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: NearswapParams,
    models: list[IgnoredWeightModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return ``lerp(base, x, clamp(t / max(|x - base|, 1e-6), 0, 1))``.

    Cost: one temporary (the weights), one lerp; the result is a new tensor.
    """
    (expert,) = experts
    weight = torch.sub(expert, base).abs_().clamp_min_(_FLOOR)
    weight = torch.reciprocal(weight, out=weight).mul_(params.t).clamp_max_(1.0)
    return torch.lerp(base, expert, weight)


nearswap = register(
    Method(
        name="nearswap",
        fn=merge_nearswap,
        params=NearswapParams,
        model_params=IgnoredWeightModelParams,
        summary="take one model's entries where they lie within t of the base, "
        "move toward it by t elsewhere",
        paper="mergekit's nearswap, after alchemonaut's QuartetAnemoi-70B-t0.0001 (no paper)",
        needs="none",
        min_models=1,
        max_models=1,
    )
)
