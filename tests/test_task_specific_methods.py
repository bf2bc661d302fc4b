"""``tall_masks`` and ``emr``: per-task methods on tensors, against hand-computed oracles."""

from __future__ import annotations

import pytest
import torch

from supermerge.errors import MethodError
from supermerge.methods import TaskSpecific, TensorContext, emr, get_method, tall_masks
from supermerge.methods.emr_method import EmrRescalers, elect
from supermerge.methods.registry import task_tensor

T = torch.tensor
BASE = torch.ones(4)

# --- TALL masks ------------------------------------------------------------------------

TALL_TAUS = [T([2.0, 0.0, 1.0, 0.0]), T([2.0, 1.0, 0.0, 0.0]), T([-1.0, 0.0, 0.0, 3.0])]
TALL_EXPERTS = [BASE + tau for tau in TALL_TAUS]
# tau_MTL = [3, 1, 1, 3]; with tall_lambda 1 the masks |tau_t| >= |tau_MTL - tau_t| are
#   [T, F, T, F] (2>=1, 0>=1, 1>=0, 0>=3), [T, T, F, F], [F, F, F, T] (1>=4, ..., 3>=0)


def test_tall_masks_paper_oracle():
    out = tall_masks(BASE, TALL_EXPERTS, tall_lambda=1.0)
    assert isinstance(out, TaskSpecific) and out.scales == (1.0, 1.0, 1.0)
    torch.testing.assert_close(out.shared, BASE + T([3.0, 1, 1, 3]))
    expected = [[True, False, True, False], [True, True, False, False],
                [False, False, False, True]]
    assert [m.tolist() for m in out.masks] == expected
    # theta_t = base + m_t * tau_MTL
    torch.testing.assert_close(out.task(BASE, 0), BASE + T([3.0, 0, 1, 0]))
    torch.testing.assert_close(out.task(BASE, 2), BASE + T([0.0, 0, 0, 3]))


def test_tall_masks_with_lambda_zero_keep_every_entry():
    out = tall_masks(BASE, TALL_EXPERTS, tall_lambda=0.0)
    assert all(bool(m.all()) for m in out.masks)  # zero entries too (>=, not >)
    for t in range(3):
        assert torch.equal(out.task(BASE, t), out.shared)


def test_tall_masks_scale_weights_and_per_task_lambda():
    # weights [1, 1, 2], lambda 0.5: tau_MTL = 0.5 * [2, 1, 1, 6] = [1, 0.5, 0.5, 3]
    # task 0 (lambda 1): [2>=1, 0>=0.5, 1>=0.5, 0>=3] = [T, F, T, F]
    # task 2 (lambda 0.2): |[-1,0,0,3]| >= 0.2 |[2, .5, .5, 0]| = [T, F, F, T]
    rows = [{"weight": 1.0, "tall_lambda": 1.0}, {"weight": 1.0, "tall_lambda": 1.0},
            {"weight": 2.0, "tall_lambda": 0.2}]
    out = tall_masks(BASE, TALL_EXPERTS, per_model=rows, **{"lambda": 0.5})
    torch.testing.assert_close(out.shared, BASE + T([1.0, 0.5, 0.5, 3.0]))
    assert out.masks[0].tolist() == [True, False, True, False]
    assert out.masks[2].tolist() == [True, False, False, True]
    torch.testing.assert_close(out.task(BASE, 2), BASE + T([1.0, 0, 0, 3]))


# --- EMR ---------------------------------------------------------------------------------

EMR_TAUS = [T([2.0, -1.0, 1.0, 0.0]), T([1.0, 3.0, -2.0, 0.0])]
EMR_EXPERTS = [BASE + tau for tau in EMR_TAUS]
# sum = [3, 2, -1, 0] -> sign [+, +, -, 0]
# tau_uni = [max(2, 1), 3 (only task 1 is +), -2 (only task 1 is -), 0] = [2, 3, -2, 0]
# M_0 = tau_0 * tau_uni > 0 = [T, F, F, F];  M_1 = [T, T, T, F]
# lambda_0 = (2 + 1 + 1) / 2 = 2;  lambda_1 = (1 + 3 + 2) / (2 + 3 + 2) = 6 / 7


def test_emr_two_task_oracle():
    out = emr(BASE, EMR_EXPERTS)
    torch.testing.assert_close(out.shared, BASE + T([2.0, 3, -2, 0]))
    assert [m.tolist() for m in out.masks] == [[True, False, False, False],
                                               [True, True, True, False]]
    assert out.scales == pytest.approx((2.0, 6 / 7))
    torch.testing.assert_close(out.task(BASE, 0), BASE + T([4.0, 0, 0, 0]))
    torch.testing.assert_close(out.task(BASE, 1), BASE + 6 / 7 * T([2.0, 3, -2, 0]))


def test_emr_rescalers_sum_over_the_whole_model():
    # two tensors: EMR_TAUS, and [[4, 0]] vs [[-1, 0]] (sum 3 > 0: tau_uni [4, 0];
    # M_0 = [T, F], M_1 = [F, F]). lambda_0 = (4 + 4) / (2 + 4), lambda_1 = (6 + 1) / 7.
    stat = EmrRescalers(2)
    for tensor in (EMR_TAUS, [T([[4.0, 0.0]]), T([[-1.0, 0.0]])]):
        for i, tau in enumerate(tensor):
            stat.observe(0, i, tau)
    stat.finish_pass(0)
    assert stat.result() == pytest.approx((8 / 6, 1.0))


def test_emr_zero_sum_and_zero_task_vector_are_finite():
    # entry 0: +1 and -1 cancel -> sign 0 -> tau_uni 0 and no mask; task 2 is all zero
    base = torch.ones(2)
    experts = [base + T([1.0, 2.0]), base + T([-1.0, 1.0]), base + T([0.0, 0.0])]
    out = emr(base, experts)
    torch.testing.assert_close(out.shared, base + T([0.0, 2.0]))
    assert [m.tolist() for m in out.masks] == [[False, True], [False, True], [False, False]]
    # lambda_0 = 3 / 2, lambda_1 = 2 / 2; task 2 agrees nowhere: 1, not NaN
    assert out.scales == pytest.approx((1.5, 1.0, 1.0))
    assert torch.equal(out.task(base, 2), base)


def test_elect_matches_the_direct_formula():
    gen = torch.Generator().manual_seed(0)
    taus = [torch.randn(5, 7, generator=gen) for _ in range(4)]
    unified, masks = elect(taus)
    stacked = torch.stack(taus)
    sign = stacked.sum(0).sign()
    agreeing = torch.where(stacked.sign() == sign, stacked.abs(), 0.0)
    expected = sign * agreeing.max(0).values
    torch.testing.assert_close(unified, expected)
    for tau, mask in zip(taus, masks, strict=True):
        assert torch.equal(mask, tau * expected > 0)


def test_emr_without_its_statistic_is_a_clear_error():
    with pytest.raises(MethodError, match="rescalers"):
        emr.fn(BASE, EMR_EXPERTS, emr.params(), [emr.model_params()] * 2,
               TensorContext(name="w"))


def test_emr_takes_no_weights():
    with pytest.raises(MethodError, match="does not weight"):
        emr(BASE, EMR_EXPERTS, weights=[1.0, 2.0])


# --- both --------------------------------------------------------------------------------


def test_registry_entries():
    for name in ("tall_masks", "emr"):
        method = get_method(name)
        assert method.per_task and method.needs == "task id" and method.needs_base
        assert method.paper and method.summary


@pytest.mark.parametrize("name", ["tall_masks", "emr"])
@pytest.mark.parametrize("shape", [(), (3,), (2, 3)])
def test_degenerate_inputs_give_finite_results(name, shape):
    method = get_method(name)
    base = torch.zeros(shape)
    cases = ([base.clone(), base.clone()], [torch.ones(shape), -torch.ones(shape)],
             [torch.ones(shape)])
    for experts in cases:
        out = method(base, experts)
        assert out.shared.shape == base.shape and out.shared.dtype == torch.float32
        assert torch.isfinite(out.shared).all()
        assert len(out.masks) == len(out.scales) == len(experts)
        assert all(m.dtype == torch.bool and m.shape == base.shape for m in out.masks)
        for t in range(len(experts)):
            assert torch.isfinite(out.task(base, t)).all()


@pytest.mark.parametrize("name", ["tall_masks", "emr"])
def test_single_expert_retrieves_it(name):
    # one task: TALL's tau_MTL is tau (every mask set); EMR's tau_uni is tau, rescaler 1
    gen = torch.Generator().manual_seed(1)
    base, expert = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    out = get_method(name)(base, [expert])
    torch.testing.assert_close(out.task(base, 0), expert)


@pytest.mark.parametrize("name", ["tall_masks", "emr"])
def test_inputs_are_not_modified_and_half_inputs_work(name):
    method = get_method(name)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 3, generator=gen)
    experts = [torch.randn(4, 3, generator=gen) for _ in range(2)]
    kept = [base.clone(), *(e.clone() for e in experts)]
    out = method(base, experts)
    assert torch.equal(base, kept[0])
    assert all(torch.equal(e, k) for e, k in zip(experts, kept[1:], strict=True))
    half = method(base.half(), [e.half() for e in experts])
    assert half.shared.dtype == torch.float32 and half.shared.shape == out.shared.shape


@pytest.mark.parametrize("name", ["tall_masks", "emr"])
def test_scratch_gives_the_same_result(name):
    """In the engine (ctx.scratch) the methods work in place on the experts: same output."""
    method = get_method(name)
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(6, 5, generator=gen)
    experts = [torch.randn(6, 5, generator=gen) for _ in range(3)]
    expected = method(base, experts)
    params, models = method.validate({}, [{}] * 3)
    ctx = TensorContext(statistic=expected.scales, scratch=True)
    out = method.fn(base, [e.clone() for e in experts], params, models, ctx)
    assert torch.equal(out.shared, expected.shared)
    assert all(torch.equal(a, b) for a, b in zip(out.masks, expected.masks, strict=True))


def test_task_tensor_is_exact_at_scale_one_and_keeps_the_dtype():
    base = T([1.0, 2.0, 3.0]).bfloat16()
    shared = T([1.5, 2.5, 3.5]).bfloat16()
    mask = T([True, False, True])
    assert torch.equal(task_tensor(base, shared, mask, 1.0), T([1.5, 2.0, 3.5]).bfloat16())
    scaled = task_tensor(base, shared, mask, 2.0)
    assert scaled.dtype == torch.bfloat16
    assert torch.equal(scaled, T([2.0, 2.0, 4.0]).bfloat16())
