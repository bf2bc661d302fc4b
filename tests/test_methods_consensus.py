"""``consensus``: task arithmetic on the weights at least k tasks' TALL masks select."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.errors import MethodError
from supermerge.methods import consensus, task_arithmetic

T = torch.tensor
BASE = torch.ones(4)
TAUS = [T([2.0, 0.0, 1.0, 0.0]), T([2.0, 1.0, 0.0, 0.0]), T([-1.0, 0.0, 0.0, 3.0])]
EXPERTS = [BASE + tau for tau in TAUS]
# tau_MTL = [3, 1, 1, 3]; with tall_lambda 1 the masks |tau_t| >= |tau_MTL - tau_t| are
#   [T, F, T, F], [T, T, F, F], [F, F, F, T]  -> counts [2, 1, 1, 1]


def test_paper_oracle():
    kw = {"tall_lambda": 1.0}
    torch.testing.assert_close(consensus(BASE, EXPERTS, k=2, **kw), BASE + T([3.0, 0, 0, 0]))
    torch.testing.assert_close(consensus(BASE, EXPERTS, k=1, **kw), BASE + T([3.0, 1, 1, 3]))
    torch.testing.assert_close(consensus(BASE, EXPERTS, k=3, **kw), BASE)
    out = consensus(BASE, EXPERTS, k=2, tall_lambda=1.0, **{"lambda": 0.5})
    torch.testing.assert_close(out, BASE + T([1.5, 0, 0, 0]))


def test_per_task_lambda():
    # task 3 with lambda 0.2: entry 0 has 1 >= 0.2 * 4 -> counts [3, 1, 1, 1]
    rows = [{"tall_lambda": 1.0}, {"tall_lambda": 1.0}, {"tall_lambda": 0.2}]
    torch.testing.assert_close(
        consensus(BASE, EXPERTS, k=3, per_model=rows), BASE + T([3.0, 0, 0, 0])
    )


def test_weighted_multi_task_vector():
    # weights [1, 1, 2]: tau_MTL = [2, 1, 1, 6]; masks [T,F,T,F], [T,T,F,F], [F,F,F,T]
    # (task 3, entry 3: 3 >= |6 - 3| holds with >=)
    out = consensus(BASE, EXPERTS, weights=[1.0, 1.0, 2.0], k=2, tall_lambda=1.0)
    torch.testing.assert_close(out, BASE + T([2.0, 0, 0, 0]))


def test_lambda_zero_keeps_every_entry():
    torch.testing.assert_close(
        consensus(BASE, EXPERTS, k=3, tall_lambda=0.0), task_arithmetic(BASE, EXPERTS)
    )


def test_degenerate_inputs_give_no_nan():
    base = T([1.0, 2.0])
    assert torch.equal(consensus(base, [base, base]), base)
    assert torch.equal(consensus(base, [base + 1], weights=[0.0]), base)
    assert torch.equal(consensus(base, [base + 1], k=2), base)  # one task: never 2 users
    assert torch.equal(consensus(base, [base + 1], k=1), base + 1)
    assert torch.equal(consensus(T(1.0), [T(2.0), T(3.0)], tall_lambda=0.0), T(4.0))
    with pytest.raises(MethodError, match="k"):
        consensus(base, [base], k=-1)
    with pytest.raises(MethodError, match="tall_lambda"):
        consensus(base, [base], tall_lambda=-0.5)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 5), max_size=3).map(tuple),
    st.integers(1, 4),
    st.floats(0, 2),
    st.integers(0, 2**32 - 1),
)
def test_k_zero_is_task_arithmetic_and_masks_only_remove(shape, k, lam, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    experts = [torch.randn(shape, generator=gen) for _ in range(k)]
    ta = task_arithmetic(base, experts)
    torch.testing.assert_close(consensus(base, experts, k=0, tall_lambda=lam), ta)
    out = consensus(base, experts, k=2, tall_lambda=lam)
    kept = out != base
    torch.testing.assert_close(out[kept], ta[kept])
