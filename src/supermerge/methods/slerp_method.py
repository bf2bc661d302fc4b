"""``slerp``: spherical linear interpolation between exactly two models.

Formula, per tensor, with ``a``, ``b`` the two experts flattened and
``theta = arccos(<a, b> / (|a| |b|))``::

    merged = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b
    merged = (1 - t) a + t b        when |cos theta| > 1 - epsilon, or |a| or |b| is 0

Paper: Shoemake 1985, "Animating Rotation with Quaternion Curves" (SIGGRAPH '85), applied
to weights as in mergekit (Goddard et al. 2024, arXiv 2403.13257). t = 0 returns the first
model exactly, t = 1 the second. Weights are not used (``t`` is the position); a ``weight``
given to a model is accepted and ignored, as mergekit does.

Differences from mergekit's ``slerp``: mergekit interpolates between the *base* model and
one other model; here the two models are the two entries of ``models`` (no base). The
default ``epsilon`` reproduces mergekit's ``DOT_THRESHOLD = 0.9995``. mergekit does not
fall back to linear interpolation when a tensor has zero norm (it interpolates with
theta = 90 degrees); we do. mergekit requires ``t``; ours defaults to 0.5.
"""

from __future__ import annotations

import torch

from supermerge.methods.primitives import (
    IgnoredWeightModelParams,
    InterpolationParams,
    slerp_,
    writable,
)
from supermerge.methods.registry import Method, TensorContext, register


def merge_slerp(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    params: InterpolationParams,
    models: list[IgnoredWeightModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return the slerp from the first expert to the second.

    Cost: one dot and two norms; in the first expert's buffer when ``ctx.scratch``, else
    in copies of both.
    """
    first, second = writable(experts, ctx.scratch)
    return slerp_(first, second, params.t, params.epsilon)


slerp = register(
    Method(
        name="slerp",
        fn=merge_slerp,
        params=InterpolationParams,
        model_params=IgnoredWeightModelParams,
        summary="spherical interpolation between two models",
        paper="Shoemake 1985, Animating Rotation with Quaternion Curves (SIGGRAPH); "
        "as in mergekit (arXiv 2403.13257)",
        needs="none",
        needs_base=False,
        min_models=2,
        max_models=2,
        base_first=True,
    )
)
