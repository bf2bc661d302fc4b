"""``multislerp``: the normalised weighted mean direction times the weighted mean length."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.methods import multislerp

T = torch.tensor


def test_oracle():
    # directions e1, e2 with weights 3/4, 1/4: M = (0.75, 0.25), length 0.75 * 1 + 0.25 * 3
    expected = 1.5 * T([3.0, 1.0]) / math.sqrt(10)
    experts = [T([1.0, 0.0]), T([0.0, 3.0])]
    torch.testing.assert_close(multislerp(None, experts, weights=[3.0, 1.0]), expected)
    base = T([5.0, -1.0])
    out = multislerp(base, [base + e for e in experts], weights=[0.75, 0.25])
    torch.testing.assert_close(out, base + expected)
    raw = multislerp(None, experts, weights=[1.5, 0.5], normalize_weights=False)
    torch.testing.assert_close(raw, 2 * expected)


def test_equals_the_tangent_space_formula():
    # project the directions on the tangent space at the mean, average, map back: the
    # tangent average is zero, so this is the closed form above
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(3)]
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    units = [x / x.norm() for x in xs]
    m = sum(wi * u for wi, u in zip(w, units, strict=True))
    m = m / m.norm()
    tangent = sum(wi * (u - u.dot(m) * m) for wi, u in zip(w, units, strict=True))
    size = tangent.norm() + 1e-8
    direction = m * torch.cos(size) + tangent * torch.sin(size) / size
    expected = direction * sum(wi * x.norm() for wi, x in zip(w, xs, strict=True))
    out = multislerp(None, [x.float() for x in xs], weights=w.tolist())
    torch.testing.assert_close(out, expected.float())


def test_fall_back_to_the_weighted_sum_and_errors():
    a = T([1.0, 2.0])
    assert torch.equal(multislerp(None, [a, -a]), torch.zeros(2))  # antipodal, balanced
    # every task vector zero (an unchanged tensor): the base, for any number of models
    base = T([3.0, 4.0])
    assert torch.equal(multislerp(base, [base.clone()] * 3), base)
    assert torch.equal(multislerp(None, [a]), a)
    # weights summing to 0 are not normalised (as task arithmetic's normalize)
    b = T([2.0, 0.0])
    raw = multislerp(None, [a, b], weights=[1.0, -1.0], normalize_weights=False)
    assert torch.equal(multislerp(None, [a, b], weights=[1.0, -1.0]), raw)
    assert torch.isfinite(raw).all()


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 5), max_size=3).map(tuple),
    st.integers(2, 4),
    st.integers(0, 2**32 - 1),
)
def test_copies_and_permutations(shape, k, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    xs = [torch.randn(shape, generator=gen) for _ in range(k)]
    weights = (torch.rand(k, generator=gen) + 0.1).tolist()
    out = multislerp(base, xs, weights=weights)
    torch.testing.assert_close(multislerp(base, xs[::-1], weights=weights[::-1]), out)
    torch.testing.assert_close(multislerp(base, [xs[0]] * k, weights=weights), xs[0])
    torch.testing.assert_close(multislerp(None, [xs[0]] * k), xs[0])
