"""``doge``: projected Adam on a shared modification, coefficients eta / ||tau_i||."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.methods import doge

T = torch.tensor


def test_one_step_oracle_without_projection():
    # tau1 = [[3,4],[0,0]] (norm 5), tau2 = [[0,0],[0,2]] (norm 2), eta 1:
    # lambda = (0.2, 0.5), c = 0.7, tau_m(0) = [[0.6, 0.8], [0, 1]].
    # a_1 = (<(3,4), (2.4,3.2)>, 0) = (20, 0); a_2 = (0, <(0,2), (0,1)>) = (0, 2)
    # grad = -2c (a_1 tau_1 + a_2 tau_2) = [[-84, -112], [0, -5.6]]
    # Adam's first step is -lr * sign(grad): D = [[0.1, 0.1], [0, 0.1]] for lr 0.1
    # merged = tau_m(0) + c D = [[0.67, 0.87], [0, 1.07]]
    base = torch.ones(2, 2)
    experts = [base + T([[3.0, 4.0], [0.0, 0.0]]), base + T([[0.0, 0.0], [0.0, 2.0]])]
    common = {"eta": 1.0, "density": 1.0, "subspace": 5, "lr": 0.1}  # 2 // 5 = 0: no projection
    out = doge(base, experts, steps=1, **common)
    torch.testing.assert_close(out, base + T([[0.67, 0.87], [0.0, 1.07]]))
    # no steps: the coefficients alone
    torch.testing.assert_close(doge(base, experts, steps=0, **common),
                               base + T([[0.6, 0.8], [0.0, 1.0]]))


def test_the_shared_subspace_is_left_alone():
    # both tasks' top left singular vector is e1 (K = 2, r = 2 -> k = 1; subspace 2 -> one
    # shared direction, e1): the gradient's first row is removed, only row 2 moves.
    # tau2 = diag(2, 1): lambda_2 = 1/sqrt5, a_2[row 2] = 1 - lambda_2 > 0 -> D[1, 1] = +lr
    base = torch.zeros(2, 2)
    tau1, tau2 = T([[3.0, 4.0], [0.0, 0.0]]), T([[2.0, 0.0], [0.0, 1.0]])
    lam = [0.2, 1 / 5**0.5]
    out = doge(base, [tau1, tau2], eta=1.0, density=1.0, subspace=2, steps=1, lr=0.1)
    expected = lam[0] * tau1 + lam[1] * tau2 + sum(lam) * T([[0.0, 0.0], [0.0, 0.1]])
    torch.testing.assert_close(out, expected)
    # top directions e1 and e2, subspace 1: the shared subspace is everything, nothing moves
    tau3 = T([[0.0, 0.0], [0.0, 2.0]])
    out = doge(base, [tau1, tau3], eta=1.0, density=1.0, subspace=1, steps=5, lr=0.1)
    torch.testing.assert_close(out, 0.2 * tau1 + 0.5 * tau3)


def test_trim_keeps_each_task_vectors_top_entries():
    base = torch.zeros(2, 2)
    tau = T([[3.0, 0.5], [-4.0, 1.0]])  # norm sqrt(26.25); density 0.5 keeps 3 and -4
    out = doge(base, [tau], eta=2.0, density=0.5, steps=0)
    lam = 2.0 / float(tau.norm())
    torch.testing.assert_close(out, lam * T([[3.0, 0.0], [-4.0, 0.0]]))


def test_non_matrix_tensors_are_averaged():
    base = T([1.0, 1.0])
    torch.testing.assert_close(doge(base, [T([3.0, 1.0]), T([1.0, 5.0])]), T([2.0, 3.0]))
    torch.testing.assert_close(doge(T(0.0), [T(1.0), T(3.0)]), T(2.0))


def test_zero_task_vectors_give_the_base_and_no_nan():
    base = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(doge(base, [base.clone(), base.clone()]), base)
    assert torch.equal(doge(base, [base + 1, base - 1], weights=[0.0, 0.0]), base)
    x = base + torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    out = doge(base, [base.clone(), x], steps=10, lr=1e-2)
    assert torch.isfinite(out).all()


def test_one_expert_with_eta_its_norm_returns_itself():
    base = torch.randn(2, 2, generator=torch.Generator().manual_seed(2))
    tau = T([[3.0, 4.0], [0.0, 0.0]])  # norm 5: lambda = 1, the gradient at D = 0 is 0
    torch.testing.assert_close(doge(base, [base + tau], eta=5.0, density=1.0), base + tau)


def test_copies_with_coefficients_summing_to_one_return_the_expert():
    base = torch.zeros(2, 2)
    tau = T([[0.0, 3.0], [4.0, 0.0]])
    out = doge(base, [base + tau, base + tau], eta=2.5, density=1.0)  # lambda = 1/2 each
    torch.testing.assert_close(out, tau)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_permuting_experts_changes_nothing(seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 5, generator=gen)
    experts = [base + torch.randn(6, 5, generator=gen) for _ in range(3)]
    params = {"steps": 20, "lr": 1e-2, "subspace": 2, "eta": 1.0}
    torch.testing.assert_close(doge(base, experts, **params), doge(base, experts[::-1], **params),
                               rtol=1e-4, atol=1e-4)
