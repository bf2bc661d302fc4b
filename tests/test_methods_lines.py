"""``lines``: scale the inner method's merged task vector by alpha + beta * depth."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.errors import MethodError
from supermerge.methods import TensorContext, consensus, lines, task_arithmetic, ties
from supermerge.methods.lines_method import merge_lines

T = torch.tensor
BASE = torch.zeros(2)
EXPERTS = [T([1.0, 2.0]), T([3.0, -2.0])]  # sum of task vectors [4, 0]


@pytest.mark.parametrize(("position", "scale"), [(0.0, 0.5), (0.5, 1.0), (1.0, 1.5)])
def test_depth_scaling_oracle(position, scale):
    out = lines(BASE, EXPERTS, alpha=0.5, beta=1.0, position=position)
    torch.testing.assert_close(out, scale * T([4.0, 0.0]))


@pytest.mark.parametrize(("name", "scale"), [
    ("model.layers.3.mlp.weight", 1.5), ("lm_head.weight", 0.5), ("model.norm.weight", 0.5)])
def test_tensors_outside_the_blocks_get_alpha_as_in_the_reference(name, scale):
    out = lines(BASE, EXPERTS, alpha=0.5, beta=1.0, position=1.0, name=name)
    torch.testing.assert_close(out, scale * T([4.0, 0.0]))


def test_auto_alpha_is_the_average_for_task_arithmetic():
    # alpha = (|sum tau| / |tau_MTL|) / K = 1 / 2 at depth 0: the mean [2, 0]
    torch.testing.assert_close(lines(BASE, EXPERTS, beta=0.0), T([2.0, 0.0]))
    # the inner lambda is normalised away: tau_MTL = 2 sum -> alpha = 1/4
    out = lines(BASE, EXPERTS, beta=0.0, inner_params={"lambda": 2.0})
    torch.testing.assert_close(out, T([2.0, 0.0]))
    # beta 0.5 at depth 1: (1/2 + 1/2) * [4, 0]
    torch.testing.assert_close(lines(BASE, EXPERTS, position=1.0), T([4.0, 0.0]))


def test_ties_inner_with_auto_alpha():
    # TIES at density 1: signs of [4, 0] -> entry 0: mean(1, 3) = 2, entry 1: 0
    # tau_MTL = [2, 0], |sum| / |tau_MTL| = 2 -> alpha = 2 / 2 = 1
    kw = {"inner": "ties", "inner_params": {"density": 1.0}}
    torch.testing.assert_close(lines(BASE, EXPERTS, beta=0.0, **kw), T([2.0, 0.0]))
    torch.testing.assert_close(lines(BASE, EXPERTS, position=1.0, **kw), T([3.0, 0.0]))


def test_per_model_parameters_reach_the_inner_method():
    base = torch.ones(4)
    taus = [T([2.0, 0.0, 1.0, 0.0]), T([2.0, 1.0, 0.0, 0.0]), T([-1.0, 0.0, 0.0, 3.0])]
    experts = [base + t for t in taus]
    kw = {"inner": "consensus", "alpha": 1.0, "beta": 0.0}
    out = lines(base, experts, per_model=[{"tall_lambda": 1.0}] * 3, **kw)
    torch.testing.assert_close(out, consensus(base, experts, tall_lambda=1.0))
    out = lines(base, experts, per_model=[{"tall_lambda": 0.0}] * 3, **kw)
    torch.testing.assert_close(out, task_arithmetic(base, experts))
    out = lines(base, experts, inner="ties", alpha=1.0, beta=0.0, weights=[1.0, 2.0, 0.5],
                per_model=[{"density": 0.5}, {"density": 0.25}, {"density": 1.0}])
    expected = ties(base, experts, weights=[1.0, 2.0, 0.5],
                    per_model=[{"density": 0.5}, {"density": 0.25}, {"density": 1.0}])
    torch.testing.assert_close(out, expected)


def test_inner_whole_model_statistic_is_forwarded():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=gen)
    experts = [torch.randn(6, 4, generator=gen) for _ in range(3)]
    inner = {"trim_scope": "model", "density": 0.3}
    expected = ties(base, experts, **inner)
    out = lines(base, experts, inner="ties", inner_params=inner, alpha=1.0, beta=0.0)
    torch.testing.assert_close(out, expected)
    # auto alpha on top of the inner statistic: alpha = |sum tau| / |tau_MTL| / K
    summed = sum(e - base for e in experts)
    alpha = (summed.norm() / (expected - base).norm()).item() / 3
    out = lines(base, experts, inner="ties", inner_params=inner, beta=0.0)
    torch.testing.assert_close(out, base + alpha * (expected - base))


def test_invalid_inner_parameters_are_clear_errors():
    with pytest.raises(MethodError, match="inner_params.*'dentsity'"):
        lines(BASE, EXPERTS, inner="ties", inner_params={"dentsity": 0.2})
    with pytest.raises(MethodError, match="inner_params.*density"):
        lines(BASE, EXPERTS, inner="ties", inner_params={"density": 2.0})
    with pytest.raises(MethodError, match="weight"):
        lines(BASE, EXPERTS, inner_params={"weight": 2.0})
    with pytest.raises(MethodError, match="density.*do not apply.*task_arithmetic"):
        lines(BASE, EXPERTS, per_model=[{"density": 0.5}] * 2)
    with pytest.raises(MethodError, match="inner"):
        lines(BASE, EXPERTS, inner="dare_ties")
    with pytest.raises(MethodError, match="alpha"):
        lines(BASE, EXPERTS, alpha=float("nan"))


def test_auto_alpha_without_the_statistic_is_a_clear_error():
    params, models = lines.validate({}, [{}, {}])
    with pytest.raises(MethodError, match="norm ratio"):
        merge_lines(BASE, EXPERTS, params, models, TensorContext(name="w"))


def test_degenerate_inputs_give_no_nan():
    base = T([1.0, 2.0])
    assert torch.equal(lines(base, [base, base]), base)  # zero norms: ratio 1
    assert torch.equal(lines(base, [base + 1], weights=[0.0], position=1.0), base)
    out = lines(base, [base + 1, base - 1], inner="consensus", position=0.5)
    assert torch.isfinite(out).all()


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 5), max_size=3).map(tuple),
    st.integers(1, 3),
    st.sampled_from(["task_arithmetic", "ties", "consensus"]),
    st.floats(0, 1),
    st.integers(0, 2**32 - 1),
)
def test_alpha_one_beta_zero_is_the_inner_method(shape, k, inner, position, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    experts = [torch.randn(shape, generator=gen) for _ in range(k)]
    method = {"task_arithmetic": task_arithmetic, "ties": ties, "consensus": consensus}[inner]
    torch.testing.assert_close(
        lines(base, experts, inner=inner, alpha=1.0, beta=0.0, position=position),
        method(base, experts),
    )
