"""``arcee_fusion``: one model's changes where |change| x row KL is above median + 1.5 IQR."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.errors import MethodError
from supermerge.methods import arcee_fusion

T = torch.tensor


def test_one_row_oracle():
    # one row: one KL > 0 scales every importance, so the fence is on |tau| itself:
    # sorted |tau| = [0, 1, 2, 3, 100]: Q1 = 1, median = 2, Q3 = 3, fence 2 + 1.5 * 2 = 5
    base = torch.zeros(5)
    expert = T([0.0, 1.0, -2.0, 3.0, 100.0])
    assert torch.equal(arcee_fusion(base, [expert]), T([0.0, 0.0, 0.0, 0.0, 100.0]))
    # |tau| = [1, 2, 3, 4, 5]: fence 3 + 1.5 * 2 = 6, nothing kept
    assert torch.equal(arcee_fusion(base, [T([1.0, 2, 3, 4, 5])]), base)


def _dense(base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    b, x = base.double(), expert.double()
    p, q = torch.softmax(x, -1) + 1e-8, torch.softmax(b, -1) + 1e-8
    s = (x - b).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)
    q1, q2, q3 = torch.quantile(s.flatten(), torch.tensor([0.25, 0.5, 0.75]).double(),
                                interpolation="lower")
    return (b + (x - b) * (s >= q2 + 1.5 * (q3 - q1))).float()


def test_rows_oracle():
    # row 0 is shifted by 4 everywhere: its softmax does not move (KL 0), so its importance
    # is 0 however large tau; the fence (0.067) keeps row 1's three changes only
    base = T([[0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0],
              [0.0, 0.5, 0.0, 0.5]])
    expert = T([[4.0, 5.0, 6.0, 7.0], [0.0, 3.0, 0.5, 0.2], [1.5, 1.0, 0.3, 1.0],
                [0.1, 0.5, 0.6, 0.0]])
    out = arcee_fusion(base, [expert])
    expected = base.clone()
    expected[1] = expert[1]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, _dense(base, expert))


def test_degenerate_inputs():
    base = T([[1.0, -2.0], [0.5, 3.0]])
    assert torch.equal(arcee_fusion(base, [base.clone()]), base)
    assert torch.equal(arcee_fusion(T(1.0), [T(3.0)]), T(3.0))  # equal importances: all kept
    expert = base + T([[1.0, 0.0], [0.0, 5.0]])
    assert torch.equal(arcee_fusion(base, [expert], weights=[0.5]), arcee_fusion(base, [expert]))
    with pytest.raises(MethodError, match="exactly 1"):
        arcee_fusion(base, [base, base])


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_matches_the_dense_formula(rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=gen)
    expert = base + torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen)
    out = arcee_fusion(base, [expert])
    expected = _dense(base, expert)
    # an importance within rounding of the fence may fall either way: compare the rest
    differ = ~torch.isclose(out, expected)
    assert int(differ.sum()) <= 1
