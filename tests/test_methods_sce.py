"""``sce``: select by variance, weight by squared share, erase sign conflicts (FuseChat)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.methods import sce, ties

T = torch.tensor
BASE = torch.ones(4)
TAU1 = T([2.0, -1.0, 0.0, 3.0])  # mean square 14 / 4 = 3.5
TAU2 = T([4.0, 1.0, -4.0, -1.0])  # mean square 34 / 4 = 8.5
EXPERTS = [BASE + TAU1, BASE + TAU2]


def test_oracle():
    # weights 3.5 / 12 and 8.5 / 12; summed signs [+, 0, -, +]:
    # entry 0 both agree: (3.5 * 2 + 8.5 * 4) / 12; entry 1 sign 0: 0;
    # entry 2 only model 2; entry 3 only model 1
    out = sce(BASE, EXPERTS)
    torch.testing.assert_close(out, BASE + T([41 / 12, 0.0, -4.0, 3.0]))


def test_select_oracle():
    # variances ((a - b) / 2)^2 = [1, 1, 4, 4]: select_topk 0.5 keeps entries 2 and 3
    out = sce(BASE, EXPERTS, select_topk=0.5)
    torch.testing.assert_close(out, BASE + T([0.0, 0.0, -4.0, 3.0]))
    # 0.25 of 4: one entry, ties lowest index first
    torch.testing.assert_close(sce(BASE, EXPERTS, select_topk=0.25), BASE + T([0, 0, -4.0, 0]))
    assert torch.equal(sce(BASE, EXPERTS, select_topk=0.0), BASE)
    assert torch.equal(sce(BASE, EXPERTS, int8_mask=True), sce(BASE, EXPERTS))


def test_degenerate_inputs():
    base = T([1.0, -2.0])
    assert torch.equal(sce(base, [base.clone(), base.clone()]), base)
    assert torch.equal(sce(T(1.0), [T(3.0)]), T(3.0))
    # one model (or copies) has zero variance everywhere: selection keeps nothing
    assert torch.equal(sce(base, [base + 1, base + 1], select_topk=0.5), base)
    assert torch.equal(sce(BASE, EXPERTS, weights=[2.0, 0.5]), sce(BASE, EXPERTS))  # ignored


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 5), max_size=3).map(tuple),
    st.integers(1, 4),
    st.integers(0, 2**32 - 1),
)
def test_copies_permutations_and_one_model(shape, k, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    experts = [torch.randn(shape, generator=gen) for _ in range(k)]
    torch.testing.assert_close(sce(base, experts[:1]), experts[0])
    torch.testing.assert_close(sce(base, [experts[0]] * k), experts[0])
    for topk in (1.0, 0.5):
        torch.testing.assert_close(sce(base, experts[::-1], select_topk=topk),
                                   sce(base, experts, select_topk=topk))
    # equal squared shares (a task vector and its reversal): TIES's disjoint mean, no trim
    tau = experts[0] - base
    same = [experts[0], base + tau.flatten().flip(0).view(shape)]
    torch.testing.assert_close(sce(base, same), ties(base, same, density=1.0))
