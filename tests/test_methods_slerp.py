"""``slerp``: spherical interpolation between two models."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.errors import MethodError
from supermerge.methods import slerp

T = torch.tensor
R2 = math.sqrt(2) / 2


def test_oracles():
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    torch.testing.assert_close(slerp(None, [a, b]), T([R2, R2]))  # t = 0.5 by default
    torch.testing.assert_close(slerp(None, [a, b], t=1 / 3), T([math.sqrt(3) / 2, 0.5]))
    torch.testing.assert_close(slerp(None, [a.view(1, 2), b.view(1, 2)]), T([[R2, R2]]))


def test_linear_fall_back():
    assert torch.equal(slerp(None, [T([1.0, 2.0]), T([2.0, 4.0])], t=0.25), T([1.25, 2.5]))
    assert torch.equal(slerp(None, [T([0.0, 0.0]), T([2.0, 2.0])], t=0.5), T([1.0, 1.0]))
    assert torch.equal(slerp(None, [T(2.0), T(4.0)], t=0.5), T(3.0))
    # cos = 0.8 is spherical at the default epsilon, linear at epsilon 0.5
    a, b = T([1.0, 0.0]), T([0.8, 0.6])
    assert not torch.equal(slerp(None, [a, b]), T([0.9, 0.3]))
    assert torch.equal(slerp(None, [a, b], epsilon=0.5), T([0.9, 0.3]))


def test_needs_exactly_two_models_and_valid_t():
    x = torch.ones(2)
    with pytest.raises(MethodError, match="exactly 2"):
        slerp(None, [x, x, x])
    with pytest.raises(MethodError, match="t"):
        slerp(None, [x, x], t=1.5)
    # mergekit accepts and ignores a weight on slerp: so do we
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert torch.equal(slerp(None, [a, b], weights=[0.6, 0.4], t=0.3), slerp(None, [a, b], t=0.3))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 5), max_size=3).map(tuple),
    st.floats(0, 1),
    st.integers(0, 2**32 - 1),
)
def test_ends_and_copies(shape, t, seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    assert torch.equal(slerp(None, [a, b], t=0.0), a)
    assert torch.equal(slerp(None, [a, b], t=1.0), b)
    assert torch.equal(slerp(None, [a, a], t=t), a)
