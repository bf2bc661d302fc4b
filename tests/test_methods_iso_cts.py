"""``iso_cts``: the sum's common directions plus each task's own, with a flat spectrum."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.methods import iso_c, iso_cts

T = torch.tensor
R2 = math.sqrt(2)


def test_common_and_task_specific_oracle():
    # r = 3, K = 2, f = 0.34: floor(1.02) = 1 -> s = (3 - 1) // 2 = 1 per task, k = 1 common.
    # sum = [[8,0,0],[0,1,0],[0,2,0]]: common direction e1 e1^T (8).
    # task 1 without it: e2 e2^T (1); task 2 without it: 2 e3 e2^T (2).
    # U~ = [e1 e2 e3] is orthonormal; V~ = [e1 e2 e2]: its polar factor (non-zero part)
    # is [e1 e2/sqrt2 e2/sqrt2]. mean(8, 1, 2) = 11/3, so
    # merged = 11/3 (e1 e1^T + e2 e2^T / sqrt2 + e3 e2^T / sqrt2)
    base = torch.ones(3, 3)
    tau1 = T([[4.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    tau2 = T([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    expected = 11 / 3 * T([[1.0, 0.0, 0.0], [0.0, 1 / R2, 0.0], [0.0, 1 / R2, 0.0]])
    out = iso_cts(base, [base + tau1, base + tau2], common_fraction=0.34)
    torch.testing.assert_close(out, base + expected)
    # Iso-C keeps the sum's own second direction (0, 1, 2)/sqrt5 instead
    assert not torch.allclose(iso_c(base, [base + tau1, base + tau2]), out, atol=1e-2)
    torch.testing.assert_close(
        iso_cts(base, [base + tau1, base + tau2], common_fraction=0.34, **{"lambda": 3.0}),
        base + 3 * expected,
    )


def test_no_room_for_task_directions_is_iso_c():
    # r = 2, K = 2, f = 0.8: floor(1.6) = 1 -> s = (2 - 1) // 2 = 0: Iso-C
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2, 5, generator=gen)
    experts = [base + torch.randn(2, 5, generator=gen) for _ in range(2)]
    torch.testing.assert_close(iso_cts(base, experts), iso_c(base, experts))


def test_non_matrix_tensors_are_averaged():
    base = T([1.0, 1.0])
    experts = [T([3.0, 1.0]), T([1.0, 5.0])]
    torch.testing.assert_close(iso_cts(base, experts), T([2.0, 3.0]))
    torch.testing.assert_close(iso_cts(T(0.0), [T(1.0), T(3.0)]), T(2.0))


def test_zero_task_vectors_give_the_base():
    base = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(iso_cts(base, [base.clone()] * 3), base)
    assert torch.equal(iso_cts(base, [base + 1, base - 1], weights=[0.0, 0.0]), base)
    # one zero task among others contributes no direction and no NaN
    other = base + torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    out = iso_cts(base, [base.clone(), other], common_fraction=0.4)
    assert torch.isfinite(out).all()


def random_case(seed, k=3, shape=(8, 6)):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    return base, [base + torch.randn(shape, generator=gen) for _ in range(k)]


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.5, 0.8]))
def test_one_expert_is_iso_c_of_itself(seed, fraction):
    # the task-specific directions of a single task are the rest of its own spectrum
    base, (x, *_) = random_case(seed)
    torch.testing.assert_close(iso_cts(base, [x], common_fraction=fraction), iso_c(base, [x]),
                               rtol=1e-4, atol=1e-4)


def test_one_expert_with_a_flat_spectrum_returns_itself():
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(2)))
    base = torch.zeros(5, 5)
    torch.testing.assert_close(iso_cts(base, [0.2 * q]), 0.2 * q)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_permuting_experts_changes_nothing(seed):
    base, experts = random_case(seed)
    torch.testing.assert_close(iso_cts(base, experts, common_fraction=0.5),
                               iso_cts(base, experts[::-1], common_fraction=0.5),
                               rtol=1e-4, atol=1e-4)
