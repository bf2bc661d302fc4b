"""``magmax``: per entry, the task-vector value of the largest magnitude."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.methods import magmax

T = torch.tensor
BASE = torch.ones(4)
TAUS = [T([3.0, -1.0, 2.0, 0.0]), T([-4.0, 1.0, 2.0, 0.5]), T([1.0, -0.5, -2.0, 0.0])]
EXPERTS = [BASE + tau for tau in TAUS]


def test_paper_oracle():
    # entry 0: -4; entry 1: |-1| = |1|, the later wins -> 1; entry 2: 2, 2, -2 tie -> -2;
    # entry 3: 0.5
    selected = T([-4.0, 1.0, -2.0, 0.5])
    torch.testing.assert_close(magmax(BASE, EXPERTS), BASE + 0.5 * selected)  # lambda 0.5
    torch.testing.assert_close(magmax(BASE, EXPERTS, **{"lambda": 1.0}), BASE + selected)


def test_weights_scale_before_the_selection():
    # w = [1, 0.5, 1]: u2 = [-2, 0.5, 1, 0.25] -> [3, -1, -2, 0.25]
    out = magmax(BASE, EXPERTS, weights=[1.0, 0.5, 1.0], **{"lambda": 1.0})
    torch.testing.assert_close(out, BASE + T([3.0, -1.0, -2.0, 0.25]))


def test_degenerate_inputs_give_no_nan():
    base = T([1.0, 2.0])
    assert torch.equal(magmax(base, [base, base]), base)
    assert torch.equal(magmax(base, [base + 1, base - 3], weights=[0.0, 0.0]), base)
    assert torch.equal(magmax(T(1.0), [T(3.0)], scale=1.0), T(3.0))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 5), max_size=3).map(tuple),
    st.integers(1, 4),
    st.integers(0, 2**32 - 1),
)
def test_copies_return_the_model_and_the_pick_is_a_candidate(shape, k, seed):
    gen = torch.Generator().manual_seed(seed)
    base, x = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    torch.testing.assert_close(magmax(base, [x] * k, scale=1.0), x)
    experts = [torch.randn(shape, generator=gen) for _ in range(k)]
    picked = magmax(base, experts, scale=1.0) - base
    taus = torch.stack([e - base for e in experts])
    assert torch.all(picked.abs() >= taus.abs().amax(0) - 1e-6)
    assert torch.all((taus - picked).abs().amin(0) <= 1e-6)  # one of the task vectors
