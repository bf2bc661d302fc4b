"""``dare_linear``: DARE (drop and rescale) then task arithmetic (Yu et al. 2024)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.methods import dare_linear

T = torch.tensor


def test_density_one_is_task_arithmetic():
    base = T([1.0, 2.0])
    x1, x2 = T([3.0, 2.0]), T([0.0, 5.0])  # tau = [2, 0], [-1, 3]
    # 0.5 * [2, 0] + 2 * [-1, 3] = [-1, 6]; times lambda 2 -> [-2, 12]; plus base
    out = dare_linear(base, [x1, x2], weights=[0.5, 2.0], density=1.0, **{"lambda": 2.0})
    assert torch.equal(out, T([-1.0, 14.0]))


def test_each_entry_is_dropped_or_rescaled():
    base = torch.ones(10_000)
    out = dare_linear(base, [base + 0.5], density=0.25, seed=5)
    # kept: 1 + 0.5 / 0.25 = 3; dropped: the base, 1
    assert set(out.unique().tolist()) == {1.0, 3.0}
    assert abs((out == 3.0).float().mean().item() - 0.25) < 0.02


def test_seeded_reproducible_and_thread_order_free():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(50, 40, generator=gen)
    experts = [base + torch.randn(50, 40, generator=gen) for _ in range(3)]
    first = dare_linear(base, experts, seed=9)
    assert torch.equal(first, dare_linear(base, experts, seed=9))
    assert not torch.equal(first, dare_linear(base, experts, seed=10))
    seeds = [9, 3, 9, 7, 9, 3]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda s: dare_linear(base, experts, seed=s), seeds))
    for s, out in zip(seeds, threaded, strict=True):
        assert torch.equal(out, dare_linear(base, experts, seed=s))


def test_density_zero_and_zero_task_vectors_give_the_base():
    base = T([[1.0, -1.0]])
    assert torch.equal(dare_linear(base, [base + 3], density=0.0), base)
    assert torch.equal(dare_linear(base, [base, base], density=0.3), base)
    assert torch.equal(dare_linear(T(2.0), [T(2.0)], density=0.3), T(2.0))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 5), max_size=3).map(tuple),
    st.integers(1, 4),
    st.integers(0, 2**32 - 1),
)
def test_k_copies_at_density_one(shape, k, seed):
    gen = torch.Generator().manual_seed(seed)
    base, x = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    out = dare_linear(base, [x] * k, weights=[1 / k] * k, density=1.0, seed=seed)
    torch.testing.assert_close(out, x)
