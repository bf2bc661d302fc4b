"""``iso_c``: the summed task matrix with its singular spectrum flattened to its mean."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.methods import iso_c
from supermerge.methods.primitives import nonzero_svd

T = torch.tensor
R5 = math.sqrt(5)


def test_flattened_spectrum_oracle():
    # sum = diag(3, 1): singular values 3 and 1, mean 2, U V^T = I -> 2 I
    base = torch.ones(2, 2)
    experts = [base + T([[3.0, 0.0], [0.0, 0.0]]), base + T([[0.0, 0.0], [0.0, 1.0]])]
    torch.testing.assert_close(iso_c(base, experts), base + 2 * torch.eye(2))
    torch.testing.assert_close(iso_c(base, experts, **{"lambda": 0.5}), base + torch.eye(2))
    # weights scale the task matrices before the sum: diag(6, 1) -> mean 3.5
    torch.testing.assert_close(iso_c(base, experts, weights=[2.0, 1.0]),
                               base + 3.5 * torch.eye(2))


def test_rectangular_and_rank_deficient_oracle():
    # 3 x 2: sum [[8,0],[0,1],[0,2]] has singular values 8 (e1, e1) and sqrt5
    # ((0,1,2)/sqrt5, e2): merged = (8 + sqrt5)/2 * (e1 e1^T + (0,1,2)^T e2^T / sqrt5)
    base = torch.zeros(3, 2)
    experts = [T([[4.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), T([[4.0, 0.0], [0.0, 0.0], [0.0, 2.0]])]
    mean = (8 + R5) / 2
    expected = mean * T([[1.0, 0.0], [0.0, 1 / R5], [0.0, 2 / R5]])
    torch.testing.assert_close(iso_c(base, experts), expected)
    # tasks that cancel to rank 1: only the non-zero direction is kept (mean over it)
    cancel = [T([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), T([[1.0, 0.0], [0.0, -1.0], [0.0, 0.0]])]
    torch.testing.assert_close(iso_c(base, cancel), T([[3.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))


def test_non_matrix_tensors_are_averaged():
    base = T([1.0, 1.0])
    experts = [T([3.0, 1.0]), T([1.0, 5.0])]
    torch.testing.assert_close(iso_c(base, experts), T([2.0, 3.0]))
    torch.testing.assert_close(iso_c(T(0.0), [T(1.0), T(3.0)]), T(2.0))
    cube = torch.zeros(2, 2, 2)
    torch.testing.assert_close(iso_c(cube, [cube + 2, cube + 4]), cube + 3)


def test_zero_task_vectors_give_the_base():
    base = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    out = iso_c(base, [base.clone(), base.clone()])
    assert torch.equal(out, base)
    assert torch.equal(iso_c(base, [base + 1, base - 1], weights=[0.0, 0.0]), base)


def test_nonzero_svd_drops_null_components():
    u, s, vh = nonzero_svd(T([[1.0, 1.0], [1.0, 1.0]]))
    assert s.shape == (1,) and u.shape == (2, 1) and vh.shape == (1, 2)
    torch.testing.assert_close(s, T([2.0]))
    u, s, vh = nonzero_svd(torch.zeros(3, 2))
    assert u.shape == (3, 0) and s.numel() == 0 and vh.shape == (0, 2)


def random_case(seed, k=3, shape=(4, 3)):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    return base, [base + torch.randn(shape, generator=gen) for _ in range(k)]


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_one_expert_is_its_isotropic_self_and_copies_scale(seed):
    base, (x, *_) = random_case(seed)
    u, s, vh = torch.linalg.svd(x - base, full_matrices=False)
    expected = base + s.mean() * u @ vh  # the paper's one-task merge: sigma U V^T
    torch.testing.assert_close(iso_c(base, [x]), expected, rtol=1e-4, atol=1e-4)
    # K copies sum to K tau: the same directions, K times the mean singular value
    torch.testing.assert_close(iso_c(base, [x, x, x], **{"lambda": 1 / 3}), expected,
                               rtol=1e-4, atol=1e-4)


def test_one_expert_with_a_flat_spectrum_returns_itself():
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))
    base = torch.ones(4, 4)
    expert = base + 0.3 * q
    torch.testing.assert_close(iso_c(base, [expert]), expert)
    torch.testing.assert_close(iso_c(base, [expert] * 3, **{"lambda": 1 / 3}), expert)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_permuting_experts_changes_nothing(seed):
    base, experts = random_case(seed)
    torch.testing.assert_close(iso_c(base, experts), iso_c(base, experts[::-1]),
                               rtol=1e-4, atol=1e-5)
