"""Primitives of the method zoo: top-k masks, magnitude bands, MagPrune, TALL and consensus."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.methods import primitives
from supermerge.methods.primitives import (
    consensus_mask,
    dare_generator,
    magnitude_band_,
    magnitude_trim,
    magprune_,
    tall_masks,
    top_k_mask,
)

T = torch.tensor


def test_top_k_mask_breaks_ties_by_lowest_index_and_nests():
    x = T([1.0, -2.0, 2.0, -2.0, 0.5])
    assert top_k_mask(x, 2).tolist() == [False, True, True, False, False]
    assert top_k_mask(x, 3).tolist() == [False, True, True, True, False]
    assert top_k_mask(x, 0).tolist() == [False] * 5
    assert top_k_mask(x, 9).tolist() == [True] * 5
    assert top_k_mask(T([[1.0, 3.0], [2.0, 0.0]]), 1).tolist() == [[False, True], [False, False]]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 60), st.integers(0, 60), st.integers(0, 60), st.integers(0, 2**32 - 1))
def test_top_k_masks_are_nested_and_exact(n, a, b, seed):
    x = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 2).round() / 2
    small, large = top_k_mask(x, min(a, b)), top_k_mask(x, max(a, b))
    assert int(small.sum()) == min(a, b, n) and int(large.sum()) == min(max(a, b), n)
    assert not (small & ~large).any()


def test_magnitude_band_drops_outliers_and_small_entries():
    tau = T([10.0, -9.0, 8.0, -7.0, 6.0, -5.0, 4.0, -3.0, 2.0, -1.0])
    # gamma 0.1: drop the 1 largest; density 0.5: keep the next 5
    band = magnitude_band_(tau.clone(), 0.5, 0.1)
    assert torch.equal(band, T([0.0, -9.0, 8.0, -7.0, 6.0, -5.0, 0.0, 0.0, 0.0, 0.0]))
    # gamma 0 is the plain top-k
    assert torch.equal(magnitude_band_(tau.clone(), 0.3, 0.0), magnitude_trim(tau, 0.3))
    # density 0.9, gamma 0.2: 9 kept leaves room for 1 outlier only
    assert torch.equal(magnitude_band_(tau.clone(), 0.9, 0.2), torch.cat([T([0.0]), tau[1:]]))
    # ties: |3| three times; the lowest index ranks first and is the dropped outlier
    out = magnitude_band_(T([3.0, -3.0, 1.0, 3.0]), 0.5, 0.25)
    assert torch.equal(out, T([0.0, -3.0, 0.0, 3.0]))
    # a 0-d tensor keeps its value at density 0.9 (round(0.9) = 1, round(0.01) = 0)
    assert torch.equal(magnitude_band_(T(2.0), 0.9, 0.01), T(2.0))


def test_magprune_keep_probabilities_follow_the_rank():
    rows = T([4.0, 3.0, 2.0, 1.0]).repeat(20_000, 1)
    out = magprune_(rows, 0.5, 0.4, dare_generator(1, 0))
    # keep probability by rank r (0 = largest): 0.5 + 0.2 - 0.4 r / 3
    expected = [0.7, 0.7 - 0.4 / 3, 0.7 - 0.8 / 3, 0.3]
    kept = (out != 0).float().mean(0)
    for got, want in zip(kept.tolist(), expected, strict=True):
        assert abs(got - want) < 0.015  # about 4 standard deviations
    for j, (value, want) in enumerate(zip([4.0, 3.0, 2.0, 1.0], expected, strict=True)):
        values = out[:, j][out[:, j] != 0]
        torch.testing.assert_close(values, torch.full_like(values, value / want))
    torch.testing.assert_close(out.mean(0), T([4.0, 3.0, 2.0, 1.0]), atol=0.1, rtol=0.0)


def test_magprune_extreme_epsilon_is_deterministic_at_the_ends():
    # density 0.5, epsilon 1: keep probabilities 1, 0.5, 0 for ranks 0, 1, 2
    x = T([1.0, -4.0, 2.0])
    for seed in range(20):
        out = magprune_(x.clone(), 0.5, 1.0, dare_generator(seed, 0))
        assert out[1] == -4.0 and out[0] == 0.0 and out[2] in (0.0, 4.0)


def test_magprune_ranks_within_rows_with_ties_lowest_index_first():
    # each row is ranked on its own; in [2, 2] the first entry ranks 0 (kept with prob 1)
    x = T([[2.0, 2.0], [-1.0, 5.0]])
    for seed in range(10):
        out = magprune_(x.clone(), 0.5, 1.0, dare_generator(seed, 0))
        assert out.tolist() == [[2.0, 0.0], [0.0, 5.0]]


def test_magprune_ends_and_reproducibility():
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert magprune_(x, 1.0, 0.0, dare_generator(0, 0)) is x
    assert torch.equal(magprune_(x.clone(), 0.0, 0.0, dare_generator(0, 0)), torch.zeros(5, 7))
    first = magprune_(x.clone(), 0.5, 0.2, dare_generator(3, 0))
    assert torch.equal(first, magprune_(x.clone(), 0.5, 0.2, dare_generator(3, 0)))
    assert not torch.equal(first, magprune_(x.clone(), 0.5, 0.2, dare_generator(3, 1)))
    scalar = magprune_(T(3.0), 0.5, 0.2, dare_generator(0, 0))  # one entry: keep prob 0.5
    assert scalar.item() in (0.0, 6.0)
    assert magprune_(torch.zeros(0, 3), 0.5, 0.1, dare_generator(0, 0)).shape == (0, 3)


def test_magprune_in_blocks_of_rows_is_the_rank_formula_with_one_draw():
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(4))
    x[2] = x[2, 0]  # a row of ties
    with mock.patch.object(primitives, "BLOCK", 10):  # two rows at a time, then one
        out = magprune_(x.clone(), 0.5, 0.3, dare_generator(2, 0))
    order = torch.sort(x.abs(), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(5).expand(9, 5)).float()
    keep_prob = (0.5 + 0.15) - rank * (0.3 / 4)
    keep = torch.rand(9, 5, generator=dare_generator(2, 0)) < keep_prob
    assert torch.equal(out, torch.where(keep, x / keep_prob, 0.0))


def test_tall_masks_oracle():
    taus = [T([2.0, 0.0, 1.0, 0.0]), T([2.0, 1.0, 0.0, 0.0]), T([-1.0, 0.0, 0.0, 3.0])]
    total = T([3.0, 1.0, 1.0, 3.0])
    masks = list(tall_masks(taus, [1.0, 1.0, 1.0], total))
    # |tau_t| >= |total - tau_t|: e.g. task 3, entry 0: 1 >= 4 is false
    assert [m.tolist() for m in masks] == [
        [True, False, True, False],
        [True, True, False, False],
        [False, False, False, True],
    ]
    assert consensus_mask(masks, 2).tolist() == [True, False, False, False]
    assert consensus_mask(masks, 1).tolist() == [True, True, True, True]
    assert consensus_mask(masks, 0).tolist() == [True] * 4
    assert consensus_mask(masks, 4).tolist() == [False] * 4


def test_tall_masks_with_lambda_zero_keep_everything():
    taus = [torch.zeros(3), T([1.0, -2.0, 0.0])]
    masks = list(tall_masks(taus, [0.0, 0.0], taus[0] + taus[1]))
    assert all(m.all() for m in masks)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_consensus_mask_counts(k):
    masks = [T([True, False, True]), T([True, False, False])]
    assert consensus_mask(masks, k).tolist() == [c >= k for c in (2, 0, 1)]


def test_inexact_top_k_mask_selects_the_non_zeros_when_the_threshold_is_zero():
    x = T([0.0, 3.0, 0.0, -1.0, 0.0])
    assert top_k_mask(x, 3).tolist() == [True, True, False, True, False]
    assert top_k_mask(x, 3, exact=False).tolist() == [False, True, False, True, False]
    assert top_k_mask(x, 1, exact=False).tolist() == top_k_mask(x, 1).tolist()
    assert torch.equal(magnitude_band_(x, 0.6, 0.2), T([0.0, 0.0, 0.0, -1.0, 0.0]))
    assert torch.equal(magnitude_band_(torch.zeros(6), 0.5, 0.2), torch.zeros(6))
