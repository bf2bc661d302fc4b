"""``pcb``: PCB-merging (intra/inter balancing, keep the top ratio, score-weighted mean)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.errors import MethodError
from supermerge.methods import pcb
from supermerge.methods.pcb_method import _clip_magnitudes_

T = torch.tensor
E2 = math.e**2
BASE = torch.ones(3)
TAU1, TAU2 = T([2.0, 1.0, 1.0]), T([1.0, 3.0, -1.0])
EXPERTS = [BASE + TAU1, BASE + TAU2]
# sum = [3, 4, 0]; K = 2.
# task 1: |tau| = [2, 1, 1] -> minmax [1, 0, 0] -> intra exp(2 x^2) = [e^2, 1, 1]
#         inter tanh(tau * sum) = tanh([6, 4, 0]) -> s1 = [e^2 tanh 6, tanh 4, 0]
# task 2: |tau| = [1, 3, 1] -> minmax [0, 1, 0] -> intra [1, e^2, 1]
#         inter tanh([3, 12, 0]) -> s2 = [tanh 3, e^2 tanh 12, 0]


def test_ratio_one_oracle():
    # k = 3: the threshold is each task's smallest score (0), weights g = s / max(s):
    #   g1 = [1, tanh4 / (e^2 tanh6), 0], g2 = [tanh3 / (e^2 tanh12), 1, 0]
    g1 = math.tanh(4) / (E2 * math.tanh(6))
    g2 = math.tanh(3) / (E2 * math.tanh(12))
    expected = T([(2 + g2 * 1) / (1 + g2), (g1 * 1 + 3) / (g1 + 1), 0.0])
    torch.testing.assert_close(pcb(BASE, EXPERTS, ratio=1.0), BASE + expected)


def test_keep_ratio_oracle():
    # ratio 2/3 -> k = 2: threshold = 2nd largest score, which gets weight 0 as in the
    # reference code: g1 = [1, 0, 0], g2 = [0, 1, 0]
    torch.testing.assert_close(pcb(BASE, EXPERTS, ratio=2 / 3), BASE + T([2.0, 3.0, 0.0]))
    out = pcb(BASE, EXPERTS, ratio=2 / 3, **{"lambda": 0.5})
    torch.testing.assert_close(out, BASE + T([1.0, 1.5, 0.0]))
    # a weight multiplies a task's term in the numerator only
    out = pcb(BASE, EXPERTS, weights=[2.0, 1.0], ratio=2 / 3)
    torch.testing.assert_close(out, BASE + T([4.0, 3.0, 0.0]))


def test_one_model_keeps_all_but_its_lowest_score():
    # K = 1: scores exp(x^2) tanh(tau^2) grow with |tau|; the smallest gets weight 0
    base = torch.zeros(4)
    out = pcb(base, [T([2.0, -1.0, 0.5, 0.25])], ratio=1.0)
    torch.testing.assert_close(out, T([2.0, -1.0, 0.5, 0.0]))


def test_tied_top_scores_are_kept_with_weight_one():
    # 0-d tensors: one score per task, at its own maximum -> weight 1 each: the mean
    assert torch.equal(pcb(T(1.0), [T(3.0), T(0.0)]), T(1.5))
    # an all-zero task scores 0 everywhere (tied at its max): it counts in the mean
    # task 2: minmax [0, 1], intra [1, e^2], inter tanh([1, 4]) -> g2 = [0, 1]
    out = pcb(torch.zeros(2), [torch.zeros(2), T([1.0, 2.0])], ratio=1.0)
    torch.testing.assert_close(out, T([0.0, 1.0]))


def test_clip_pulls_in_the_extremes():
    a = torch.arange(1.0, 21.0)
    clipped = _clip_magnitudes_(a.clone(), 0.1)  # floor(0.1 * 20) = 2 at each end
    assert torch.equal(clipped, a.clamp(3.0, 18.0))
    assert _clip_magnitudes_(a, 0.01) is a  # floor(0.2) = 0: unchanged
    assert torch.equal(a, torch.arange(1.0, 21.0))


def test_degenerate_inputs_give_no_nan():
    base = T([1.0, 2.0])
    assert torch.equal(pcb(base, [base, base]), base)
    assert torch.equal(pcb(base, [base + 1, base - 1], weights=[0.0, 0.0]), base)
    big = [torch.randn(50, generator=torch.Generator().manual_seed(i)) for i in range(100)]
    assert torch.isfinite(pcb(torch.zeros(50), big)).all()  # exp(K x^2) with K = 100
    with pytest.raises(MethodError, match="ratio"):
        pcb(base, [base], ratio=0.0)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 6), max_size=3).map(tuple),
    st.integers(1, 4),
    st.floats(0.01, 1),
    st.integers(0, 2**32 - 1),
)
def test_merged_entries_lie_within_the_candidates(shape, k, ratio, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    experts = [torch.randn(shape, generator=gen) for _ in range(k)]
    merged = pcb(base, experts, ratio=ratio) - base
    taus = torch.stack([e - base for e in experts])  # clip = 1e-4: nothing clipped here
    low = torch.minimum(taus.amin(0), torch.zeros(shape))
    high = torch.maximum(taus.amax(0), torch.zeros(shape))
    assert torch.all(merged >= low - 1e-5) and torch.all(merged <= high + 1e-5)
    torch.testing.assert_close(pcb(base, [experts[0]] * k, ratio=1.0),
                               pcb(base, [experts[0]], ratio=1.0), rtol=1e-5, atol=1e-5)
