"""``widen``: per-column weights from ranked magnitude and direction changes."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.methods import widen
from supermerge.methods.widen_method import rank_fraction

T = torch.tensor


def test_hand_computed_oracle():
    # base = I. Expert 1 adds 1 at (0, 0): column 0 -> (2, 0): dM = 1, dD = 0; column 1
    # unchanged. Expert 2 adds 1 at (1, 0): column 0 -> (1, 1): dM = sqrt2 - 1, dD =
    # 1 - 1/sqrt2; column 1 unchanged.
    # ranks / 2: R(dM_1) = (0.5, 0), R(dD_1) = (0, 0.5) (a tie: lower index first),
    # R(dM_2) = (0.5, 0), R(dD_2) = (0.5, 0).
    # magnitude: softmax over models = 1/2 everywhere, calibrated to 1 above each model's
    # mean 0.25 -> S_M = [[1, 1/2], [1, 1/2]].
    # direction: softmax of (0, 0.5) = (1 - p, p), p = sigmoid(0.5); calibrated -> S_D =
    # [[1 - p, 1], [1, 1 - p]]. Column 0's weights: (2 - p)/2 for expert 1, 1 for expert 2.
    p = 1 / (1 + math.exp(-0.5))
    base = torch.eye(2)
    experts = [base + T([[1.0, 0.0], [0.0, 0.0]]), base + T([[0.0, 0.0], [1.0, 0.0]])]
    expected = base + T([[(2 - p) / 2, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(widen(base, experts), expected)
    torch.testing.assert_close(widen(base, experts, **{"lambda": 2.0}),
                               base + 2 * (expected - base))


def test_vectors_are_scored_on_their_raw_changes():
    # |tau| = (1, 0) and (0, 3): softmax over models per entry, calibrated to 1 above each
    # model's mean (0.5 and 1.5): entry 0 of model 1 and entry 1 of model 2 get 1
    base = T([1.0, 1.0])
    experts = [T([2.0, 1.0]), T([1.0, 4.0])]
    torch.testing.assert_close(widen(base, experts), T([2.0, 4.0]))
    # with no calibration (threshold high): the softmax weights
    out = widen(base, experts, threshold=10.0)
    w0 = torch.softmax(T([1.0, 0.0]), 0)[0]
    w1 = torch.softmax(T([0.0, 3.0]), 0)[1]
    torch.testing.assert_close(out, T([1.0 + w0, 1.0 + 3 * w1]))


def test_rank_fraction_breaks_ties_by_index():
    torch.testing.assert_close(rank_fraction(T([[3.0, 1.0, 1.0, 2.0]])),
                               T([[0.75, 0.0, 0.25, 0.5]]))


def test_zero_task_vectors_give_the_base():
    base = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(widen(base, [base.clone(), base.clone()]), base)
    assert torch.equal(widen(base, [base + 1, base - 1], weights=[0.0, 0.0]), base)
    zero = torch.zeros(2, 3)  # zero columns in base and expert: cosine 0, no NaN
    assert torch.isfinite(widen(zero, [zero.clone(), zero + 1])).all()


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([(3,), (4, 3), (2, 3, 2)]))
def test_one_expert_returns_itself(seed, shape):
    gen = torch.Generator().manual_seed(seed)
    base, x = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    torch.testing.assert_close(widen(base, [x]), x)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([(5,), (4, 3)]))
def test_copies_with_calibration_one_over_k_return_the_expert(seed, shape):
    gen = torch.Generator().manual_seed(seed)
    base, x = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    torch.testing.assert_close(widen(base, [x, x, x], calibration=1 / 3), x)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_permuting_experts_changes_nothing(seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(5, 4, generator=gen)
    experts = [base + torch.randn(5, 4, generator=gen) for _ in range(3)]
    torch.testing.assert_close(widen(base, experts), widen(base, experts[::-1]))
