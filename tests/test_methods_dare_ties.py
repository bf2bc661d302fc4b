"""``dare_ties``: DARE, then TIES sign election and disjoint mean."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.methods import dare_ties, ties

T = torch.tensor


def test_density_one_oracle():
    base = torch.zeros(3)
    x1, x2 = T([1.0, -2.0, 3.0]), T([3.0, 1.0, -1.0])
    # sum [4, -1, 2] -> signs [+, -, +]; entry 0: (1 + 3) / 2; entry 1: -2; entry 2: 3
    assert torch.equal(dare_ties(base, [x1, x2], density=1.0), T([2.0, -2.0, 3.0]))
    assert torch.equal(dare_ties(base, [x1, x2], density=1.0, normalize=False), T([4.0, -2.0, 3.0]))


def test_drops_and_rescales_before_the_election():
    base = torch.zeros(10_000)
    out = dare_ties(base, [base + 0.5, base + 0.5], density=0.5, seed=1)
    # per entry: both kept -> mean(1, 1) = 1; one kept -> 1; none kept -> 0
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert abs((out == 0).float().mean().item() - 0.25) < 0.02
    assert torch.equal(out, dare_ties(base, [base + 0.5, base + 0.5], density=0.5, seed=1))


def test_degenerate_inputs_give_no_nan():
    base = T([1.0, 2.0])
    assert torch.equal(dare_ties(base, [base, base], density=0.5), base)
    assert torch.equal(dare_ties(base, [base + 1], density=0.0), base)
    assert torch.equal(dare_ties(base, [base + 1, base - 1], weights=[0.0, 0.0]), base)
    assert torch.equal(dare_ties(T(1.0), [T(2.0)], density=1.0), T(2.0))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 5), max_size=3).map(tuple),
    st.integers(1, 4),
    st.integers(0, 2**32 - 1),
)
def test_density_one_is_ties_without_trim_and_returns_copies(shape, k, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    experts = [torch.randn(shape, generator=gen) for _ in range(k)]
    torch.testing.assert_close(
        dare_ties(base, experts, density=1.0, seed=seed), ties(base, experts, density=1.0)
    )
    torch.testing.assert_close(dare_ties(base, [experts[0]] * k, density=1.0), experts[0])
