"""``breadcrumbs``: drop outliers and small entries, then task arithmetic (Davari 2023)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.errors import MethodError
from supermerge.methods import breadcrumbs, task_arithmetic, ties

T = torch.tensor
BASE = torch.ones(10)
TAU1 = T([10.0, -9.0, 8.0, -7.0, 6.0, -5.0, 4.0, -3.0, 2.0, -1.0])
TAU2 = T([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
EXPERTS = [BASE + TAU1, BASE + TAU2]


def test_paper_oracle():
    # gamma 0.1 drops each vector's largest entry, density 0.5 keeps the next 5:
    #   b1 = [0, -9, 8, -7, 6, -5, 0, 0, 0, 0], b2 = [0, 0, 0, 0, 5, 6, 7, 8, 9, 0]
    out = breadcrumbs(BASE, EXPERTS, density=0.5, gamma=0.1)
    torch.testing.assert_close(out, BASE + T([0.0, -9, 8, -7, 11, 1, 7, 8, 9, 0]))
    out = breadcrumbs(BASE, EXPERTS, weights=[1.0, 0.5], density=0.5, gamma=0.1,
                      **{"lambda": 2.0})
    torch.testing.assert_close(out, BASE + 2 * T([0.0, -9, 8, -7, 8.5, -2, 3.5, 4, 4.5, 0]))


def test_per_model_density_and_gamma():
    out = breadcrumbs(BASE, EXPERTS, per_model=[{"density": 0.2, "gamma": 0.0},
                                                {"density": 0.1, "gamma": 0.3}])
    # b1 = top 2 = [10, -9, 0...]; b2: drop 10, 9, 8, keep 7
    torch.testing.assert_close(out, BASE + T([10.0, -9, 0, 0, 0, 0, 7, 0, 0, 0]))


def test_gamma_zero_is_top_k_not_the_base():
    # mergekit's magnitude_outliers drops everything at gamma 0 (indices[n_bot:-0] is empty)
    out = breadcrumbs(BASE, EXPERTS, density=0.5, gamma=0.0)
    torch.testing.assert_close(out, BASE + T([10.0, -9, 8, -7, 6, 6, 7, 8, 9, 10]))
    assert not torch.equal(out, BASE)
    # the same with a tensor too small for the default gamma (round(0.01 * 4) = 0)
    small = breadcrumbs(torch.zeros(4), [T([4.0, -1.0, 2.0, 3.0])], density=0.5)
    assert torch.equal(small, T([4.0, 0.0, 0.0, 3.0]))


def test_density_wins_over_gamma():
    out = breadcrumbs(BASE, [EXPERTS[0]], density=0.9, gamma=0.2)  # 9 kept: 1 outlier
    torch.testing.assert_close(out, BASE + torch.cat([T([0.0]), TAU1[1:]]))
    out = breadcrumbs(BASE, [EXPERTS[0]], density=1.0, gamma=0.2)  # nothing dropped
    torch.testing.assert_close(out, EXPERTS[0])


def test_degenerate_inputs_give_no_nan():
    base = T([1.0, 2.0])
    assert torch.equal(breadcrumbs(base, [base, base]), base)
    assert torch.equal(breadcrumbs(base, [base + 1], weights=[0.0]), base)
    assert torch.equal(breadcrumbs(T(1.0), [T(3.0)]), T(3.0))
    with pytest.raises(MethodError, match="gamma"):
        breadcrumbs(base, [base], gamma=1.5)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 6), max_size=3).map(tuple),
    st.integers(1, 3),
    st.floats(0, 1),
    st.integers(0, 2**32 - 1),
)
def test_gamma_zero_is_ties_trim_without_election_and_density_one_is_task_arithmetic(
    shape, k, density, seed
):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    experts = [torch.randn(shape, generator=gen) for _ in range(k)]
    torch.testing.assert_close(
        breadcrumbs(base, experts, density=1.0, gamma=0.0), task_arithmetic(base, experts)
    )
    # one model: no election to differ, so gamma 0 is TIES with the same density
    torch.testing.assert_close(
        breadcrumbs(base, experts[:1], density=density, gamma=0.0),
        ties(base, experts[:1], density=density),
    )
