"""``nuslerp``: spherical interpolation of two task vectors, added to the base."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.methods import nuslerp

T = torch.tensor
R2 = math.sqrt(2) / 2


def test_oracle():
    base = T([1.0, 1.0])
    x1, x2 = T([2.0, 1.0]), T([1.0, 2.0])  # tau = [1, 0], [0, 1]
    torch.testing.assert_close(nuslerp(base, [x1, x2]), T([1 + R2, 1 + R2]))
    torch.testing.assert_close(nuslerp(base, [x1, x2], t=1 / 3), T([1 + math.sqrt(3) / 2, 1.5]))


def test_row_wise_oracle():
    base = torch.zeros(2, 2)
    tau1 = T([[1.0, 0.0], [1.0, 2.0]])
    tau2 = T([[0.0, 1.0], [2.0, 4.0]])  # row 0 orthogonal, row 1 colinear (linear)
    rows = T([[R2, R2], [1.5, 3.0]])
    torch.testing.assert_close(nuslerp(base, [tau1, tau2], row_wise=True), rows)
    assert not torch.allclose(nuslerp(base, [tau1, tau2]), rows)  # one angle for the whole


def test_degenerate_inputs():
    base = T([1.0, 2.0])
    assert torch.equal(nuslerp(base, [base, base]), base)
    assert torch.equal(nuslerp(base, [base, base + 2]), base + 1)  # one zero task vector: linear
    assert torch.equal(nuslerp(T(1.0), [T(2.0), T(3.0)], row_wise=True), T(2.5))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 5), max_size=3).map(tuple),
    st.floats(0, 1),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_ends_and_copies(shape, t, row_wise, seed):
    gen = torch.Generator().manual_seed(seed)
    base, a, b = (torch.randn(shape, generator=gen) for _ in range(3))
    torch.testing.assert_close(nuslerp(base, [a, b], t=0.0, row_wise=row_wise), a)
    torch.testing.assert_close(nuslerp(base, [a, b], t=1.0, row_wise=row_wise), b)
    torch.testing.assert_close(nuslerp(base, [a, a], t=t, row_wise=row_wise), a)
