"""``linear``: weighted average of the experts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.errors import MethodError
from supermerge.methods import linear

T = torch.tensor


def test_weighted_average_oracle():
    a, b = T([1.0, 2.0]), T([3.0, 6.0])
    assert torch.equal(linear(None, [a, b], weights=[1.0, 3.0]), T([2.5, 5.0]))  # (1+9)/4
    assert torch.equal(linear(None, [a, b]), T([2.0, 4.0]))
    assert torch.equal(linear(None, [a, b], weights=[1.0, 3.0], normalize=False), T([10.0, 20.0]))


def test_weights_summing_to_zero_cannot_be_normalised():
    with pytest.raises(MethodError, match="sum to 0"):
        linear(None, [T([1.0]), T([2.0])], weights=[1.0, -1.0], name="w")
    assert torch.equal(
        linear(None, [T([1.0]), T([2.0])], weights=[1.0, -1.0], normalize=False), T([-1.0])
    )


def test_zero_d_and_zero_weight():
    assert torch.equal(linear(None, [T(2.0), T(4.0)], weights=[0.0, 1.0]), T(4.0))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 5), max_size=3).map(tuple),
    st.integers(1, 5),
    st.lists(st.floats(0.1, 10), min_size=5, max_size=5),
    st.integers(0, 2**32 - 1),
)
def test_k_copies_return_the_model(shape, k, weights, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(linear(None, [x] * k, weights=weights[:k]), x)
