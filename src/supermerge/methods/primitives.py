"""Building blocks shared by the data-free merge methods: tensor math and parameter types.

Every function here is pure: it never changes an argument in place, reads no file and keeps
no state (random ones take a ``torch.Generator``). Costs are for one tensor of ``n`` entries
and ``K`` experts; "a temporary" is one extra tensor of ``n`` entries.

Tie rules (documented once, here):

* :func:`magnitude_trim` keeps exactly ``round(density * n)`` entries (Python's ``round``,
  halves to even). Entries tied with the k-th largest magnitude are kept lowest flat index
  first, so the result does not depend on the device or the sort algorithm.
* :class:`GlobalMagnitudeThreshold` (TIES ``trim_scope: model``) returns the exact k-th
  largest magnitude of each model's whole task vector; :func:`threshold_trim` keeps every
  entry at or above it, so entries tied with the threshold are all kept (more than k only
  when magnitudes tie exactly at the threshold; ties at zero change nothing).
* :func:`elect_sign` returns 0 where the summed mass is exactly 0; no expert agrees with a
  0 sign except zero entries, so such an entry merges to 0.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field, field_validator

from supermerge.methods.registry import ModelParams, Params

# -- parameter types shared by several methods ------------------------------------------

Density = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
"""A fraction of entries to keep, in [0, 1]."""

Weight = Annotated[float, Field(allow_inf_nan=False)]
"""A finite per-model weight (negative values allowed)."""


class TaskVectorParams(Params):
    """Global parameters of methods that add a combination of task vectors to the base."""

    scale: float = Field(
        1.0,
        alias="lambda",
        allow_inf_nan=False,
        description="lambda: multiplies the merged task vector before it is added to the base",
    )


class SignConsensusParams(TaskVectorParams):
    """Global parameters of the TIES sign election and disjoint mean (ties, dare_ties)."""

    normalize: bool = Field(
        True,
        description="divide by the summed weight of the experts that agree with the elected "
        "sign (the disjoint mean); false: disjoint weighted sum",
    )
    sign_on_weighted: bool = Field(
        False,
        description="elect signs on weight * task vector (mergekit) instead of the "
        "unweighted task vectors (the TIES paper)",
    )


class InterpolationParams(Params):
    """Global parameters of the spherical interpolations (slerp, nuslerp)."""

    t: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="interpolation position: 0 gives the first model, 1 the second",
    )
    epsilon: float = Field(
        5e-4,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="fall back to linear interpolation when |cos(angle)| > 1 - epsilon "
        "(mergekit's 0.9995 dot threshold)",
    )


class UnweightedModelParams(ModelParams):
    """Per-model parameters of methods that do not weight their models."""

    weight: Weight = Field(1.0, description="not used by this method; must stay 1")

    @field_validator("weight")
    @classmethod
    def _weight_is_one(cls, value: float) -> float:
        if value != 1.0:
            raise ValueError("this method does not weight its models; remove `weight`")
        return value


# -- task vectors and sums ----------------------------------------------------------------


def task_vectors(base: torch.Tensor, experts: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Yield ``tau_i = expert_i - base`` lazily. Cost: one subtraction per item."""
    for expert in experts:
        yield expert - base


def weighted_sum(tensors: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Return ``sum_i w_i x_i``.

    ``tensors`` may be a generator: only one of them and the accumulator are alive at a
    time. Cost: K multiply-adds, one new tensor. Raises ValueError on an empty input.
    """
    total: torch.Tensor | None = None
    for x, w in zip(tensors, weights, strict=True):
        if total is None:
            total = x * w
        else:
            total.add_(x, alpha=w)
    if total is None:
        raise ValueError("weighted_sum needs at least one tensor")
    return total


# -- magnitude trimming -------------------------------------------------------------------


def keep_count(density: float, n: int) -> int:
    """Return how many of ``n`` entries a trim to ``density`` keeps: ``round(density * n)``."""
    return min(n, max(0, round(density * n)))


def magnitude_trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """Return ``x`` with all but its ``round(density * n)`` largest-magnitude entries zeroed.

    Ties at the threshold are kept lowest flat index first. Returns ``x`` itself when
    nothing is dropped. Cost: one ``kthvalue`` (linear time, no sort) and a few boolean
    temporaries.
    """
    n = x.numel()
    k = keep_count(density, n)
    if k == n:
        return x
    if k == 0:
        return torch.zeros_like(x)
    flat = x.reshape(-1)
    magnitude = flat.abs()
    threshold = torch.kthvalue(magnitude, n - k + 1).values
    if threshold == 0:  # every non-zero entry is kept; dropping zeros changes nothing
        return x
    keep = magnitude > threshold
    tied = magnitude == threshold
    missing = k - int(keep.sum())
    if int(tied.sum()) > missing:
        tied[tied.nonzero().squeeze(1)[missing:]] = False
    return torch.where(keep | tied, flat, 0.0).reshape(x.shape)


def threshold_trim(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Return ``x`` with the entries of magnitude below ``threshold`` zeroed (ties kept).

    Cost: one temporary; returns ``x`` itself when ``threshold`` is 0.
    """
    if threshold == 0:
        return x
    return torch.where(x.abs() >= threshold, x, 0.0)


@dataclass(frozen=True)
class MagnitudeThresholds:
    """Result of :class:`GlobalMagnitudeThreshold`: per model, keep ``|tau| >= thresholds[i]``."""

    thresholds: tuple[float, ...]


_BIN_SHIFT = 13
_BINS = 1 << (31 - _BIN_SHIFT)


class GlobalMagnitudeThreshold:
    """Exact per-model k-th largest ``|tau|`` over a whole model, in two streaming passes.

    For a non-negative float32, the bit pattern read as an integer grows with the value.
    Pass 0 counts each model's magnitudes in 2**18 bins keyed by the top bits of that
    pattern and finds the bin holding the k-th largest (``k = round(density * n)``);
    pass 1 collects only the magnitudes in that bin and takes the exact value with
    ``kthvalue``. Magnitudes are ranked in float32. Memory: one 2 MiB histogram per model
    during pass 0, then the entries of one bin (about 1/512 of a binade) per model.
    Implements :class:`~supermerge.methods.registry.ModelStatistic`.
    """

    passes = 2

    def __init__(self, densities: Sequence[float]) -> None:
        self._densities = list(densities)
        count = len(self._densities)
        self._sizes = [0] * count
        self._histograms: list[torch.Tensor | None] = [None] * count
        self._bins: list[int | None] = [None] * count
        self._rank_in_bin = [0] * count
        self._collected: list[list[torch.Tensor]] = [[] for _ in range(count)]
        self._thresholds = [float("inf")] * count

    def observe(self, pass_index: int, model_index: int, task_vector: torch.Tensor) -> None:
        """Account for one tensor of model ``model_index``. Cost: O(n), two int32 temporaries."""
        bits = task_vector.detach().float().reshape(-1).view(torch.int32) & 0x7FFFFFFF
        bins = bits >> _BIN_SHIFT  # clearing the sign bit above is abs(), NaN included
        if pass_index == 0:
            self._sizes[model_index] += bits.numel()
            counts = torch.bincount(bins, minlength=_BINS)
            histogram = self._histograms[model_index]
            self._histograms[model_index] = (
                counts if histogram is None else histogram.add_(counts.to(histogram.device))
            )
        elif self._bins[model_index] is not None:
            selected = bits[bins == self._bins[model_index]]
            self._collected[model_index].append(selected.view(torch.float32))

    def finish_pass(self, pass_index: int) -> None:
        """Pass 0: locate each model's threshold bin. Pass 1: fix the exact thresholds."""
        for i, density in enumerate(self._densities):
            if pass_index == 0:
                self._locate_bin(i, keep_count(density, self._sizes[i]))
            elif self._bins[i] is not None:
                values = torch.cat(self._collected[i])
                rank = values.numel() - self._rank_in_bin[i] + 1
                self._thresholds[i] = float(torch.kthvalue(values, rank).values)
                self._collected[i] = []

    def result(self) -> MagnitudeThresholds:
        """Return the per-model thresholds (inf where a model keeps nothing)."""
        return MagnitudeThresholds(tuple(self._thresholds))

    def _locate_bin(self, i: int, k: int) -> None:
        histogram, self._histograms[i] = self._histograms[i], None
        if k == 0 or histogram is None:
            return  # threshold stays inf: nothing kept
        if k == self._sizes[i]:
            self._thresholds[i] = 0.0  # everything kept
            return
        from_top = histogram.flip(0).cumsum(0)
        position = int(torch.searchsorted(from_top, k))  # first bin (from the top) reaching k
        self._bins[i] = _BINS - 1 - position
        self._rank_in_bin[i] = k - (int(from_top[position]) - int(histogram[self._bins[i]]))


# -- sign election and disjoint mean ------------------------------------------------------


def elect_sign(electors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Return ``sign(sum_i electors_i)`` (+1, -1, or 0 where the sum is exactly 0).

    The sign with the larger summed mass wins, as in TIES. Cost: one new tensor.
    """
    return weighted_sum(electors, [1.0] * len(electors)).sign_()


def disjoint_mean(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    sign: torch.Tensor,
    *,
    electors: Sequence[torch.Tensor] | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Return ``sum_{i in A} w_i delta_i / sum_{i in A} w_i``, ``A = {i: sign(e_i) = sign}``.

    ``A`` is taken per entry; ``electors`` default to ``deltas``. Where the agreeing weights
    sum to exactly 0 (no expert agrees, or weights cancel) the sum is returned undivided.
    ``normalize=False`` returns the disjoint weighted sum. Cost: K passes, two accumulators.
    """
    electors = deltas if electors is None else electors
    total = torch.zeros_like(sign)
    mass = torch.zeros_like(sign)
    for delta, elector, w in zip(deltas, electors, weights, strict=True):
        agree = elector.sign() == sign
        total.add_(torch.where(agree, delta, 0.0), alpha=w)
        if normalize:
            mass.add_(agree, alpha=w)
    if not normalize:
        return total
    return total.div_(torch.where(mass == 0, 1.0, mass))


def sign_consensus(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = True,
    sign_on_weighted: bool = False,
) -> torch.Tensor:
    """Return the TIES merge of (already trimmed) task vectors: sign election + disjoint mean.

    ``sign_on_weighted`` elects, and tests agreement, on ``w_i * delta_i`` (mergekit);
    otherwise on the unweighted deltas (the paper). Cost: one sum and K passes; K more
    temporaries with ``sign_on_weighted``.
    """
    electors = deltas
    if sign_on_weighted:
        electors = [d * w for d, w in zip(deltas, weights, strict=True)]
    sign = elect_sign(electors)
    return disjoint_mean(deltas, weights, sign, electors=electors, normalize=normalize)


# -- DARE ---------------------------------------------------------------------------------


def dare_generator(
    seed: int, model_index: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """Return a generator seeded from (tensor seed, model index) alone.

    The two are hashed together, so no two models of one tensor share a stream and the
    masks do not depend on thread order. The same seed draws different (equally valid)
    masks on CPU and on a GPU.
    """
    digest = hashlib.blake2b(f"{seed}:{model_index}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)


def dare(x: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Return DARE(x): each entry kept with probability ``density``, kept ones divided by it.

    That is, drop probability ``p = 1 - density`` and rescale by exactly ``1 / (1 - p)``,
    so the expectation equals ``x``. Returns ``x`` itself at density 1 and zeros at density
    0 (drawing nothing). Cost: one float32 uniform draw of n entries, two temporaries.
    """
    if density >= 1:
        return x
    if density <= 0:
        return torch.zeros_like(x)
    keep = torch.rand(x.shape, generator=generator, device=x.device) < density
    return torch.where(keep, x / density, 0.0)


def dare_task_vectors(
    base: torch.Tensor, experts: Sequence[torch.Tensor], densities: Sequence[float], seed: int
) -> Iterator[torch.Tensor]:
    """Yield ``dare(x_i - base, density_i)`` lazily, model i drawing from its own generator.

    Cost per item: one subtraction and one :func:`dare`.
    """
    taus = task_vectors(base, experts)
    for i, (tau, density) in enumerate(zip(taus, densities, strict=True)):
        yield dare(tau, density, dare_generator(seed, i, tau.device))


# -- spherical interpolation --------------------------------------------------------------


def slerp(
    a: torch.Tensor, b: torch.Tensor, t: float, epsilon: float, *, rows: bool = False
) -> torch.Tensor:
    """Return the spherical interpolation from ``a`` (t=0) to ``b`` (t=1).

    ``sin((1-t) theta)/sin(theta) * a + sin(t theta)/sin(theta) * b`` with ``theta`` the
    angle between the flattened tensors (mergekit's formula: norms are interpolated along
    with the direction). Falls back to ``torch.lerp`` when ``|cos theta| > 1 - epsilon``
    or either norm is 0. ``rows=True`` interpolates each row of a tensor of 2 or more
    dimensions (viewed as ``shape[0] x rest``) separately, each with its own fall-back.
    Exact at t=0 and t=1. Cost: one dot product and two norms per row, two temporaries.
    """
    if a.numel() == 0:
        return torch.lerp(a, b, t)
    shape = a.shape
    width = a[0].numel() if rows and a.dim() >= 2 else a.numel()
    a2, b2 = a.reshape(-1, width), b.reshape(-1, width)
    dot = torch.linalg.vecdot(a2, b2, dim=1).double()
    norm_a = torch.linalg.vector_norm(a2, dim=1).double()
    norm_b = torch.linalg.vector_norm(b2, dim=1).double()
    cos = dot / (norm_a * norm_b)  # NaN where a norm is 0
    spherical = cos.abs() <= 1 - epsilon  # False for NaN
    if not bool(spherical.any()):
        return torch.lerp(a, b, t)
    theta = torch.acos(cos.clamp(-1.0, 1.0))
    s0 = (torch.sin((1 - t) * theta) / torch.sin(theta)).to(a.dtype).unsqueeze(1)
    s1 = (torch.sin(t * theta) / torch.sin(theta)).to(a.dtype).unsqueeze(1)
    result = s0 * a2 + s1 * b2
    if not bool(spherical.all()):
        result = torch.where(spherical.unsqueeze(1), result, torch.lerp(a2, b2, t))
    return result.reshape(shape)
