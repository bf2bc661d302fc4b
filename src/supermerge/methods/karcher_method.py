"""``karcher``: the Karcher (Riemannian, Frechet) mean of the models' directions on the sphere.

Formula, per tensor, with the ``N`` points ``x_i`` flattened (the models, and the base
when one is given), ``n_i = |x_i|`` and ``u_i = x_i / n_i`` for the ``V`` points with
``n_i > tol``::

    u      = normalise(mean_i u_i)                      start (u_1 if that mean is ~0)
    repeat max_iter times:
        theta_i = arccos(<u, u_i>)
        T       = (1/V) sum_{theta_i >= tol} theta_i / sin(theta_i) * (u_i - cos(theta_i) u)
        stop if |T| < tol
        u       = normalise(cos|T| u + sin|T| T / |T|)  exponential map
    merged = (1/N) sum_i n_i * u                        mean length, zero points included

``T`` is the mean of the logarithmic maps ``log_u(u_i)`` (the tangent vectors pointing
from ``u`` to each ``u_i``, of length ``theta_i``), so each step is a Riemannian gradient
step on ``sum_i theta_i^2`` and the fixed point is the Karcher mean of the unit directions
(for points on one great circle, the first step lands on it exactly). Copies of one model
return it; one model is returned unchanged; points of norm at most ``tol`` take no part in
the direction but count (as length 0) in the mean length.

Method: mergekit's ``karcher`` (``mergekit/merge_methods/karcher.py``); Karcher 1977,
"Riemannian center of mass and mollifier smoothing" (Comm. Pure Appl. Math. 30); mergekit's
documentation cites arXiv 2603.04972 (merging on the Fisher-Rao manifold). Parameter names
and defaults are mergekit's: ``max_iter`` 10, ``tol`` 1e-5; models are weighted equally
(mergekit's ``karcher`` takes no weights either). A base model, when given, is one of the
averaged points, as in mergekit (whose planner adds the base to the merged models).

Differences from mergekit: angles and step sizes are computed in float64 from float32 dot
products (mergekit: in the tensors' dtype); a point antipodal to the current mean
(``sin(theta) = 0``, where the logarithmic map is undefined) is skipped, where mergekit
divides by a rounded ``sin(pi)``. A ``weight`` is accepted and ignored, as in mergekit.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from supermerge.methods.primitives import IgnoredWeightModelParams, weighted_sum, writable
from supermerge.methods.registry import Method, Params, TensorContext, register


class KarcherParams(Params):
    """Global parameters of ``karcher``."""

    max_iter: int = Field(10, ge=0, description="iterations of the Karcher mean at most")
    tol: float = Field(
        1e-5,
        ge=0.0,
        allow_inf_nan=False,
        description="stop when the mean tangent is shorter than this; also the smallest norm "
        "and angle that count",
    )


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vecdot(a.view(-1), b.view(-1)))


def _norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x, dtype=torch.float64))


def _angle(u: torch.Tensor, unit: torch.Tensor) -> float:
    """The angle between two unit tensors: from the chord for small angles (``acos`` of a
    float32 dot product is off by up to ~3e-4 rad near 0, which stalled the iteration
    above ``tol``), from the dot product otherwise. Cost: one pass (two when small)."""
    cos = min(1.0, max(-1.0, _dot(u, unit)))
    if cos < 0.5:
        return math.acos(cos)
    chord = float(torch.linalg.vector_norm(unit - u, dtype=torch.float64))
    return 2.0 * math.asin(min(1.0, chord / 2.0))


def karcher_direction_(units: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """Return the Karcher mean of the unit tensors ``units`` (equal weights), a unit tensor.

    Starts from their normalised Euclidean mean (``units[0]`` when that is shorter than
    ``tol``) and takes at most ``max_iter`` exponential-map steps along the mean of the
    logarithmic maps, stopping when that is shorter than ``tol``. Leaves ``units`` as they
    are; the result is a new tensor. Cost per step: ``V`` dot products, one tangent
    accumulator and ``V + 2`` passes.
    """
    share = 1.0 / len(units)
    u = weighted_sum(units, [share] * len(units))
    length = _norm(u)
    u = units[0].clone() if length < tol else u.div_(length)
    tangent = torch.empty_like(u)
    for _ in range(max_iter):
        tangent.zero_()
        for unit in units:
            theta = _angle(u, unit)
            if theta < tol or math.sin(theta) <= 0:
                continue
            cos = math.cos(theta)
            step = share * theta / math.sin(theta)
            tangent.add_(unit, alpha=step).add_(u, alpha=-step * cos)  # step * (u_i - cos u)
        size = _norm(tangent)
        if size < tol:
            break
        u.mul_(math.cos(size)).add_(tangent, alpha=math.sin(size) / size)
        length = _norm(u)
        if length > tol:
            u.div_(length)
    return u


def merge_karcher(
    base: torch.Tensor | None,
    experts: list[torch.Tensor],
    params: KarcherParams,
    models: list[IgnoredWeightModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return the mean length times the Karcher mean direction of the experts (and the base).

    Cost: N norms, then :func:`karcher_direction_`; the directions are made in the experts'
    buffers when ``ctx.scratch`` (else in copies), and the base, when given, in a copy.
    """
    points = writable(experts, ctx.scratch) + ([base.clone()] if base is not None else [])
    if len(points) == 1:
        return points[0]
    norms = [_norm(x) for x in points]
    length = math.fsum(norms) / len(points)
    units = [x.div_(n) for x, n in zip(points, norms, strict=True) if n > params.tol]
    if not units:
        return torch.zeros_like(points[0])
    return karcher_direction_(units, params.max_iter, params.tol).mul_(length)


karcher = register(
    Method(
        name="karcher",
        fn=merge_karcher,
        params=KarcherParams,
        model_params=IgnoredWeightModelParams,
        summary="Karcher (Riemannian) mean of the models' directions on the sphere, times "
        "their mean norm",
        paper="Karcher 1977, Riemannian center of mass (Comm. Pure Appl. Math. 30); as in "
        "mergekit's karcher",
        needs="none",
        needs_base=False,
        min_models=1,
    )
)
