"""Building blocks shared by the data-free merge methods: tensor math and parameter types.

Every function here is pure: it never changes an argument in place, reads no file and keeps
no state (random ones take a ``torch.Generator``). Costs are for one tensor of ``n`` entries
and ``K`` experts; "a temporary" is one extra tensor of ``n`` entries.

Tie rules (documented once, here):

* :func:`magnitude_trim` keeps exactly ``round(density * n)`` entries (Python's ``round``,
  halves to even). Entries tied with the k-th largest magnitude are kept lowest flat index
  first (:func:`top_k_mask`), so the result does not depend on the device or the sort
  algorithm. :func:`magnitude_band` (Breadcrumbs) and :func:`magprune` (DELLA, which ranks
  with a stable sort) break magnitude ties the same way: the lower index ranks higher.
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
from typing import Annotated, Self

import torch
from pydantic import Field, field_validator, model_validator

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


class MagPruneModelParams(ModelParams):
    """Per-model parameters of the DELLA methods (della, della_linear)."""

    weight: Weight = Field(1.0, description="this model's weight (in the mean or the sum)")
    density: Density = Field(
        0.5, description="average probability that a task-vector entry is kept (1 - p)"
    )
    epsilon: Density = Field(
        0.1,
        description="spread of the drop probabilities: from p - epsilon/2 (largest "
        "magnitude) to p + epsilon/2 (smallest); mergekit's epsilon is half of this",
    )

    @model_validator(mode="after")
    def _probabilities_in_range(self) -> Self:
        limit = 2 * min(self.density, 1 - self.density)
        if self.epsilon > limit + 1e-12:
            raise ValueError(
                f"epsilon {self.epsilon} needs epsilon / 2 <= min(density, 1 - density) "
                f"= {limit / 2:g} so that every keep probability lies in [0, 1]; "
                f"use epsilon <= {limit:g}"
            )
        return self


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


def top_k_mask(x: torch.Tensor, k: int, *, exact: bool = True) -> torch.Tensor:
    """Return a boolean mask of ``x``'s shape selecting exactly its ``k`` largest ``|x|``.

    Entries tied with the k-th largest magnitude are selected lowest flat index first, so
    ``top_k_mask(x, a)`` is contained in ``top_k_mask(x, b)`` for ``a <= b``. ``k`` is
    clipped to ``[0, n]``. ``exact=False``: when the k-th largest magnitude is 0, return
    ``x != 0`` instead (the same entries once applied to ``x``, without indexing the
    zeros: an all-zero task vector of a frozen layer costs no index pass). Cost: one
    ``kthvalue`` (linear time, no sort) and a few boolean temporaries.
    """
    n = x.numel()
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    magnitude = x.reshape(-1).abs()
    threshold = torch.kthvalue(magnitude, n - k + 1).values
    if threshold == 0 and not exact:
        return x != 0
    keep = magnitude > threshold
    tied = magnitude == threshold
    missing = k - int(keep.sum())
    if int(tied.sum()) > missing:
        tied[tied.nonzero().squeeze(1)[missing:]] = False
    return (keep | tied).reshape(x.shape)


def magnitude_trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """Return ``x`` with all but its ``round(density * n)`` largest-magnitude entries zeroed.

    Ties at the threshold are kept lowest flat index first (:func:`top_k_mask`). Returns
    ``x`` itself when nothing is dropped. Cost: one ``kthvalue`` and a few temporaries.
    """
    n = x.numel()
    k = keep_count(density, n)
    if k == n:
        return x
    if k == 0:
        return torch.zeros_like(x)
    return torch.where(top_k_mask(x, k, exact=False), x, 0.0)


def magnitude_band(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Return ``x`` with only a band of its magnitude ranking kept (Model Breadcrumbs).

    Ranked by ``|x|`` from the largest (ties lowest flat index first), the first
    ``top = round(gamma * n)`` entries (the outliers) are dropped, the next
    ``k = round(density * n)`` kept and the rest (the small ones) dropped. When
    ``top + k > n`` the kept count wins: ``top`` shrinks to ``n - k``. ``gamma = 0`` is
    :func:`magnitude_trim`. Cost: two ``kthvalue`` calls and a few boolean temporaries.
    """
    n = x.numel()
    k = keep_count(density, n)
    top = min(keep_count(gamma, n), n - k)
    if top == 0:
        return magnitude_trim(x, density)
    keep = top_k_mask(x, top + k, exact=False) & ~top_k_mask(x, top, exact=False)
    return torch.where(keep, x, 0.0)


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


def magprune(
    x: torch.Tensor, density: float, epsilon: float, generator: torch.Generator
) -> torch.Tensor:
    """Return DELLA's MagPrune(x): magnitude-ranked random drop, kept entries rescaled.

    Each row (``x`` viewed as ``shape[0] x rest``; 0-d and 1-D tensors are one row) of
    ``m`` entries is ranked by ``|x|`` from the largest (rank 0; ties lowest index first).
    Entry of rank ``r`` is kept with probability
    ``q_r = density + epsilon / 2 - epsilon * r / (m - 1)`` (``density`` when ``m = 1``),
    i.e. drop probabilities ``p_r = 1 - q_r`` linearly spaced over
    ``[p - epsilon/2, p + epsilon/2]``, ``p = 1 - density``, the largest magnitude least
    likely dropped; a kept entry is divided by ``q_r`` (``1 / (1 - p_r)``), so each entry's
    expectation is itself. Callers ensure ``epsilon / 2 <= min(density, 1 - density)``;
    an entry with ``q_r = 0`` is always dropped. Returns ``x`` itself at density 1 with
    epsilon 0 and zeros at density 0 (drawing nothing). Cost: one stable sort per row, one
    float32 uniform draw of n entries, a few temporaries.
    """
    if x.numel() == 0 or (density >= 1 and epsilon == 0):
        return x
    if density <= 0:
        return torch.zeros_like(x)
    rows = x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)
    m = rows.shape[1]
    if m > 1:
        order = torch.sort(rows.abs(), dim=1, descending=True, stable=True).indices
        steps = torch.arange(m, device=x.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, steps).to(x.dtype)
        keep_prob = (density + epsilon / 2) - rank * (epsilon / (m - 1))
    else:
        keep_prob = torch.full_like(rows, density)
    keep = torch.rand(rows.shape, generator=generator, device=x.device) < keep_prob
    scaled = rows / keep_prob.clamp_min(torch.finfo(x.dtype).tiny)
    return torch.where(keep, scaled, 0.0).reshape(x.shape)


def magprune_task_vectors(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    densities: Sequence[float],
    epsilons: Sequence[float],
    seed: int,
) -> list[torch.Tensor]:
    """Return ``magprune(x_i - base)`` per model, model i drawing from its own generator.

    The generator is :func:`dare_generator` of (tensor seed, model index). Cost per model:
    one subtraction and one :func:`magprune`.
    """
    pairs = zip(task_vectors(base, experts), densities, epsilons, strict=True)
    return [
        magprune(tau, density, epsilon, dare_generator(seed, i, tau.device))
        for i, (tau, density, epsilon) in enumerate(pairs)
    ]


# -- TALL masks and consensus -------------------------------------------------------------


def tall_masks(
    taus: Sequence[torch.Tensor], lambdas: Sequence[float], multi_task: torch.Tensor
) -> list[torch.Tensor]:
    """Return the TALL masks ``m_t = |tau_t| >= lambda_t * |multi_task - tau_t|`` (boolean).

    ``multi_task`` is the merged task vector (``sum_t tau_t`` for task arithmetic): an entry
    belongs to task t when the fine-tuned model is at least ``lambda_t`` times closer to the
    merged model than to the base there. ``lambda_t = 0`` keeps every entry (``>=``, unlike
    the reference code's strict ``>``, which drops entries where both sides are 0). Paper:
    Wang et al. 2024, arXiv 2405.07813, eq. for TALL masks. Cost: K boolean tensors (one
    byte per entry each), two float temporaries at a time.
    """
    return [
        tau.abs() >= lam * (multi_task - tau).abs()
        for tau, lam in zip(taus, lambdas, strict=True)
    ]


def consensus_mask(masks: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """Return where at least ``k`` of the boolean ``masks`` are set (all True when k <= 0).

    Cost: one int16 counter (K < 32768) and a boolean result.
    """
    if k <= 0:
        return torch.ones_like(masks[0], dtype=torch.bool)
    count = torch.zeros_like(masks[0], dtype=torch.int16)
    for mask in masks:
        count.add_(mask)
    return count >= k


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
