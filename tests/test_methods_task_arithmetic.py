"""``task_arithmetic``: base + lambda * weighted sum of task vectors."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.methods import task_arithmetic

T = torch.tensor


def test_oracle_with_negative_weight_and_lambda():
    base = T([1.0, 1.0])
    x1, x2 = T([2.0, 0.0]), T([1.0, 3.0])  # tau = [1, -1], [0, 2]
    # sum w tau = [1, -1] - 0.5 * [0, 2] = [1, -2]; times lambda 2 -> [2, -4]; plus base
    out = task_arithmetic(base, [x1, x2], weights=[1.0, -0.5], **{"lambda": 2.0})
    assert torch.equal(out, T([3.0, -3.0]))
    assert torch.equal(task_arithmetic(base, [x1, x2], weights=[1.0, -0.5], scale=2.0), out)


def test_zero_weights_and_zero_task_vectors_give_the_base():
    base = T([[1.0, -2.0]])
    assert torch.equal(task_arithmetic(base, [T([[5.0, 5.0]])], weights=[0.0]), base)
    assert torch.equal(task_arithmetic(T(3.0), [T(3.0), T(3.0)]), T(3.0))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 5), max_size=3).map(tuple),
    st.integers(1, 5),
    st.floats(-2, 2),
    st.integers(0, 2**32 - 1),
)
def test_k_copies_scale_the_task_vector(shape, k, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    base, x = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    # relative weights (summing to 1) return the model itself
    torch.testing.assert_close(task_arithmetic(base, [x] * k, weights=[1 / k] * k), x)
    out = task_arithmetic(base, [x] * k, scale=scale)
    torch.testing.assert_close(out, base + scale * k * (x - base))
