"""``ram`` and ``ramplus_tl``: unique changes kept whole, shared ones averaged."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.errors import MethodError
from supermerge.methods import ram, ramplus_tl

T = torch.tensor
BASE = torch.full((5,), 2.0)
TAUS = [
    T([1.0, 2.0, 0.0, 1e-6, 3.0]),  # entry 3 is below epsilon: unchanged
    T([0.0, 4.0, 5.0, 6.0, -1.0]),
    T([0.0, 0.0, 0.0, 0.0, 1.0]),
]
EXPERTS = [BASE + tau for tau in TAUS]
# active counts c = [1, 2, 1, 1, 3]: unique entries whole, shared ones averaged
RAM = T([1.0, 3.0, 5.0, 6.0, 1.0])


def test_ram_oracle():
    torch.testing.assert_close(ram(BASE, EXPERTS), BASE + RAM)
    # epsilon above 2 also silences model 0's 2 at entry 1 (and every 1)
    torch.testing.assert_close(ram(BASE, EXPERTS, epsilon=2.5), BASE + T([0.0, 4, 5, 6, 3]))


def test_ramplus_oracle():
    # model 0: unique {0}, shared {1, 4}: rho 2; model 1: unique {2, 3}, shared {1, 4}: rho 1;
    # model 2: no unique entry (rho = 1 / 1e-5, clamped; nothing to scale)
    out = ramplus_tl(BASE, EXPERTS, r=0.5, alpha=1.5)  # lambda = 1.75, 1.5, 1.75
    torch.testing.assert_close(out, BASE + T([1.75, 3.0, 7.5, 9.0, 1.0]))
    out = ramplus_tl(BASE, EXPERTS)  # r 0.1, alpha 0.2: lambda = 1.02 for both
    torch.testing.assert_close(out, BASE + T([1.02, 3.0, 5.1, 6.12, 1.0]))


def test_degenerate_inputs():
    base = T([1.0, -2.0])
    for method in (ram, ramplus_tl):
        assert torch.equal(method(base, [base.clone(), base.clone()]), base)
        assert torch.equal(method(T(1.0), [T(3.0)]), T(3.0))
        experts = [base + T([1.0, 0.0]), base + T([3.0, 2.0])]
        assert torch.equal(method(base, experts, weights=[0.5, 2.0]), method(base, experts))
    with pytest.raises(MethodError, match="alpha"):
        ramplus_tl(base, [base], alpha=-1.0)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 5), max_size=3).map(tuple),
    st.integers(1, 4),
    st.floats(0, 1),
    st.integers(0, 2**32 - 1),
)
def test_copies_permutations_and_r_zero(shape, k, sparsity, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    taus = [torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) > sparsity)
            for _ in range(k)]
    experts = [base + tau for tau in taus]
    for method in (ram, ramplus_tl):
        one = method(base, experts[:1])
        torch.testing.assert_close(one, experts[0])  # entries are 0 or far above epsilon
        torch.testing.assert_close(method(base, [experts[0]] * k), one)  # copies: the model
        torch.testing.assert_close(method(base, experts[::-1]), method(base, experts))
    torch.testing.assert_close(ramplus_tl(base, experts, r=0.0), ram(base, experts))
