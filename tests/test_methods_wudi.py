"""``wudi``: Adam from the task-arithmetic sum on the interference measured by the tasks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.methods import wudi
from supermerge.methods.primitives import adam_

T = torch.tensor


def reference_wudi(taus, steps, lr):
    """The paper's loss written out with autograd and torch.optim.Adam (an independent oracle)."""
    x = torch.nn.Parameter(sum(taus).clone())
    optimiser = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        loss = sum(((x - t) @ t.T).square().sum() / t.square().sum() for t in taus)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return x.detach()


def test_each_task_keeps_its_output_on_its_own_inputs_oracle():
    # tau1 = e1 e1^T sees inputs along e1, tau2 = e1 (1, 1) along (1, 1). The loss is 0
    # where X e1 = tau1 e1 = e1 and X (1, 1) = tau2 (1, 1) = 2 e1, i.e. X = [[1, 1], [0, 0]];
    # task arithmetic gives [[2, 1], [0, 0]] and adds tau2's output to task 1's input.
    base = torch.ones(2, 2)
    experts = [base + T([[1.0, 0.0], [0.0, 0.0]]), base + T([[1.0, 1.0], [0.0, 0.0]])]
    out = wudi(base, experts, steps=4000, lr=1e-3)
    torch.testing.assert_close(out, base + T([[1.0, 1.0], [0.0, 0.0]]), atol=1e-2, rtol=0)
    # the paper's defaults move each entry at most about steps * lr = 3e-3 from the sum
    default = wudi(base, experts)
    assert (default - base - T([[2.0, 1.0], [0.0, 0.0]])).abs().max() <= 3.1e-3
    assert default[0, 0] < base[0, 0] + 2  # ... downhill, towards the minimiser


@pytest.mark.parametrize("shape", [(4, 3), (1, 8)])  # (1, 8): n > 2 K m, the factored form
def test_equals_the_paper_loss_under_torch_adam(shape):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=gen)
    taus = [torch.randn(shape, generator=gen) for _ in range(2)]
    out = wudi(base, [base + t for t in taus], steps=25, lr=1e-2, **{"lambda": 0.5})
    expected = base + 0.5 * reference_wudi(taus, 25, 1e-2)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_weights_scale_the_task_matrices():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(3, 3, generator=gen)
    taus = [torch.randn(3, 3, generator=gen) for _ in range(2)]
    out = wudi(base, [base + t for t in taus], weights=[2.0, 0.5], steps=10, lr=1e-2)
    expected = base + reference_wudi([2 * taus[0], 0.5 * taus[1]], 10, 1e-2)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_non_matrix_tensors_are_averaged():
    base = T([1.0, 1.0])
    experts = [T([3.0, 1.0]), T([1.0, 5.0])]
    torch.testing.assert_close(wudi(base, experts), T([2.0, 3.0]))
    torch.testing.assert_close(wudi(T(0.0), [T(1.0), T(3.0)], **{"lambda": 2.0}), T(4.0))


def test_zero_task_vectors_give_the_base_and_no_nan():
    base = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(wudi(base, [base.clone(), base.clone()]), base)
    assert torch.equal(wudi(base, [base + 1, base - 1], weights=[0.0, 0.0]), base)
    # a zero task has no inputs to protect: merging it changes nothing
    gen = torch.Generator().manual_seed(1)
    x, y = (base + torch.randn(3, 4, generator=gen) for _ in range(2))
    with_zero = wudi(base, [base.clone(), x, y], steps=20, lr=1e-2)
    assert torch.isfinite(with_zero).all()
    torch.testing.assert_close(with_zero, wudi(base, [x, y], steps=20, lr=1e-2))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.integers(1, 5))
def test_one_expert_returns_itself(seed, m, n):
    gen = torch.Generator().manual_seed(seed)
    base, x = torch.randn(m, n, generator=gen), torch.randn(m, n, generator=gen)
    # the gradient at the start (tau itself) is exactly 0: nothing moves
    torch.testing.assert_close(wudi(base, [x], lr=1e-2), x)


def test_identical_experts_return_the_expert_once_converged():
    # square and full rank, so the loss has one minimiser (the rows of tau span every input;
    # otherwise Adam's per-entry steps leave components the loss cannot see)
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(3, 3, generator=gen)
    x = base + 0.1 * torch.randn(3, 3, generator=gen)
    out = wudi(base, [x, x, x], steps=3000, lr=1e-3)
    torch.testing.assert_close(out, x, atol=5e-3, rtol=0)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_permuting_experts_changes_nothing(seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 3, generator=gen)
    experts = [base + torch.randn(4, 3, generator=gen) for _ in range(3)]
    torch.testing.assert_close(wudi(base, experts, steps=30, lr=1e-2),
                               wudi(base, experts[::-1], steps=30, lr=1e-2),
                               rtol=1e-4, atol=1e-4)


def test_adam_is_torch_adam_and_zero_gradients_move_nothing():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(4, 4, generator=gen)
    a = a @ a.T
    x0 = torch.randn(2, 4, generator=gen)
    ours = adam_(x0.clone(), lambda x: x @ a, 40, 1e-2)
    p = torch.nn.Parameter(x0.clone())
    optimiser = torch.optim.Adam([p], lr=1e-2)
    for _ in range(40):
        p.grad = p.detach() @ a
        optimiser.step()
    torch.testing.assert_close(ours, p.detach())
    assert torch.equal(adam_(x0.clone(), torch.zeros_like, 10, 1.0), x0)
