"""``breadcrumbs_ties``: Breadcrumbs' outlier-and-small masks, then TIES's sign election."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.methods import breadcrumbs, breadcrumbs_ties, ties

T = torch.tensor
BASE = torch.ones(10)
TAU1 = T([10.0, -9.0, 8.0, -7.0, 6.0, -5.0, 4.0, -3.0, 2.0, -1.0])
TAU2 = T([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
EXPERTS = [BASE + TAU1, BASE + TAU2]
# gamma 0.1 drops each vector's largest entry, density 0.5 keeps the next 5:
B1 = T([0.0, -9, 8, -7, 6, -5, 0, 0, 0, 0])
B2 = T([0.0, 0, 0, 0, 5, 6, 7, 8, 9, 0])


def test_oracle():
    # summed signs [0, -, +, -, +, +, +, +, +, 0]: entry 5 keeps only B2's 6 (B1's -5 is
    # erased); entry 4 sums 6 + 5 (normalize false, mergekit's default) or averages them
    out = breadcrumbs_ties(BASE, EXPERTS, density=0.5, gamma=0.1)
    torch.testing.assert_close(out, BASE + T([0.0, -9, 8, -7, 11, 6, 7, 8, 9, 0]))
    out = breadcrumbs_ties(BASE, EXPERTS, density=0.5, gamma=0.1, normalize=True)
    torch.testing.assert_close(out, BASE + T([0.0, -9, 8, -7, 5.5, 6, 7, 8, 9, 0]))
    out = breadcrumbs_ties(BASE, EXPERTS, weights=[1.0, 0.5], density=0.5, gamma=0.1,
                           **{"lambda": 2.0})
    torch.testing.assert_close(out, BASE + 2 * T([0.0, -9, 8, -7, 8.5, 3, 3.5, 4, 4.5, 0]))


def test_rescale_restores_each_band_to_its_l1_norm():
    out = breadcrumbs_ties(BASE, EXPERTS[:1], density=0.5, gamma=0.1, rescale=True)
    torch.testing.assert_close(out, BASE + B1 * 55 / 35)  # |TAU1|_1 = 55, |B1|_1 = 35


def test_degenerate_inputs():
    base = T([1.0, 2.0])
    assert torch.equal(breadcrumbs_ties(base, [base, base]), base)
    assert torch.equal(breadcrumbs_ties(base, [base + 1], weights=[0.0]), base)
    assert torch.equal(breadcrumbs_ties(T(1.0), [T(3.0)]), T(3.0))
    assert torch.equal(breadcrumbs_ties(base, [base + 1], int8_mask=True), base + 1)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 6), max_size=3).map(tuple),
    st.integers(1, 3),
    st.floats(0, 1),
    st.floats(0, 0.5),
    st.integers(0, 2**32 - 1),
)
def test_relations_to_ties_and_breadcrumbs(shape, k, density, gamma, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    experts = [torch.randn(shape, generator=gen) for _ in range(k)]
    # gamma 0 is TIES's trim, so with TIES's mean it is TIES
    torch.testing.assert_close(
        breadcrumbs_ties(base, experts, density=density, gamma=0.0, normalize=True),
        ties(base, experts, density=density),
    )
    # one model: nothing to elect, the disjoint sum is Breadcrumbs
    torch.testing.assert_close(
        breadcrumbs_ties(base, experts[:1], density=density, gamma=gamma),
        breadcrumbs(base, experts[:1], density=density, gamma=gamma),
    )
    torch.testing.assert_close(
        breadcrumbs_ties(base, experts[::-1], density=density, gamma=gamma),
        breadcrumbs_ties(base, experts, density=density, gamma=gamma),
    )
    # copies, averaged, without a trim: the model
    torch.testing.assert_close(
        breadcrumbs_ties(base, [experts[0]] * k, density=1.0, normalize=True), experts[0]
    )
