"""``della`` and ``della_linear``: MagPrune, then TIES election (or a plain sum)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.errors import MethodError
from supermerge.methods import della, della_linear, task_arithmetic, ties

T = torch.tensor


def test_no_drop_oracles():
    base = torch.zeros(3)
    x1, x2 = T([1.0, -2.0, 3.0]), T([3.0, 1.0, -1.0])
    # sum [4, -1, 2] -> signs [+, -, +]; entry 0: (1 + 3) / 2; entry 1: -2; entry 2: 3
    out = della(base, [x1, x2], density=1.0, epsilon=0.0)
    assert torch.equal(out, T([2.0, -2.0, 3.0]))
    out = della(base, [x1, x2], density=1.0, epsilon=0.0, normalize=False)
    assert torch.equal(out, T([4.0, -2.0, 3.0]))
    out = della_linear(base, [x1, x2], weights=[1.0, 2.0], density=1.0, epsilon=0.0)
    assert torch.equal(out, T([7.0, 0.0, 1.0]))


def test_extreme_epsilon_keeps_the_largest_and_drops_the_smallest():
    # density 0.5, epsilon 1: keep probabilities 1, 0.5, 0 by rank; rescaled by 1, 2, -
    base = torch.ones(3)
    expert = base + T([1.0, -4.0, 2.0])
    for seed in range(10):
        out = della_linear(base, [expert], density=0.5, epsilon=1.0, seed=seed)
        assert out[1] == -3.0 and out[0] == 1.0 and out[2] in (1.0, 5.0)
        # one model: the election keeps every non-zero entry
        assert torch.equal(della(base, [expert], density=0.5, epsilon=1.0, seed=seed), out)


def test_drop_rate_and_unbiased_rescale():
    base = torch.zeros(200, 50)
    tau = torch.randn(200, 50, generator=torch.Generator().manual_seed(0))
    out = della_linear(base, [tau], density=0.3, epsilon=0.4, seed=5)
    assert abs((out != 0).float().mean().item() - 0.3) < 0.02  # mean keep prob = density
    assert torch.equal(out, della_linear(base, [tau], density=0.3, epsilon=0.4, seed=5))
    assert not torch.equal(out, della_linear(base, [tau], density=0.3, epsilon=0.4, seed=6))
    # larger magnitudes are kept more often: top half vs bottom half of each row
    order = tau.abs().argsort(dim=1, descending=True)
    kept = (out != 0).gather(1, order).float()
    assert kept[:, :25].mean() > kept[:, 25:].mean() + 0.1


def test_models_draw_different_masks():
    base = torch.zeros(1000)
    x = torch.ones(1000)
    out = della_linear(base, [x, x], weights=[1.0, -1.0], density=0.5, epsilon=0.2, seed=1)
    assert (out != 0).any()  # the two masks differ, so the +x and -x do not cancel


@pytest.mark.parametrize(
    ("density", "epsilon"), [(0.95, 0.2), (1.0, 0.1), (0.05, 0.2), (0.5, 1.5)]
)
def test_epsilon_out_of_range_is_a_clear_error(density, epsilon):
    with pytest.raises(MethodError, match="epsilon"):
        della(torch.zeros(2), [torch.ones(2)], density=density, epsilon=epsilon)


def test_degenerate_inputs_give_no_nan():
    base = T([1.0, 2.0])
    assert torch.equal(della(base, [base, base]), base)
    assert torch.equal(della_linear(base, [base + 1], weights=[0.0]), base)
    assert torch.equal(della(base, [base + 1, base - 1], weights=[0.0, 0.0]), base)
    assert torch.equal(della(base, [base + 1], density=0.0, epsilon=0.0), base)
    assert torch.equal(della_linear(T(1.0), [T(2.0)], density=1.0, epsilon=0.0), T(2.0))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 5), max_size=3).map(tuple),
    st.integers(1, 4),
    st.integers(0, 2**32 - 1),
)
def test_without_drop_della_is_ties_and_della_linear_is_task_arithmetic(shape, k, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    experts = [torch.randn(shape, generator=gen) for _ in range(k)]
    kw = {"density": 1.0, "epsilon": 0.0, "seed": seed}
    torch.testing.assert_close(della(base, experts, **kw), ties(base, experts, density=1.0))
    torch.testing.assert_close(della_linear(base, experts, **kw), task_arithmetic(base, experts))
