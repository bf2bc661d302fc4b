"""``tsv``: TSV-M, per-matrix top singular vectors, orthogonalised across tasks."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.methods import tsv
from supermerge.methods.tsv_method import polar_factor

T = torch.tensor
R2 = math.sqrt(2)


def test_orthogonal_tasks_oracle():
    # K = 2, r = 2 -> k = 1: task 1's top component 3 e1 e1^T, task 2's 2 e2 e2^T;
    # U = V = [e1 e2] is already orthonormal -> diag(3, 2)
    base = torch.ones(2, 2)
    experts = [base + T([[3.0, 0.0], [0.0, 1.0]]), base + T([[0.0, 0.0], [0.0, 2.0]])]
    torch.testing.assert_close(tsv(base, experts), base + T([[3.0, 0.0], [0.0, 2.0]]))
    torch.testing.assert_close(tsv(base, experts, weights=[2.0, 1.0]),
                               base + T([[6.0, 0.0], [0.0, 2.0]]))
    torch.testing.assert_close(tsv(base, experts, **{"lambda": 0.5}),
                               base + T([[1.5, 0.0], [0.0, 1.0]]))


def test_interfering_tasks_oracle():
    # tau1 = 3 e1 e1^T, tau2 = 2 u u^T with u = (1, 1)/sqrt2 (45 degrees from e1).
    # The orthonormal matrix closest to [e1 u] turns both columns 22.5 degrees apart:
    # p1 = (cos 22.5, -sin 22.5), p2 = (sin 22.5, cos 22.5); V likewise, so
    # merged = 3 p1 p1^T + 2 p2 p2^T = [[(10 + sqrt2)/4, -sqrt2/4], [-sqrt2/4, (10 - sqrt2)/4]]
    base = torch.zeros(2, 2)
    experts = [T([[3.0, 0.0], [0.0, 0.0]]), T([[1.0, 1.0], [1.0, 1.0]])]
    expected = T([[(10 + R2) / 4, -R2 / 4], [-R2 / 4, (10 - R2) / 4]])
    torch.testing.assert_close(tsv(base, experts), expected)


def test_non_matrix_tensors_are_averaged():
    base = T([1.0, 1.0])
    experts = [T([3.0, 1.0]), T([1.0, 5.0])]  # tau = [2, 0], [0, 4] -> mean [1, 2]
    torch.testing.assert_close(tsv(base, experts), T([2.0, 3.0]))
    torch.testing.assert_close(tsv(base, experts, **{"lambda": 2.0}), T([3.0, 5.0]))
    torch.testing.assert_close(tsv(T(0.0), [T(1.0), T(3.0)]), T(2.0))
    cube = torch.zeros(2, 2, 2)  # 3-D: averaged too
    torch.testing.assert_close(tsv(cube, [cube + 2, cube + 4]), cube + 3)


def test_matrix_with_rank_below_the_task_count_is_averaged():
    base = torch.zeros(2, 3)  # r = 2 < K = 3 -> k = 0
    experts = [torch.full((2, 3), float(i)) for i in (1, 2, 3)]
    torch.testing.assert_close(tsv(base, experts), torch.full((2, 3), 2.0))


def test_copies_give_the_rank_k_approximation():
    base = torch.zeros(2, 2)
    x = T([[3.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(tsv(base, [x, x]), T([[3.0, 0.0], [0.0, 0.0]]))


def test_zero_task_vectors_contribute_nothing():
    base = torch.ones(2, 2)
    assert torch.equal(tsv(base, [base, base]), base)
    x = T([[3.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(tsv(base, [base, base + x]), base + T([[3.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(tsv(base, [base + 1, base - 1], weights=[0.0, 0.0]), base)


def test_polar_factor_of_orthonormal_columns_is_itself():
    q, _ = torch.linalg.qr(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(polar_factor(q), q)
    rows = polar_factor(torch.randn(2, 6, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(rows @ rows.T, torch.eye(2))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_one_expert_returns_itself(m, n, seed):
    gen = torch.Generator().manual_seed(seed)
    base, x = torch.randn(m, n, generator=gen), torch.randn(m, n, generator=gen)
    torch.testing.assert_close(tsv(base, [x]), x, rtol=1e-4, atol=1e-4)
