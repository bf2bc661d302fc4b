"""``multislerp``: spherical interpolation of any number of models (mergekit's Multi-SLERP).

Formula, per tensor, with ``y_i = x_i - base`` when a base is given (else ``y_i = x_i``),
flattened, and weights ``w_i`` (divided by their sum when ``normalize_weights``)::

    n_i    = |y_i|,   u_i = y_i / (n_i + eps)          directions
    M      = sum_i w_i u_i,   m = M / |M|              weighted Euclidean mean, on the sphere
    T      = sum_i w_i (u_i - <u_i, m> m)              the directions' tangents at m
    merged = (sum_i w_i n_i) * exp_m(T) (+ base)       exp_m(T) = cos|T| m + sin|T| T / |T|

mergekit's barycentric interpolation on the hypersphere: the directions are projected on
the tangent space at their normalised weighted mean, averaged there, and mapped back; the
length is the weighted mean of the lengths. The tangent average is identically zero:
``T = M - <M, m> m = M - |M| m = 0``. So the result is the *normalised weighted mean of the
directions* (an nlerp, not a geodesic barycentre: for two orthogonal models with weights
0.75 / 0.25 it lies at atan(1/3) = 18.4 degrees from the first, where slerp would be at
22.5) scaled by the weighted mean length; we compute that closed form, which is what
mergekit's code returns up to rounding (its ``T`` is rounding noise and its ``|T|`` is
``eps``, with ``cos(eps) = 1`` in float32). One model is returned unchanged.

Method: mergekit's ``multislerp`` (``mergekit/merge_methods/multislerp.py``; Goddard,
"Multi-SLERP", goddard.blog). Parameter names and defaults are mergekit's:
``normalize_weights`` true, ``eps`` 1e-8, per-model ``weight``.

Differences from mergekit:

* where the weighted mean of the directions is shorter than ``eps`` (antipodal models with
  balancing weights, or every task vector zero: a tensor no expert changed) mergekit falls
  back to the weighted sum of the tensors for two models and raises an error for more; we
  fall back to the weighted sum for any number, so an unchanged tensor stays the base's;
* mergekit requires a ``weight`` per model; ours defaults to 1 (equal weights);
* ``normalize_weights`` leaves weights summing to less than 1e-8 in magnitude as they are
  (as ``normalize`` does for task arithmetic); mergekit divides by that sum (inf or NaN);
* a base given is subtracted, as in mergekit; mergekit also drops the base from the
  models when it is listed among them, which the recipe layer decides, not this function.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from supermerge.methods.primitives import (
    Weight,
    normalized_weights,
    task_vectors,
    weighted_sum,
    writable,
)
from supermerge.methods.registry import Method, ModelParams, Params, TensorContext, register


class MultislerpParams(Params):
    """Global parameters of ``multislerp``."""

    normalize_weights: bool = Field(
        True, description="divide the weights by their sum (false: use them as given)"
    )
    eps: float = Field(
        1e-8,
        ge=0.0,
        allow_inf_nan=False,
        description="added to each length before dividing; a mean direction shorter than "
        "this falls back to the weighted sum",
    )


class MultislerpModelParams(ModelParams):
    """Per-model parameters of ``multislerp``."""

    weight: Weight = Field(1.0, description="this model's weight in the mean direction and length")


def merge_multislerp(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    params: MultislerpParams,
    models: list[MultislerpModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return ``(sum_i w_i n_i) * M / |M|`` (plus the base when one is given).

    Cost: K norms and one weighted sum; in the experts' buffers when ``ctx.scratch``,
    else K new tensors.
    """
    if len(experts) == 1:
        return experts[0]
    weights = normalized_weights([m.weight for m in models], params.normalize_weights)
    ys = (
        list(task_vectors(base, experts, in_place=ctx.scratch))
        if base is not None
        else writable(experts, ctx.scratch)
    )
    norms = [float(torch.linalg.vector_norm(y, dtype=torch.float64)) for y in ys]
    length = math.fsum(w * n for w, n in zip(weights, norms, strict=True))
    coefficients = [w / (n + params.eps) for w, n in zip(weights, norms, strict=True)]
    mean = weighted_sum(ys, coefficients)  # M, a new tensor: ys stay for the fall-back
    mean_norm = float(torch.linalg.vector_norm(mean, dtype=torch.float64))
    if mean_norm < params.eps or mean_norm == 0:
        merged = weighted_sum(ys, weights, in_place=True)
    else:
        merged = mean.mul_(length / mean_norm)
    return merged if base is None else merged.add_(base)


multislerp = register(
    Method(
        name="multislerp",
        fn=merge_multislerp,
        params=MultislerpParams,
        model_params=MultislerpModelParams,
        summary="spherical mean of any number of models (or task vectors, with a base): "
        "normalised weighted mean direction, weighted mean length",
        paper="mergekit's multislerp (Goddard, Multi-SLERP, goddard.blog)",
        needs="none",
        needs_base=False,
        min_models=1,
    )
)
