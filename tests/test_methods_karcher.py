"""``karcher``: the Karcher mean of the models' directions on the sphere, times their mean norm."""

from __future__ import annotations

import math

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from supermerge.methods import karcher

T = torch.tensor


def test_two_orthogonal_models_meet_halfway():
    out = karcher(None, [T([2.0, 0.0]), T([0.0, 4.0])])  # directions e1, e2; mean norm 3
    torch.testing.assert_close(out, T([3.0, 3.0]) / math.sqrt(2))


def test_three_points_on_a_circle():
    # directions e1, e1, e2 with equal weights: the Karcher mean on the circle is at angle
    # phi with 2 phi = (pi/2 - phi), i.e. 30 degrees (the Euclidean start is at 26.6);
    # mean norm (2 + 4 + 3) / 3 = 3
    out = karcher(None, [T([2.0, 0.0]), T([4.0, 0.0]), T([0.0, 3.0])])
    torch.testing.assert_close(out, 3 * T([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    start = karcher(None, [T([2.0, 0.0]), T([4.0, 0.0]), T([0.0, 3.0])], max_iter=0)
    torch.testing.assert_close(start, 3 * T([2.0, 1.0]) / math.sqrt(5))


def test_the_base_is_one_of_the_points():
    a, b, c = T([2.0, 0.0]), T([4.0, 0.0]), T([0.0, 3.0])
    torch.testing.assert_close(karcher(c, [a, b]), karcher(None, [a, b, c]))


def test_degenerate_inputs():
    x = T([[1.0, -2.0], [0.5, 3.0]])
    assert torch.equal(karcher(None, [x]), x)
    assert torch.equal(karcher(None, [torch.zeros(3), torch.zeros(3)]), torch.zeros(3))
    torch.testing.assert_close(karcher(None, [torch.zeros(2, 2), x]), x / 2)  # length 0 counts
    out = karcher(None, [T([1.0, 0.0]), T([-1.0, 0.0])])  # antipodal: no NaN
    assert torch.isfinite(out).all()
    y = T([[0.0, 1.0], [1.0, 1.0]])
    assert torch.equal(karcher(None, [x, y], weights=[1.0, 2.0]), karcher(None, [x, y]))


def _mean_log_map(u: torch.Tensor, units: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros_like(u)
    for v in units:
        cos = float(torch.dot(u, v).clamp(-1, 1))
        theta = math.acos(cos)
        if theta > 1e-12:
            total += theta / math.sin(theta) * (v - cos * u)
    return total / len(units)


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 4), st.integers(2, 6), st.integers(0, 2**32 - 1))
@example(4, 2, 737)  # acos of a float32 dot stalled this one at a residual of 8.8e-5
def test_fixed_point_copies_and_permutations(k, n, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, generator=gen, dtype=torch.float64).abs() + 0.1 for _ in range(k)]
    xs = [x.float() for x in xs]  # one orthant: the Karcher mean is unique
    out = karcher(None, xs, max_iter=200, tol=1e-7)
    torch.testing.assert_close(out.norm(), torch.stack([x.norm() for x in xs]).mean())
    units = [(x / x.norm()).double() for x in xs]
    assert float(_mean_log_map((out / out.norm()).double(), units).norm()) < 1e-5
    torch.testing.assert_close(karcher(None, xs[::-1], max_iter=200, tol=1e-7), out)
    torch.testing.assert_close(karcher(None, [xs[0]] * k), xs[0])
