"""Building blocks shared by the data-free merge methods: tensor math and parameter types.

Costs are for one tensor of ``n`` entries and ``K`` experts; "a temporary" is one extra
float tensor of ``n`` entries (a boolean mask is a quarter of one). Nothing here reads a
file or keeps state; random functions take a ``torch.Generator``.

In place or not: a function whose name ends in ``_`` (torch's convention) overwrites the
tensors its docstring names and returns its result in one of their buffers; those tensors
must be contiguous. Every other function leaves its arguments as they were. A method owns
its task vectors: :func:`task_vectors` computes them in the experts' own buffers when the
engine lends them (``TensorContext.scratch``), else into new tensors, so a Python caller's
tensors are never changed, and everything after that step works in place on them. A method
that needs K task vectors at once therefore adds only O(1) temporaries to the K + 1 inputs.
Elementwise work in several steps runs a block at a time (:func:`blocks`): its temporaries
are of one block, in cache, and each tensor crosses the memory bus once.

Tie rules (documented once, here):

* :func:`magnitude_trim_` keeps exactly ``round(density * n)`` entries (Python's ``round``,
  halves to even). Entries tied with the k-th largest magnitude are kept lowest flat index
  first (:func:`top_k`), so the result does not depend on the device or the selection
  algorithm. :func:`magnitude_band_` (Breadcrumbs) and :func:`magprune_` (DELLA, which
  ranks with a stable sort) break magnitude ties the same way: the lower index ranks higher.
  Magnitudes are ranked by their bit patterns, so a NaN ranks above every number.
* :class:`GlobalMagnitudeThreshold` (TIES ``trim_scope: model``) returns the exact k-th
  largest magnitude of each model's whole task vector; :func:`threshold_trim_` keeps every
  entry at or above it, so entries tied with the threshold are all kept (more than k only
  when magnitudes tie exactly at the threshold; ties at zero change nothing).
* :func:`elect_sign` returns 0 where the summed mass is exactly 0; no expert agrees with a
  0 sign except zero entries, so such an entry merges to 0.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, ClassVar, Self, TypeVar

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


INT8_MASK_NOTE = (
    "mergekit stores its sign masks as int8 to save memory; here masks are boolean and the "
    "computation is float32 (compute_dtype), so the merge is the same either way"
)


class GtaParams(TaskVectorParams):
    """Global parameters of the methods mergekit implements as generalized task arithmetic
    (task_arithmetic, ties, dare_*, breadcrumbs, della*): mergekit's ``int8_mask`` is
    accepted and changes nothing (the planner logs why, from ``ignored``)."""

    ignored: ClassVar[dict[str, str]] = {"int8_mask": INT8_MASK_NOTE}

    int8_mask: bool = Field(
        False, description="accepted for mergekit recipes; changes nothing (boolean masks, "
        "float32 compute)"
    )


class WeightNormalizeParams(GtaParams):
    """GTA parameters with mergekit's ``normalize`` for methods without a sign election."""

    normalize: bool = Field(
        False,
        description="divide the weighted sum of task vectors by the sum of the weights "
        "(mergekit's; skipped when the weights sum to less than 1e-8 in magnitude)",
    )


def normalized_weights(weights: Sequence[float], normalize: bool) -> list[float]:
    """Return ``w_i / sum(w)`` when ``normalize`` (mergekit's ``normalize`` of task
    arithmetic: the weighted sum divided by the summed weight, skipped when
    ``|sum(w)| < 1e-8``), else the weights unchanged. Cost: nothing."""
    total = math.fsum(weights)
    if not normalize or abs(total) < 1e-8:
        return list(weights)
    return [w / total for w in weights]


def l1_rescaled_(trim: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Return ``trim(x)`` (which may overwrite ``x``) scaled so that its L1 norm equals
    ``x``'s before the trim: mergekit's ``rescale: true`` for magnitude trims (TIES,
    Breadcrumbs). Left unscaled when either norm is below 1e-7, as mergekit does.
    Cost: two L1 norms in float64."""
    before = float(torch.linalg.vector_norm(x, 1, dtype=torch.float64))
    out = trim(x)
    after = float(torch.linalg.vector_norm(out, 1, dtype=torch.float64))
    if before >= 1e-7 and after >= 1e-7:
        out.mul_(before / after)
    return out


class SignConsensusParams(GtaParams):
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


DROP_RESCALE_NOTE = ("divide each kept entry by its keep probability (the paper's); false: "
                     "keep it as it is (mergekit's rescale: false)")


class DropParams(WeightNormalizeParams):
    """Global parameters of the random drops without election (dare_linear, della_linear)."""

    rescale: bool = Field(True, description=DROP_RESCALE_NOTE)


class DropSignConsensusParams(SignConsensusParams):
    """Global parameters of the random drops with TIES's election (dare_ties, della)."""

    rescale: bool = Field(True, description=DROP_RESCALE_NOTE)


L1_RESCALE_NOTE = ("scale each trimmed task vector back to its L1 norm before the trim "
                   "(mergekit's rescale)")


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


class IgnoredWeightModelParams(ModelParams):
    """Per-model parameters of methods that do not weight their models but accept a
    ``weight`` and ignore it, as mergekit does (slerp, model_stock, passthrough)."""

    ignored: ClassVar[dict[str, str]] = {
        "weight": "this method does not weight its models (mergekit ignores it too)"}

    weight: Weight = Field(1.0, description="accepted for mergekit recipes and ignored")


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


class TallModelParams(ModelParams):
    """Per-model parameters of the TALL-mask methods (consensus, tall_masks)."""

    weight: Weight = Field(1.0, description="coefficient of this model's task vector in tau_MTL")
    tall_lambda: float = Field(
        0.4,
        ge=0.0,
        allow_inf_nan=False,
        description="TALL mask threshold lambda_t: task t uses a weight where |tau_t| >= "
        "lambda_t * |tau_MTL - tau_t| (0: every weight)",
    )


# -- independent work on threads ----------------------------------------------------------

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")

PARALLEL_FROM = 2 * (1 << 17)
"""Entries from which a tensor's independent work is worth threads (two blocks of BLOCK)."""


def each(
    fn: Callable[[_Item], _Result], items: Iterable[_Item], threads: int = 1
) -> Iterator[_Result]:
    """Yield ``fn(item)`` for each item, in order, computed on up to ``threads`` threads.

    For independent work on separate memory (one expert each, disjoint blocks of one
    tensor): torch releases the GIL in its kernels, so the threads run on separate cores.
    Each item is computed by the same code on its own data, so the results are those of
    the plain loop whatever ``threads``. ``threads <= 1`` (or a single item) is that loop,
    lazily; otherwise every item is computed before the first is yielded. An exception
    in ``fn`` is raised here. Cost: a thread pool per call when threaded, about 0.1 ms.
    """
    if threads <= 1:
        yield from map(fn, items)
        return
    items = list(items)
    if len(items) <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="merge") as pool:
        results = list(pool.map(fn, items))
    yield from results


# -- task vectors and sums ----------------------------------------------------------------


def task_vector(base: torch.Tensor, expert: torch.Tensor, *, in_place: bool = False
                ) -> torch.Tensor:
    """Return ``expert - base``, in ``expert``'s buffer when ``in_place`` (overwriting it),
    else a new tensor. Cost: one subtraction."""
    return expert.sub_(base) if in_place else torch.sub(expert, base)


def task_vectors(
    base: torch.Tensor, experts: Iterable[torch.Tensor], *, in_place: bool = False
) -> Iterator[torch.Tensor]:
    """Yield ``tau_i = expert_i - base`` lazily, each a tensor the caller may overwrite.

    ``in_place=True`` (pass ``ctx.scratch``) computes each task vector in its expert's
    buffer, overwriting the expert; otherwise each is a new tensor. Cost: one subtraction
    per item, plus one new tensor when not in place.
    """
    for expert in experts:
        yield task_vector(base, expert, in_place=in_place)


def prepared_task_vectors(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    prepare: Callable[[int, torch.Tensor], torch.Tensor],
    *,
    in_place: bool = False,
    threads: int = 1,
) -> Iterator[torch.Tensor]:
    """Yield ``prepare(i, expert_i - base)`` for each expert, model i's work on up to
    ``threads`` threads (:func:`each`: the results do not depend on ``threads``).

    ``prepare`` trims, drops or ranks one task vector (it may overwrite it) and returns
    the result; ``in_place`` as in :func:`task_vectors`. Lazy, one task vector at a time,
    when ``threads <= 1``. Cost: K subtractions and K ``prepare`` calls.
    """
    def one(i: int) -> torch.Tensor:
        return prepare(i, task_vector(base, experts[i], in_place=in_place))

    return each(one, range(len(experts)), threads)


def writable(tensors: Iterable[torch.Tensor], scratch: bool) -> list[torch.Tensor]:
    """Return ``tensors`` for a method to overwrite: themselves if ``scratch``, else copies.

    For methods that work on the experts rather than on task vectors. Cost: nothing, or
    one copy per tensor when not ``scratch``.
    """
    return list(tensors) if scratch else [t.clone() for t in tensors]


def weighted_sum(
    tensors: Iterable[torch.Tensor], weights: Sequence[float], *, in_place: bool = False
) -> torch.Tensor:
    """Return ``sum_i w_i x_i``.

    ``tensors`` may be a generator: only one of them and the accumulator are alive at a
    time. ``in_place=True`` accumulates in the first tensor's buffer (overwriting it);
    otherwise the sum is one new tensor. Cost: K multiply-adds. Raises ValueError on an
    empty input.
    """
    total: torch.Tensor | None = None
    for x, w in zip(tensors, weights, strict=True):
        if total is None:
            total = x.mul_(w) if in_place else x * w
        else:
            total.add_(x, alpha=w)
    if total is None:
        raise ValueError("weighted_sum needs at least one tensor")
    return total


BLOCK = 1 << 17
"""Entries processed at a time by the blockwise functions: 512 KiB of float32, in cache."""


def blocks(*tensors: torch.Tensor) -> Iterator[list[torch.Tensor]]:
    """Yield aligned flat slices of ``BLOCK`` entries of contiguous tensors of one shape.

    The slices are views: writing to them writes to the tensors. For elementwise work done
    in several steps, running every step on one block before the next keeps the block in
    cache, so each tensor crosses the memory bus once instead of once per step.
    """
    flat = [t.view(-1) for t in tensors]
    for start in range(0, flat[0].numel(), BLOCK):
        yield [f[start : start + BLOCK] for f in flat]


# -- exact selection ----------------------------------------------------------------------
#
# Ranks, counts and k-th values are taken on integer keys: the bit pattern of a
# non-negative float read as an integer of the same width grows with the value, so
# ``|x|`` viewed as integers sorts like the magnitudes (and a NaN above every number). A
# full ``torch.kthvalue`` costs some 15-40 ns an entry on a CPU; :func:`_narrow` instead
# proposes a bracket from a small sample's quantiles, checks it with exact counts over every
# entry and runs ``kthvalue`` only on the entries inside it (a few percent). A bracket that
# misses falls back to the full ``kthvalue``, so the result is always exact. Keys are made a
# block at a time (:func:`blocks`), for the whole tensor only when the bracket misses.

Keys = Callable[[torch.Tensor], torch.Tensor]
"""Maps a tensor to one integer per entry (flattened) in the order to rank them by."""

_INTEGER_OF = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
_SAMPLED_FROM = 1 << 15  # below this many entries a plain kthvalue is cheaper than sampling
_SAMPLE_SHIFT = 6  # sample n / 64 entries ...
_SAMPLE_MAX = 1 << 14  # ... at most this many (fewer than torch's grain: one thread sorts them)
_SAMPLE_SPREAD = 4.0  # bracket half-width, in standard deviations of the sample rank


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """Return ``|x|`` flattened and viewed as integers: their order is the magnitudes' order.

    Cost: one temporary of ``x``'s size.
    """
    return x.detach().abs().reshape(-1).view(_INTEGER_OF[x.dtype])


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """Return one integer per entry of ``x`` (flattened) whose order is the values' order.

    The bits of a negative float are flipped below the sign bit, so -0.0 sorts just below
    0.0 and -NaN below every number. Cost: one temporary of ``x``'s size.
    """
    bits = x.detach().reshape(-1).view(_INTEGER_OF[x.dtype])
    flip = bits >> (8 * bits.element_size() - 1)  # -1 for negative values, else 0
    return flip.bitwise_and_(torch.iinfo(bits.dtype).max).bitwise_xor_(bits)


def _sample_bracket(flat: torch.Tensor, rank: int, key: Keys) -> tuple[int, int]:
    """Return keys ``(lo, hi)`` likely to enclose the ``rank``-th smallest key of ``flat``.

    From the quantiles of a fixed pseudo-random sample of n / 64 entries (at most
    ``_SAMPLE_MAX``), about ``_SAMPLE_SPREAD`` standard deviations of the sample rank either
    side; the key type's limits where the bracket runs past the sample's ends.
    """
    n = flat.numel()
    size = min(n >> _SAMPLE_SHIFT, _SAMPLE_MAX)
    picks = torch.randint(n, (size,), generator=torch.Generator().manual_seed(0))
    sample = key(flat[picks.to(flat.device)]).sort().values
    q = (rank - 0.5) / n
    spread = _SAMPLE_SPREAD * math.sqrt(size * q * (1 - q)) + 2
    first, last = math.floor(q * size - spread), math.ceil(q * size + spread)
    limits = torch.iinfo(sample.dtype)
    lo = int(sample[first]) if first >= 0 else limits.min
    hi = int(sample[last]) if last < size else limits.max
    return lo, hi


def _narrow(flat: torch.Tensor, rank: int, key: Keys) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return ``(index, inside, below)`` around the ``rank``-th smallest (1-based) key.

    ``flat`` is a contiguous 1-D tensor. ``index`` holds, in ascending order, the positions
    of the entries whose keys lie in a range ``[lo, hi]`` that contains the ``rank``-th
    smallest key and every key equal to it; ``inside`` their keys. Exactly ``below`` keys
    are smaller than ``lo``; all the other keys outside the range are larger than ``hi``.
    Cost for large tensors on a CPU: a key, two comparisons, a count and a nonzero per
    block, and a kthvalue on the bracket's entries; otherwise (small tensors, other
    devices, or a bracket that misses) the keys of the whole tensor, one full kthvalue, two
    comparisons and a count.
    """
    n = flat.numel()
    if n >= _SAMPLED_FROM and flat.device.type == "cpu":  # a GPU's kthvalue is fast enough
        lo, hi = _sample_bracket(flat, rank, key)
        above, start, positions, values = 0, 0, [], []
        for (part,) in blocks(flat):
            keys = key(part)
            greater = keys > hi
            above += int(torch.count_nonzero(greater))
            index = (keys >= lo).logical_xor_(greater).nonzero().view(-1)
            positions.append(index + start)
            values.append(keys[index])
            start += part.numel()
        index = torch.cat(positions)
        below = n - above - index.numel()
        if below < rank <= n - above:  # the bracket holds the rank-th smallest key
            return index, torch.cat(values), below
    keys = key(flat)
    value = torch.kthvalue(keys, rank).values
    index = (keys == value).nonzero().view(-1)
    below = int(torch.count_nonzero(keys < value))
    return index, keys[index], below


def kthvalue(x: torch.Tensor, k: int) -> torch.Tensor:
    """Return the ``k``-th smallest entry of ``x`` (1-based, over all entries) as a 0-d tensor.

    Equal to ``torch.kthvalue(x.reshape(-1), k).values`` (up to the sign of a zero: -0.0
    ranks below 0.0 here), several times faster on large tensors. Cost: :func:`_narrow`.
    """
    flat = x.detach().reshape(-1)
    index, inside, below = _narrow(flat, k, order_keys)
    return flat[index[torch.kthvalue(inside, k - below).indices]].clone()  # not a view


def keep_where_(
    x: torch.Tensor, keys: torch.Tensor, least: int, *, at_least: bool = True
) -> torch.Tensor:
    """Zero the entries of ``x`` whose key is below ``least`` (``at_least=False``: at least
    ``least``), in place; returns ``x``.

    ``keys`` holds one integer ``>= 0`` per entry (flat; overwritten). Integer arithmetic
    instead of a boolean mask, which costs several times more on a CPU (``masked_fill_``):
    ``least - 1 - key`` is negative exactly where ``key >= least`` and ``key - least``
    exactly where ``key < least``; shifting the sign bit down gives all ones there and 0
    elsewhere, and AND-ing an entry's bits with that keeps the entry or makes it +0.0.
    Cost: three integer passes over ``keys``, one over ``x``.
    """
    if least <= 0:  # every key is at least least
        return x if at_least else x.zero_()
    if least > torch.iinfo(keys.dtype).max:  # every key is below least
        return x.zero_() if at_least else x
    kept = keys.neg_().add_(least - 1) if at_least else keys.sub_(least)
    mask = kept.bitwise_right_shift_(8 * keys.element_size() - 1)
    bits = x.view(-1).view(_INTEGER_OF[x.dtype])
    bits.bitwise_and_(mask if mask.dtype == bits.dtype else mask.to(bits.dtype))
    return x


@dataclass(frozen=True)
class TopK:
    """The ``k`` largest magnitudes of a tensor, as two rules on magnitude keys
    (:func:`magnitude_keys`): up to flat position ``cut`` every entry with key ``>= floor``
    is selected, after it every entry with key ``> floor``. Ties with the k-th largest
    magnitude (key ``floor``) are thereby selected lowest position first."""

    floor: int
    cut: int

    def _rules(self, flat: torch.Tensor) -> tuple[tuple[torch.Tensor, int], ...]:
        """Return (entries, least key selected) up to the cut and after it."""
        return (flat[: self.cut + 1], self.floor), (flat[self.cut + 1 :], self.floor + 1)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """Return the boolean mask of the selected entries of ``x`` (contiguous)."""
        keep = torch.empty(x.shape, dtype=torch.bool, device=x.device)
        for (entries, least), (out, _) in zip(
            self._rules(x.view(-1)), self._rules(keep.view(-1)), strict=True
        ):
            for part, part_out in blocks(entries, out):
                torch.gt(magnitude_keys(part), least - 1, out=part_out)
        return keep

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """Zero the entries of ``x`` outside the selection, in place; returns ``x``."""
        return self._zero_(x, selected=False)

    def remove_(self, x: torch.Tensor) -> torch.Tensor:
        """Zero the selected entries of ``x``, in place; returns ``x``."""
        return self._zero_(x, selected=True)

    def _zero_(self, x: torch.Tensor, *, selected: bool) -> torch.Tensor:
        """Zero the selected entries of ``x``, or the others, by blocks."""
        for entries, least in self._rules(x.view(-1)):
            for (part,) in blocks(entries):
                if selected:
                    keep_where_(part, magnitude_keys(part), least, at_least=False)
                else:
                    keep_magnitudes_(part, least)
        return x


def keep_magnitudes_(x: torch.Tensor, least: int) -> torch.Tensor:
    """Zero the entries of ``x`` whose magnitude key (:func:`magnitude_keys`) is below
    ``least``, in place; returns ``x``. The same as :func:`keep_where_` on
    ``magnitude_keys(x)`` (a zeroed entry becomes +0.0, a NaN is kept) in one pass.

    ``torch.hardshrink`` with ``lambd`` the largest magnitude below ``least`` keeps exactly
    the entries of magnitude key ``>= least``: no float lies between two adjacent keys, and
    a NaN fails both of its comparisons. Where that bound is a NaN pattern or a subnormal
    (which ``torch.set_flush_denormal`` would compare as 0) it falls back to
    :func:`keep_where_`. Cost: one elementwise pass (about 3x cheaper on a CPU than the
    integer steps of :func:`keep_where_`).
    """
    if least <= 0:
        return x
    below = _magnitude_of_key(least - 1, x.dtype)
    if below is None or 0 < below < torch.finfo(x.dtype).tiny:
        return keep_where_(x, magnitude_keys(x), least)
    return torch.hardshrink(x, below, out=x)


_BITS_OF = {  # struct formats: (integer, float) of each float dtype's width
    torch.float64: ("<q", "<d"),
    torch.float32: ("<i", "<f"),
    torch.float16: ("<h", "<e"),
}


def _magnitude_of_key(key: int, dtype: torch.dtype) -> float | None:
    """Return the non-negative float of ``dtype`` whose magnitude key is ``key``, exactly
    (a Python float holds every value of these dtypes); None for a NaN pattern or a key
    outside the dtype's non-negative range. Cost: a few Python operations."""
    width = torch.finfo(dtype).bits
    if not 0 <= key < 1 << (width - 1):
        return None
    if dtype == torch.bfloat16:  # the upper half of a float32
        value = struct.unpack("<f", struct.pack("<i", key << 16))[0]
    else:
        ints, floats = _BITS_OF[dtype]
        value = struct.unpack(floats, struct.pack(ints, key))[0]
    return None if math.isnan(value) else value


def top_k(x: torch.Tensor, k: int, *, exact: bool = True) -> TopK:
    """Return the selection of exactly the ``k`` largest ``|x|`` (``1 <= k``; ``k >= n``: all).

    ``x`` is contiguous. Entries tied with the k-th largest magnitude are selected lowest
    flat index first, so ``top_k(x, a)`` is contained in ``top_k(x, b)`` for ``a <= b``.
    ``exact=False``: when the k-th largest magnitude is 0, select every non-zero entry
    instead (the same entries once applied to ``x``, without locating the zeros). Cost:
    :func:`_narrow` (linear time, no sort).
    """
    n = x.numel()
    if k >= n:
        return TopK(0, n - 1)
    rank = n - k + 1  # the k-th largest is the rank-th smallest
    index, inside, below = _narrow(x.detach().view(-1), rank, magnitude_keys)
    threshold = int(torch.kthvalue(inside, rank - below).values)
    if threshold == 0 and not exact:
        return TopK(1, n - 1)
    above = n - below - index.numel()
    tied_kept = k - above - int(torch.count_nonzero(inside > threshold))  # at least 1
    return TopK(threshold, int(index[inside == threshold][tied_kept - 1]))


def top_k_mask(x: torch.Tensor, k: int, *, exact: bool = True) -> torch.Tensor:
    """Return a boolean mask of ``x``'s shape selecting exactly its ``k`` largest ``|x|``.

    ``k`` is clipped to ``[0, n]``; ties and ``exact`` as in :func:`top_k`. Cost:
    :func:`top_k` and the mask.
    """
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    x = x.contiguous()
    return top_k(x, k, exact=exact).mask(x)


# -- magnitude trimming -------------------------------------------------------------------


def keep_count(density: float, n: int) -> int:
    """Return how many of ``n`` entries a trim to ``density`` keeps: ``round(density * n)``."""
    return min(n, max(0, round(density * n)))


def magnitude_trim_(x: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``round(density * n)`` largest-magnitude entries of ``x``, in place.

    Ties at the threshold are kept lowest flat index first (:func:`top_k`). Returns ``x``.
    Cost: :func:`top_k` and one pass; nothing when nothing is dropped.
    """
    n = x.numel()
    k = keep_count(density, n)
    if k == n:
        return x
    if k == 0:
        return x.zero_()
    return top_k(x, k, exact=False).apply_(x)


def magnitude_trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """Return a copy of ``x`` trimmed by :func:`magnitude_trim_`. Cost: one more copy."""
    return magnitude_trim_(x.clone(memory_format=torch.contiguous_format), density)


def magnitude_band_(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep only a band of ``x``'s magnitude ranking, in place (Model Breadcrumbs).

    Ranked by ``|x|`` from the largest (ties lowest flat index first), the first
    ``top = round(gamma * n)`` entries (the outliers) are zeroed, the next
    ``k = round(density * n)`` kept and the rest (the small ones) zeroed. When
    ``top + k > n`` the kept count wins: ``top`` shrinks to ``n - k``. ``gamma = 0`` is
    :func:`magnitude_trim_`. Returns ``x``. Cost: two :func:`top_k` and two passes.
    """
    n = x.numel()
    k = keep_count(density, n)
    top = min(keep_count(gamma, n), n - k)
    if top == 0 or k == 0:
        return magnitude_trim_(x, density)
    band = top_k(x, top + k, exact=False)  # ranked before x changes
    top_k(x, top, exact=False).remove_(x)
    return band.apply_(x)


def threshold_trim_(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero the entries of ``x`` of magnitude below ``threshold`` in place (ties kept).

    Returns ``x``. Cost: one pass, by blocks; nothing when ``threshold`` is 0.
    """
    if threshold == 0:
        return x
    for (part,) in blocks(x):
        part.masked_fill_((part.abs() >= threshold).logical_not_(), 0.0)
    return x


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


def elect_sign(
    electors: Iterable[torch.Tensor], weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Return ``sign(sum_i w_i electors_i)`` (+1, -1, or 0 where the sum is exactly 0).

    The sign with the larger summed mass wins, as in TIES; ``weights`` default to 1.
    Cost: one new tensor.
    """
    electors = list(electors)
    weights = [1.0] * len(electors) if weights is None else weights
    return weighted_sum(electors, weights).sign_()


def disjoint_mean_(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    sign: torch.Tensor,
    *,
    elector_signs: Sequence[float] | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Return ``sum_{i in A} w_i delta_i / sum_{i in A} w_i``, A: the agreeing experts.

    ``A = {i: sign(s_i delta_i) = sign}`` is taken per entry; ``s_i`` is
    ``elector_signs[i]`` (1 by default; the sign of ``w_i`` when signs were elected on
    ``w_i delta_i``, 0 for an expert that elects nothing). Where the agreeing weights sum
    to exactly 0 (no expert agrees, or weights cancel) the sum is returned undivided; where
    ``sign`` is 0 the result is 0. ``normalize=False`` returns the disjoint weighted sum.
    Overwrites ``deltas``; the result is in ``deltas[0]``'s buffer. Cost: one accumulator
    (none without ``normalize``) and about five float passes per expert, no boolean mask.
    """
    signs = [1.0] * len(deltas) if elector_signs is None else elector_signs
    mass = torch.zeros_like(sign) if normalize else None
    total: torch.Tensor | None = None
    for delta, w, s in zip(deltas, weights, signs, strict=True):
        # sign(s delta) = sign  <=>  s delta sign > 0 wherever sign != 0, so the agreeing
        # entries of s delta sign are its positive part: no comparison with a temporary.
        # Where sign is 0 the agreeing deltas are 0 and the entry merges to 0 anyway.
        agreeing = delta.mul_(sign)
        if s != 1:
            agreeing.mul_(s)
        agreeing.clamp_min_(0.0)  # |delta| where it agrees, else 0
        if mass is not None:  # sign() of the non-negative part: 1 where it agrees, else 0
            mass.add_(agreeing.sign(), alpha=w)
        # w delta = (w s) * agreeing * sign where it agrees: sign is applied once at the end
        total = agreeing.mul_(w * s) if total is None else total.add_(agreeing, alpha=w * s)
    assert total is not None  # the registry guarantees at least one expert
    total.mul_(sign)
    if mass is None:
        return total
    # divide by 1 where mass is 0: adding 1 - |sign(mass)| changes nothing elsewhere (float
    # arithmetic: a boolean mask and masked_fill_ cost several times more on a CPU)
    return total.div_(mass.add_(1 - mass.sign().abs_()))


def sign_consensus_(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = True,
    sign_on_weighted: bool = False,
    threads: int = 1,
) -> torch.Tensor:
    """Return the TIES merge of (already trimmed) task vectors: sign election + disjoint mean.

    ``sign_on_weighted`` elects, and tests agreement, on ``w_i * delta_i`` (mergekit);
    otherwise on the unweighted deltas (the paper). Overwrites ``deltas``; the result is in
    ``deltas[0]``'s buffer. Every entry is independent, so the work runs ``BLOCK`` entries at
    a time (:func:`blocks`), the blocks on up to ``threads`` threads (:func:`each`; the
    result does not depend on it): each delta is read from memory once, and the sign and
    the accumulator are temporaries of one block per thread, in cache.
    """
    electors = weights if sign_on_weighted else None
    signs = [math.copysign(1.0, w) if w != 0 else 0.0 for w in weights] if electors else None

    def merge_block(parts: list[torch.Tensor]) -> None:
        sign = elect_sign(parts, electors)
        disjoint_mean_(parts, weights, sign, elector_signs=signs, normalize=normalize)

    for _ in each(merge_block, blocks(*deltas), threads):
        pass
    return deltas[0]


def add_sign_consensus_(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    models: Sequence[ModelParams],
    params: SignConsensusParams,
    threads: int = 1,
) -> torch.Tensor:
    """Return ``base + lambda * sign_consensus_(deltas)``: the TIES ending shared by ties,
    dare_ties and della, on up to ``threads`` threads. Overwrites ``deltas``; the result is
    in ``deltas[0]``'s buffer."""
    merged = sign_consensus_(
        deltas,
        [m.weight for m in models],
        normalize=params.normalize,
        sign_on_weighted=params.sign_on_weighted,
        threads=threads,
    )
    return torch.add(base, merged, alpha=params.scale, out=merged)


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


def _with_noise(
    parts: Sequence[torch.Tensor], generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield each part with uniform [0, 1) draws of its shape, in order, from one buffer.

    The draws are those of one ``torch.rand`` over all the parts (the CPU generator fills
    a tensor in order), in the default float dtype.
    """
    noise = torch.empty(max(p.numel() for p in parts), device=parts[0].device)
    for part in parts:
        yield part, noise[: part.numel()].view(part.shape).uniform_(generator=generator)


def dare_(
    x: torch.Tensor, density: float, generator: torch.Generator, *, rescale: bool = True
) -> torch.Tensor:
    """Apply DARE to ``x`` in place: keep each entry with probability ``density``, rescaled.

    That is, drop probability ``p = 1 - density`` and rescale kept entries by exactly
    ``1 / (1 - p)``, so the expectation equals ``x`` (``rescale=False``: kept entries stay
    as they are; the same entries are kept). Returns ``x``; density 1 changes and
    draws nothing, density 0 zeros ``x`` (drawing nothing). Cost: one float uniform draw
    per entry, made ``BLOCK`` entries at a time into one reused buffer.
    """
    if density >= 1:
        return x
    if density <= 0:
        return x.zero_()
    parts = x.view(-1).split(BLOCK)
    for part, draw in _with_noise(parts, generator):
        # a draw in [0, 1) is kept when below the density (in the draws' dtype, as torch
        # compares): for non-negative floats the bit patterns compare as the values do
        threshold = int(draw.new_tensor(density).view(_INTEGER_OF[draw.dtype]))
        keep_where_(part, draw.view(_INTEGER_OF[draw.dtype]), threshold, at_least=False)
        if rescale:
            part.div_(density)
    return x


def dare_task_vectors(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    densities: Sequence[float],
    seed: int,
    *,
    in_place: bool = False,
    rescale: bool = True,
    threads: int = 1,
) -> Iterator[torch.Tensor]:
    """Yield ``dare_(x_i - base, density_i)``, model i drawing from its own generator.

    ``in_place`` as in :func:`task_vectors`; ``rescale`` as in :func:`dare_`; the models on
    up to ``threads`` threads, lazily with one (:func:`prepared_task_vectors`). Cost per
    item: one subtraction and one :func:`dare_`.
    """
    if len(densities) != len(experts):
        raise ValueError("dare_task_vectors needs one density per expert")

    def drop(i: int, tau: torch.Tensor) -> torch.Tensor:
        return dare_(tau, densities[i], dare_generator(seed, i, tau.device), rescale=rescale)

    return prepared_task_vectors(base, experts, drop, in_place=in_place, threads=threads)


def magprune_(
    x: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    *,
    rescale: bool = True,
) -> torch.Tensor:
    """Apply DELLA's MagPrune to ``x`` in place: magnitude-ranked random drop, rescaled.

    Each row (``x`` viewed as ``shape[0] x rest``; 0-d and 1-D tensors are one row) of
    ``m`` entries is ranked by ``|x|`` from the largest (rank 0; ties lowest index first).
    Entry of rank ``r`` is kept with probability
    ``q_r = density + epsilon / 2 - epsilon * r / (m - 1)`` (``density`` when ``m = 1``),
    i.e. drop probabilities ``p_r = 1 - q_r`` linearly spaced over
    ``[p - epsilon/2, p + epsilon/2]``, ``p = 1 - density``, the largest magnitude least
    likely dropped; a kept entry is divided by ``q_r`` (``1 / (1 - p_r)``), so each entry's
    expectation is itself (``rescale=False``: kept entries stay as they are). Callers
    ensure ``epsilon / 2 <= min(density, 1 - density)``;
    an entry with ``q_r = 0`` is always dropped. Returns ``x``; density 1 with epsilon 0
    changes nothing and density 0 zeros ``x`` (both drawing nothing). Cost: one stable sort
    per row; rows are processed about ``BLOCK`` entries at a time, so the sort's indices,
    the probabilities and the draws take a few temporaries of that size, not of ``n``.
    """
    if x.numel() == 0 or (density >= 1 and epsilon == 0):
        return x
    if density <= 0:
        return x.zero_()
    rows = x.view(x.shape[0], -1) if x.dim() >= 2 else x.view(1, -1)
    m = rows.shape[1]
    steps = torch.arange(m, device=x.device, dtype=x.dtype)
    by_rank = (density + epsilon / 2) - steps * (epsilon / max(m - 1, 1))
    tiny = torch.finfo(x.dtype).tiny
    for part, draw in _with_noise(rows.split(max(1, BLOCK // m)), generator):
        keep_prob = torch.empty_like(part)
        if m > 1:
            keys = magnitude_keys(part).view(part.shape)  # integers sort faster than floats
            order = torch.sort(keys, dim=1, descending=True, stable=True).indices
            keep_prob.scatter_(1, order, by_rank.expand_as(part))
        else:
            keep_prob.fill_(density)
        drop = draw >= keep_prob
        if rescale:
            part.div_(keep_prob.clamp_min_(tiny))
        part.masked_fill_(drop, 0.0)
    return x


def magprune_task_vectors(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    densities: Sequence[float],
    epsilons: Sequence[float],
    seed: int,
    *,
    in_place: bool = False,
    rescale: bool = True,
    threads: int = 1,
) -> Iterator[torch.Tensor]:
    """Yield ``magprune_(x_i - base)``, model i drawing from its own generator.

    The generator is :func:`dare_generator` of (tensor seed, model index); ``in_place`` as
    in :func:`task_vectors`, ``rescale`` as in :func:`magprune_`; the models on up to
    ``threads`` threads, lazily with one (:func:`prepared_task_vectors`). Cost per model:
    one subtraction and one :func:`magprune_`.
    """
    if not len(densities) == len(epsilons) == len(experts):
        raise ValueError("magprune_task_vectors needs one density and epsilon per expert")

    def prune(i: int, tau: torch.Tensor) -> torch.Tensor:
        return magprune_(tau, densities[i], epsilons[i], dare_generator(seed, i, tau.device),
                         rescale=rescale)

    return prepared_task_vectors(base, experts, prune, in_place=in_place, threads=threads)


# -- TALL masks and consensus -------------------------------------------------------------


def tall_masks(
    taus: Iterable[torch.Tensor], lambdas: Sequence[float], multi_task: torch.Tensor
) -> Iterator[torch.Tensor]:
    """Yield the TALL masks ``m_t = |tau_t| >= lambda_t * |multi_task - tau_t|`` (boolean).

    ``multi_task`` is the merged task vector (``sum_t tau_t`` for task arithmetic): an entry
    belongs to task t when the fine-tuned model is at least ``lambda_t`` times closer to the
    merged model than to the base there. ``lambda_t = 0`` keeps every entry (``>=``, unlike
    the reference code's strict ``>``, which drops entries where both sides are 0). Paper:
    Wang et al. 2024, arXiv 2405.07813, eq. for TALL masks. Lazy: one mask at a time,
    costing two temporaries while it is computed and one byte per entry.
    """
    for tau, lam in zip(taus, lambdas, strict=True):
        distance = torch.sub(multi_task, tau).abs_().mul_(lam)
        yield tau.abs() >= distance


def consensus_mask(masks: Iterable[torch.Tensor], k: int) -> torch.Tensor:
    """Return where at least ``k`` of the boolean ``masks`` are set (all True when k <= 0).

    ``masks`` may be a generator, consumed one at a time (only its first when k <= 0).
    Cost: one int16 counter (K < 32768) and a boolean result.
    """
    count: torch.Tensor | None = None
    for mask in masks:
        if k <= 0:
            return torch.ones_like(mask)
        count = mask.to(torch.int16) if count is None else count.add_(mask)
    if count is None:
        raise ValueError("consensus_mask needs at least one mask")
    return count >= k


# -- spherical interpolation --------------------------------------------------------------


def slerp_(
    a: torch.Tensor, b: torch.Tensor, t: float, epsilon: float, *, rows: bool = False
) -> torch.Tensor:
    """Return the spherical interpolation from ``a`` (t=0) to ``b`` (t=1) in ``a``'s buffer.

    ``sin((1-t) theta)/sin(theta) * a + sin(t theta)/sin(theta) * b`` with ``theta`` the
    angle between the flattened tensors (mergekit's formula: norms are interpolated along
    with the direction). Falls back to ``torch.lerp`` when ``|cos theta| > 1 - epsilon``
    or either norm is 0. ``rows=True`` interpolates each row of a tensor of 2 or more
    dimensions (viewed as ``shape[0] x rest``) separately, each with its own fall-back.
    Exact at t=0 and t=1. Overwrites ``a`` and ``b``. Cost: one dot product and two norms
    per row; a temporary only for the rows that fall back while others do not.
    """
    if a.numel() == 0:
        return a
    width = a[0].numel() if rows and a.dim() >= 2 else a.numel()
    a2, b2 = a.view(-1, width), b.view(-1, width)
    dot = torch.linalg.vecdot(a2, b2, dim=1).double()
    norm_a = torch.linalg.vector_norm(a2, dim=1).double()
    norm_b = torch.linalg.vector_norm(b2, dim=1).double()
    cos = dot / (norm_a * norm_b)  # NaN where a norm is 0
    spherical = cos.abs() <= 1 - epsilon  # False for NaN
    if not bool(spherical.any()):
        return a.lerp_(b, t)
    linear = ~spherical
    fallback = torch.lerp(a2[linear], b2[linear], t) if bool(linear.any()) else None
    theta = torch.acos(cos.clamp(-1.0, 1.0))
    s0 = (torch.sin((1 - t) * theta) / torch.sin(theta)).to(a.dtype).unsqueeze(1)
    s1 = (torch.sin(t * theta) / torch.sin(theta)).to(a.dtype).unsqueeze(1)
    a2.mul_(s0).add_(b2.mul_(s1))
    if fallback is not None:
        a2[linear] = fallback
    return a


# -- singular value decompositions --------------------------------------------------------


def nonzero_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the thin SVD ``(U, S, Vh)`` of a 2-D ``matrix`` without its numerically-zero
    components: those with ``s <= s_max * max(m, n) * eps`` (numpy's ``matrix_rank`` rule).

    Their singular vectors are arbitrary (any basis of the null space), so the subspace
    methods (iso_c, iso_cts, doge) leave them out; a zero matrix gives empty factors
    (``m x 0``, ``0``, ``0 x n``). Cost: one thin SVD, float32 for float32 input.
    """
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if s.numel() == 0:
        return u, s, vh
    keep = s > float(s.max()) * max(matrix.shape) * torch.finfo(s.dtype).eps
    return u[:, keep], s[keep], vh[keep, :]


@dataclass(frozen=True)
class LowRank:
    """``matrix ~ p @ q``: the best rank-``rank`` approximation (Eckart-Young), with the
    singular values split evenly between the factors (``p = U sqrt(S)``, ``q = sqrt(S) Vh``).

    ``norm`` is ``|matrix|_F``; ``energy`` the share of its square the kept components
    capture (1.0 for a zero matrix); ``relative_error`` the exact
    ``|matrix - p @ q|_F / |matrix|_F``, the norm of the dropped singular values relative
    to all of them (0.0 for a zero matrix).
    """

    p: torch.Tensor
    q: torch.Tensor
    norm: float
    energy: float
    relative_error: float


def low_rank(matrix: torch.Tensor, rank: int, *,
             generator: torch.Generator | None = None) -> LowRank:
    """Factor a 2-D ``matrix`` (m x n) into ``p`` (m x rank) and ``q`` (rank x n), padded
    with zero components when ``rank`` exceeds min(m, n). Returns a LowRank with its
    captured energy and relative error, exact for the factors returned.

    Without ``generator``: the best rank-``rank`` approximation, from one thin SVD,
    O(m n min(m, n)) in float32 (float64 for float64 input). With one: a randomized SVD
    (Halko, Martinsson, Tropp 2011: a Gaussian sketch of rank + 8 columns drawn from
    ``generator``, two power iterations, then the SVD of the small projection), O(m n
    (rank + 8)) per pass, 6 passes (the last measures the residual, one m x n
    temporary); deterministic for a seeded generator. Its error is measured, so exact,
    only not always the smallest possible.
    """
    work = matrix if matrix.dtype == torch.float64 else matrix.float()
    sketch = rank + _OVERSAMPLE
    if generator is None or sketch >= min(work.shape):
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        tail_of = lambda kept: float(s[kept:].double().square().sum())  # noqa: E731
    else:
        u, s, vh = _randomized_svd(work, sketch, generator)
        tail_of = lambda kept: float(torch.linalg.vector_norm(  # noqa: E731
            work - (u[:, :kept] * s[:kept]) @ vh[:kept])) ** 2  # no cancellation near 0
    kept = min(rank, s.numel())
    root = s[:kept].sqrt()
    p = work.new_zeros(work.shape[0], rank)
    q = work.new_zeros(rank, work.shape[1])
    p[:, :kept] = u[:, :kept] * root
    q[:kept] = root[:, None] * vh[:kept]
    tail = tail_of(kept)
    total = tail + float(s[:kept].double().square().sum())
    if total == 0.0:
        return LowRank(p, q, 0.0, 1.0, 0.0)
    return LowRank(p, q, math.sqrt(total), 1.0 - tail / total, math.sqrt(tail / total))


_OVERSAMPLE = 8  # extra sketch columns of the randomized SVD
_POWER_ITERATIONS = 2


def _randomized_svd(matrix: torch.Tensor, sketch: int, generator: torch.Generator):
    """(U, S, Vh) of ``matrix`` restricted to a ``sketch``-dimensional range estimate."""
    omega = torch.randn(matrix.shape[1], sketch, generator=generator, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ omega).Q
    for _ in range(_POWER_ITERATIONS):  # sharpen the basis toward the top singular vectors
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ u, s, vh


# -- bounded first-order optimisation -----------------------------------------------------


def adam_(
    x: torch.Tensor,
    gradient: Callable[[torch.Tensor], torch.Tensor],
    steps: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.Tensor:
    """Run ``steps`` Adam steps on ``x`` in place; returns ``x``.

    ``gradient(x)`` returns the loss gradient at ``x`` (a tensor the function may keep or
    overwrite). The update is ``torch.optim.Adam``'s (bias-corrected moments, no weight
    decay, no amsgrad), written out so that it needs no autograd and runs under
    ``torch.inference_mode``. A gradient that is exactly 0 moves nothing. Deterministic.
    Cost: ``steps`` gradient calls and about ten elementwise passes each; two moment buffers
    of ``x``'s size.
    """
    beta1, beta2 = betas
    first, second = torch.zeros_like(x), torch.zeros_like(x)
    for step in range(1, steps + 1):
        grad = gradient(x)
        first.mul_(beta1).add_(grad, alpha=1 - beta1)
        second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denominator = (second.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        x.addcdiv_(first, denominator, value=-lr / (1 - beta1**step))
    return x
