"""Shared merge primitives: hand-computed oracles and the whole-model threshold statistic."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.methods import primitives
from supermerge.methods.primitives import (
    GlobalMagnitudeThreshold,
    dare_,
    dare_generator,
    disjoint_mean_,
    elect_sign,
    keep_count,
    keep_where_,
    kthvalue,
    magnitude_band_,
    magnitude_trim,
    magnitude_trim_,
    sign_consensus_,
    slerp_,
    threshold_trim_,
    top_k_mask,
    weighted_sum,
)

T = torch.tensor
R2 = math.sqrt(2) / 2


def randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def fresh(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies for the in-place functions, so that an oracle can reuse its inputs."""
    return [t.clone() for t in tensors]


# -- sums and trims -----------------------------------------------------------------------


def test_weighted_sum():
    assert torch.equal(weighted_sum([T([1.0, 2.0]), T([3.0, 4.0])], [2.0, -1.0]), T([-1.0, 0.0]))


def test_weighted_sum_does_not_change_its_inputs():
    a = T([1.0, 2.0])
    weighted_sum([a, T([3.0, 4.0])], [1.0, 1.0])
    assert torch.equal(a, T([1.0, 2.0]))


@pytest.mark.parametrize(
    ("density", "n", "k"),
    [(0.2, 10, 2), (0.25, 10, 2), (0.26, 10, 3), (1.0, 7, 7), (0.0, 7, 0), (0.5, 0, 0)],
)
def test_keep_count_rounds(density, n, k):
    assert keep_count(density, n) == k


def test_magnitude_trim_keeps_the_largest():
    x = T([0.5, -3.0, 2.0, -1.0, 4.0, 0.0])
    assert torch.equal(magnitude_trim(x, 0.5), T([0.0, -3.0, 2.0, 0.0, 4.0, 0.0]))


def test_magnitude_trim_breaks_ties_by_lowest_index():
    x = T([1.0, -2.0, 2.0, -2.0, 0.5])
    assert torch.equal(magnitude_trim(x, 0.4), T([0.0, -2.0, 2.0, 0.0, 0.0]))


def test_magnitude_trim_keeps_shape_and_handles_the_ends():
    x = T([[1.0, -5.0], [3.0, 0.1]])
    assert torch.equal(magnitude_trim(x, 0.5), T([[0.0, -5.0], [3.0, 0.0]]))
    assert torch.equal(magnitude_trim(x, 0.0), torch.zeros(2, 2))
    assert torch.equal(magnitude_trim(x, 1.0), x)
    assert torch.equal(magnitude_trim(T([0.0, 0.0, 3.0, 0.0]), 0.75), T([0.0, 0.0, 3.0, 0.0]))
    assert torch.equal(magnitude_trim(T(2.0), 0.4), T(0.0))  # round(0.4) = 0
    assert torch.equal(magnitude_trim(T(2.0), 0.6), T(2.0))
    assert magnitude_trim(torch.zeros(0), 0.5).shape == (0,)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 300), st.floats(0, 1), st.integers(0, 2**32 - 1), st.booleans())
def test_magnitude_trim_keeps_exactly_k_of_the_largest(n, density, seed, quantize):
    x = randn(n, seed)
    if quantize:  # many exact ties
        x = (x * 2).round() / 2
    out = magnitude_trim(x, density)
    kept = out != 0
    k = keep_count(density, n)
    assert int(kept.sum()) == min(k, int((x != 0).sum()))
    assert torch.equal(out[kept], x[kept])
    if kept.any() and (~kept).any():
        assert x[~kept].abs().max() <= x[kept].abs().min()


# -- exact selection against the plain kthvalue ---------------------------------------------


def plain_top_k_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """The reference selection: one kthvalue over every magnitude, ties lowest index first."""
    n = x.numel()
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    magnitude = x.reshape(-1).abs()
    threshold = torch.kthvalue(magnitude, n - k + 1).values
    keep = magnitude > threshold
    tied = magnitude == threshold
    missing = k - int(keep.sum())
    if int(tied.sum()) > missing:
        tied[tied.nonzero().squeeze(1)[missing:]] = False
    return (keep | tied).reshape(x.shape)


def awkward(n: int, seed: int, kind: str) -> torch.Tensor:
    """Values with the hard cases: heavy ties, many zeros, -0.0, magnitudes across binades."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    if kind == "ties":  # a handful of levels
        x = (x * 2).round() / 2
    elif kind == "zeros":  # mostly zeros, some of them negative
        x = torch.where(torch.rand(n, generator=gen) < 0.7, 0.0, x)
        x[torch.rand(n, generator=gen) < 0.2] = -0.0
    elif kind == "wide":
        x = x * 10.0 ** torch.randint(-30, 30, (n,), generator=gen).float()
    elif kind == "constant":
        x = torch.full((n,), -0.25)
    return x


SELECTION = [
    st.integers(1, 3000),
    st.floats(0, 1),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["normal", "ties", "zeros", "wide", "constant"]),
    st.sampled_from([0.0, 4.0]),  # bracket spread: 0 misses often (the fallback), 4 rarely
]


def sampling_everything(spread: float):
    """Rank even tiny tensors by sampling (a quarter of the entries), with this spread."""
    return mock.patch.multiple(
        primitives, _SAMPLED_FROM=16, _SAMPLE_SHIFT=2, _SAMPLE_SPREAD=spread
    )


@settings(max_examples=200, deadline=None)
@given(*SELECTION)
def test_top_k_is_the_plain_kthvalue_selection_bit_for_bit(n, density, seed, kind, spread):
    x = awkward(n, seed, kind)
    k = round(density * n)
    with sampling_everything(spread):
        mask = top_k_mask(x, k)
        trimmed = magnitude_trim_(x.clone(), density)
    assert torch.equal(mask, plain_top_k_mask(x, k))
    expected = torch.where(plain_top_k_mask(x, keep_count(density, n)), x, 0.0)
    assert torch.equal(trimmed, expected)  # a dropped -0.0 may come back as 0.0


@settings(max_examples=100, deadline=None)
@given(*SELECTION, st.floats(0, 0.3))
def test_magnitude_band_is_the_plain_band(n, density, seed, kind, spread, gamma):
    x = awkward(n, seed, kind)
    with sampling_everything(spread):
        band = magnitude_band_(x.clone(), density, gamma)
    k = keep_count(density, n)
    top = min(keep_count(gamma, n), n - k)
    keep = plain_top_k_mask(x, top + k) & ~plain_top_k_mask(x, top)
    assert torch.equal(band, torch.where(keep, x, 0.0))


@settings(max_examples=200, deadline=None)
@given(*SELECTION)
def test_kthvalue_is_torch_kthvalue(n, density, seed, kind, spread):
    x = awkward(n, seed, kind)
    k = min(n, max(1, round(density * n)))
    with sampling_everything(spread):
        got = kthvalue(x, k)
    assert got == torch.kthvalue(x, k).values  # -0.0 == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_large_selections_sample_by_default(dtype):
    x = awkward(200_000, 5, "ties").to(dtype)
    for k in (1, 17, 40_000, 123_457, 199_999):
        assert torch.equal(top_k_mask(x, k), plain_top_k_mask(x, k))
        assert kthvalue(x, k) == torch.kthvalue(x, k).values


def sorted_trim(x: torch.Tensor, k: int) -> torch.Tensor:
    """The plainest reference: a stable descending sort of |x|, the first k kept, the rest
    +0.0 (a stable sort keeps tied entries lowest index first)."""
    flat = x.reshape(-1)
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    out = torch.zeros_like(flat)
    out[order[:k]] = flat[order[:k]]
    return out.view(x.shape)


def float_bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(-1).view(primitives._INTEGER_OF[x.dtype])


def same_trim(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal bit for bit, except that a kept -0.0 may come back as 0.0 (when the k-th
    largest magnitude is 0 a trim keeps the non-zero entries: the same values)."""
    nonzero = expected.reshape(-1) != 0
    return torch.equal(got, expected) and torch.equal(float_bits(got)[nonzero],
                                                      float_bits(expected)[nonzero])


EDGES = ["normal", "ties", "zeros", "wide", "constant", "signed_zeros", "bf16_deltas"]


def edge_case(n: int, seed: int, kind: str) -> torch.Tensor:
    """``awkward``'s cases and two more: only +-0.0, and bfloat16 task vectors (few levels)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "signed_zeros":
        return torch.where(torch.rand(n, generator=gen) < 0.5, -0.0, 0.0)
    if kind == "bf16_deltas":
        base = (0.02 * torch.randn(n, generator=gen)).bfloat16().float()
        return (base + 0.001 * torch.randn(n, generator=gen)).bfloat16().float() - base
    return awkward(n, seed, kind)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3000), st.integers(0, 2**32 - 1), st.sampled_from(EDGES),
       st.sampled_from([0.0, 4.0]), st.sampled_from(["random", "zero", "all", "one"]))
def test_magnitude_trim_is_the_sorted_selection_bit_for_bit(n, seed, kind, spread, which):
    x = edge_case(n, seed, kind)
    k = {"random": seed % (n + 1), "zero": 0, "all": n, "one": 1}[which]
    with sampling_everything(spread):
        got = magnitude_trim_(x.clone(), k / n)
    assert keep_count(k / n, n) == k
    assert same_trim(got, sorted_trim(x, k))


@pytest.mark.parametrize("kind", EDGES)
def test_large_trims_are_the_sorted_selection_bit_for_bit(kind):
    x = edge_case(300_007, 3, kind)  # the sampled bracket, several blocks
    for k in (0, 1, 29_999, 60_001, 150_000, 300_006, 300_007):
        got = magnitude_trim_(x.clone(), k / x.numel())
        assert same_trim(got, sorted_trim(x, k)), k


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 500), st.integers(0, 2**32 - 1),
       st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       st.integers(-2, 2))
def test_keep_magnitudes_is_keep_where_on_magnitude_keys(n, seed, dtype, offset):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randint(-6, 7, (n,), generator=gen) * 0.25).to(dtype)
    x[torch.rand(n, generator=gen) < 0.1] = -0.0
    x[torch.rand(n, generator=gen) < 0.05] = math.inf
    x[torch.rand(n, generator=gen) < 0.05] = math.nan
    keys = primitives.magnitude_keys(x)
    limit = torch.iinfo(keys.dtype).max
    pick = int(keys[seed % n])
    for least in (pick + offset, 0, 1, 2, limit, int(primitives.magnitude_keys(T([math.inf]).to(
            dtype))) + 1):
        expected = keep_where_(x.clone(), keys.clone(), least)
        got = primitives.keep_magnitudes_(x.clone(), least)
        assert torch.equal(float_bits(got), float_bits(expected)), least


def test_nan_ranks_above_every_magnitude():
    x = T([1.0, math.nan, -math.inf, 3.0])
    assert top_k_mask(x, 2).tolist() == [False, True, True, False]


def test_threshold_trim_keeps_ties():
    assert torch.equal(threshold_trim_(T([1.0, -2.0, 3.0]), 2.0), T([0.0, -2.0, 3.0]))
    assert torch.equal(threshold_trim_(T([1.0, -2.0]), math.inf), T([0.0, 0.0]))


# -- sign election and disjoint mean ------------------------------------------------------


def test_elect_sign_by_summed_mass():
    electors = [T([1.0, -2.0, 0.0, 3.0]), T([-3.0, 1.0, 0.0, -3.0])]
    assert torch.equal(elect_sign(electors), T([-1.0, -1.0, 0.0, 0.0]))


def test_disjoint_mean_counts_only_agreeing_experts():
    deltas = [T([1.0, -2.0, 0.0, 3.0]), T([-3.0, 1.0, 0.0, -3.0])]
    sign = T([-1.0, -1.0, 0.0, 0.0])
    assert torch.equal(disjoint_mean_(fresh(deltas), [1.0, 1.0], sign), T([-3.0, -2.0, 0.0, 0.0]))


def test_disjoint_weighted_mean_and_sum():
    deltas = [T([2.0, 1.0]), T([4.0, -1.0]), T([-1.0, -3.0])]
    weights = [1.0, 3.0, 2.0]
    sign = elect_sign(deltas)  # sums [5, -3]
    assert torch.equal(sign, T([1.0, -1.0]))
    # entry 0: models 1, 2 agree -> (1*2 + 3*4) / 4; entry 1: models 2, 3 -> (-3 - 6) / 5
    torch.testing.assert_close(disjoint_mean_(fresh(deltas), weights, sign), T([3.5, -1.8]))
    torch.testing.assert_close(
        disjoint_mean_(fresh(deltas), weights, sign, normalize=False), T([14.0, -9.0])
    )


def test_sign_consensus_elects_on_weighted_deltas_on_request():
    deltas, weights = [T([3.0]), T([-2.0])], [1.0, 2.0]
    # unweighted: 3 - 2 > 0, only model 1 agrees -> 3; weighted: 3 - 4 < 0 -> 2 * -2 / 2
    assert torch.equal(sign_consensus_(fresh(deltas), weights), T([3.0]))
    assert torch.equal(sign_consensus_(fresh(deltas), weights, sign_on_weighted=True), T([-2.0]))


def test_sign_consensus_with_cancelling_weights_is_finite():
    deltas, weights = [T([3.0]), T([2.0])], [1.0, -1.0]
    # both agree, weights sum to 0: the undivided sum 3 - 2 is returned
    assert torch.equal(sign_consensus_(fresh(deltas), weights), T([1.0]))
    # weighted electors 3 and -2: only model 1 agrees
    assert torch.equal(sign_consensus_(fresh(deltas), weights, sign_on_weighted=True), T([3.0]))


def test_sign_consensus_of_zeros_is_zero():
    out = sign_consensus_([torch.zeros(3), torch.zeros(3)], [0.0, 0.0])
    assert torch.equal(out, torch.zeros(3))


# -- DARE ---------------------------------------------------------------------------------


def test_dare_keeps_about_density_and_rescales_exactly():
    x = torch.full((100_000,), 0.3)
    out = dare_(x.clone(), 0.25, dare_generator(seed=11, model_index=0))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.01  # ~20 standard deviations
    assert torch.equal(out[kept], torch.full((int(kept.sum()),), 0.3 / 0.25))
    assert abs(out.mean().item() - 0.3) < 0.01  # unbiased


def test_dare_is_reproducible_per_seed_and_model():
    x = randn(1000, 0)
    first = dare_(x.clone(), 0.5, dare_generator(3, 0))
    assert torch.equal(first, dare_(x.clone(), 0.5, dare_generator(3, 0)))
    assert not torch.equal(first, dare_(x.clone(), 0.5, dare_generator(3, 1)))
    assert not torch.equal(first, dare_(x.clone(), 0.5, dare_generator(4, 0)))


def test_dare_draws_in_blocks_as_one_rand_over_the_whole_tensor():
    x = randn((7, 9), 2)
    with mock.patch.object(primitives, "BLOCK", 10):  # 7 blocks, the last one short
        out = dare_(x.clone(), 0.3, dare_generator(5, 1))
    keep = torch.rand(x.shape, generator=dare_generator(5, 1)) < 0.3
    assert torch.equal(out, torch.where(keep, x / 0.3, 0.0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dare_of_other_dtypes_uses_the_same_float32_draws(dtype):
    x = randn(300, 4).to(dtype)
    out = dare_(x.clone(), 0.7, dare_generator(2, 0))
    keep = torch.rand(300, generator=dare_generator(2, 0)) < 0.7
    assert torch.equal(out, torch.where(keep, x / 0.7, 0.0))


def test_keep_where_keeps_by_key_with_integer_arithmetic():
    x = T([1.0, -2.0, 3.0, -4.0])
    keys = T([0, 5, 7, 9], dtype=torch.int32)
    assert torch.equal(keep_where_(x.clone(), keys.clone(), 7), T([0.0, 0.0, 3.0, -4.0]))
    below = keep_where_(x.clone(), keys.clone(), 7, at_least=False)
    assert torch.equal(below, T([1.0, -2.0, 0.0, 0.0]))
    assert torch.equal(keep_where_(x.clone(), keys.clone(), 0), x)  # every key >= 0
    assert torch.equal(keep_where_(x.clone(), keys.clone(), 0, at_least=False), 0 * x)
    assert torch.equal(keep_where_(x.clone(), keys.clone(), 2**31), torch.zeros(4))
    assert torch.equal(keep_where_(x.clone(), keys.clone(), 2**31, at_least=False), x)
    wide = keep_where_(x.double(), keys.clone(), 7)  # 32-bit keys, 64-bit values
    assert torch.equal(wide, T([0.0, 0.0, 3.0, -4.0], dtype=torch.float64))


def test_dare_ends():
    x = randn((3, 4), 1)
    assert dare_(x, 1.0, dare_generator(0, 0)) is x
    assert torch.equal(dare_(x.clone(), 0.0, dare_generator(0, 0)), torch.zeros(3, 4))
    assert dare_(T(2.0), 0.5, dare_generator(0, 0)).shape == ()


# -- slerp --------------------------------------------------------------------------------


def test_slerp_oracles():
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    torch.testing.assert_close(slerp_(a.clone(), b.clone(), 0.5, 5e-4), T([R2, R2]))
    third = slerp_(a.clone(), b.clone(), 1 / 3, 5e-4)
    torch.testing.assert_close(third, T([math.sqrt(3) / 2, 0.5]))
    # norms are interpolated with the direction, as in mergekit
    torch.testing.assert_close(slerp_(T([2.0, 0.0]), b, 0.5, 5e-4), T([2 * R2, R2]))


def test_slerp_falls_back_to_lerp():
    assert torch.equal(slerp_(T([1.0, 2.0]), T([2.0, 4.0]), 0.25, 5e-4), T([1.25, 2.5]))
    assert torch.equal(slerp_(T([1.0, 0.0]), T([-1.0, 0.0]), 0.5, 5e-4), T([0.0, 0.0]))
    assert torch.equal(slerp_(T([0.0, 0.0]), T([1.0, 1.0]), 0.5, 5e-4), T([0.5, 0.5]))
    assert torch.equal(slerp_(T(2.0), T(4.0), 0.25, 5e-4), T(2.5))
    assert slerp_(torch.zeros(0), torch.zeros(0), 0.5, 5e-4).shape == (0,)
    # cos = 0.99995 > 1 - 5e-4: linear
    torch.testing.assert_close(slerp_(T([1.0, 0.0]), T([1.0, 0.01]), 0.5, 5e-4), T([1.0, 0.005]))


def test_slerp_row_wise():
    a = T([[1.0, 0.0], [1.0, 2.0]])
    b = T([[0.0, 1.0], [2.0, 4.0]])  # row 0 orthogonal (spherical), row 1 colinear (linear)
    out = slerp_(a.clone(), b.clone(), 0.5, 5e-4, rows=True)
    torch.testing.assert_close(out, T([[R2, R2], [1.5, 3.0]]))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 5), max_size=3).map(tuple),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
def test_slerp_is_exact_at_the_ends(shape, seed, rows):
    a, b = randn(shape, seed), randn(shape, seed + 1)
    assert torch.equal(slerp_(a.clone(), b.clone(), 0.0, 5e-4, rows=rows), a)
    assert torch.equal(slerp_(a.clone(), b.clone(), 1.0, 5e-4, rows=rows), b)


# -- whole-model magnitude threshold ------------------------------------------------------


def run_statistic(stat: GlobalMagnitudeThreshold, models: list[list[torch.Tensor]]):
    for p in range(stat.passes):
        for tensors in zip(*models, strict=True):  # the engine's order: tensor by tensor
            for i, tau in enumerate(tensors):
                stat.observe(p, i, tau)
        stat.finish_pass(p)
    return stat.result().thresholds


def brute_force_threshold(tensors: list[torch.Tensor], density: float) -> float:
    flat = torch.cat([t.abs().reshape(-1) for t in tensors])
    k = round(density * flat.numel())
    if k == 0:
        return math.inf
    if k == flat.numel():
        return 0.0
    return float(flat.kthvalue(flat.numel() - k + 1).values)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.lists(st.integers(1, 7), max_size=3).map(tuple), min_size=1, max_size=4),
    st.lists(st.floats(0, 1), min_size=1, max_size=3),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["normal", "ties", "wide"]),
)
def test_model_threshold_equals_brute_force_kthvalue(shapes, densities, seed, kind):
    gen = torch.Generator().manual_seed(seed)
    models = []
    for _ in densities:
        tensors = [torch.randn(s, generator=gen) for s in shapes]
        if kind == "ties":  # exact ties and zeros
            tensors = [(t * 2).round() / 2 for t in tensors]
        elif kind == "wide":  # magnitudes across many binades
            tensors = [t * 10.0 ** float(torch.randint(-20, 20, (), generator=gen))
                       for t in tensors]
        models.append(tensors)
    got = run_statistic(GlobalMagnitudeThreshold(densities), models)
    assert got == tuple(brute_force_threshold(t, d) for t, d in zip(models, densities, strict=True))


def test_model_threshold_keeps_exactly_k_without_ties():
    gen = torch.Generator().manual_seed(0)
    models = [[torch.randn(300, 40, generator=gen), torch.randn(77, generator=gen)]
              for _ in range(2)]
    thresholds = run_statistic(GlobalMagnitudeThreshold([0.2, 0.05]), models)
    for tensors, t, density in zip(models, thresholds, [0.2, 0.05], strict=True):
        kept = sum(int((threshold_trim_(x.clone(), t) != 0).sum()) for x in tensors)
        assert kept == round(density * 12_077)
