"""The method registry and what every registered method must do."""

from __future__ import annotations

import pytest
import torch

import supermerge.methods as methods
from supermerge.errors import MethodError
from supermerge.methods import Method, available_methods, get_method

NAMES = [
    "arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "consensus", "dare_linear", "dare_ties",
    "della", "della_linear", "doge", "iso_c", "iso_cts", "karcher", "linear", "lines", "magmax",
    "model_stock", "multislerp", "nearswap", "nuslerp", "opcm", "passthrough", "pcb", "ram",
    "ramplus_tl", "sce", "slerp", "task_arithmetic", "ties", "tsv", "widen", "wudi",
]
PER_TASK = ["emr", "tall_masks"]  # return a TaskSpecific: tested in test_task_specific_*.py
# methods that normalise their weights or take none: all-zero weights are not a no-op there
UNWEIGHTED = {"linear", "slerp", "nuslerp", "passthrough", "model_stock", "nearswap", "ram",
              "ramplus_tl", "karcher", "arcee_fusion",
              "sce"}


def count_for(method: Method) -> int:
    return method.max_models or 2


def case(method: Method, base: torch.Tensor, experts: list[torch.Tensor], **kw) -> torch.Tensor:
    return method(base if method.needs_base else None, experts[: count_for(method)], **kw)


def test_registry_is_full_and_reexported():
    assert [m.name for m in available_methods()] == sorted(NAMES + PER_TASK)
    for name in NAMES + PER_TASK:
        method = get_method(name)
        assert getattr(methods, name) is method
        assert method.summary and method.paper
        assert method.needs == ("task id" if name in PER_TASK else "none")
        assert method.per_task == (name in PER_TASK)


def test_every_parameter_is_described():
    for method in available_methods():
        for row in method.describe():
            assert row.description, f"{method.name}.{row.name} has no description"


def test_lambda_is_an_alias_of_scale():
    names = {row.name for row in get_method("ties").describe()}
    assert {"lambda", "density", "weight", "normalize", "sign_on_weighted", "trim_scope"} <= names
    globals_, per_model = get_method("task_arithmetic").parameter_names()
    assert {"lambda", "scale"} <= globals_ and "weight" in per_model


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(MethodError, match="unknown merge method 'tie'") as err:
        get_method("tie")
    assert ", ".join(sorted(NAMES + PER_TASK)) in str(err.value)


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("tie", "'ties'"), ("karcher_mean", "'karcher'"), ("multi_slerp", "'multislerp'"),
     ("breadcrumb_ties", "'breadcrumbs_ties'"), ("ramplus", "'ramplus_tl'")],
)
def test_unknown_method_suggests_the_closest_names(typo, meant):
    with pytest.raises(MethodError, match=r"did you mean .*" + meant):
        get_method(typo)


def test_an_unknown_method_unlike_any_gets_no_suggestion():
    with pytest.raises(MethodError) as err:
        get_method("qqqqqqqq")
    assert "did you mean" not in str(err.value)


def test_unknown_parameter_lists_the_valid_ones():
    x = torch.ones(2)
    with pytest.raises(MethodError, match="'dentsity'") as err:
        get_method("ties")(x, [x], dentsity=0.2)
    assert "density" in err.value.fix and "lambda" in err.value.fix
    with pytest.raises(MethodError, match="'t'"):
        get_method("ties")(x, [x], per_model=[{"t": 0.5}])


def test_wrong_model_count():
    x = torch.ones(2)
    with pytest.raises(MethodError, match="exactly 2 model"):
        get_method("nuslerp")(x, [x])
    with pytest.raises(MethodError, match="at least 1"):
        get_method("ties")(x, [])


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("ties", {"density": 1.5}, "density"),
        ("dare_ties", {"density": -0.1}, "density"),
        ("ties", {"trim_scope": "layer"}, "trim_scope"),
        ("slerp", {"t": 2.0}, "t"),
        ("task_arithmetic", {"lambda": float("nan")}, "lambda"),
        ("linear", {"weight": float("inf")}, "weight"),
        ("breadcrumbs", {"gamma": 1.5}, "gamma"),
        ("della", {"density": 0.9, "epsilon": 0.3}, "epsilon"),
        ("consensus", {"k": -1}, "k"),
        ("pcb", {"ratio": 0.0}, "ratio"),
        ("lines", {"inner": "slerp"}, "inner"),
        ("model_stock", {"filter_wise": "sometimes"}, "filter_wise"),
    ],
)
def test_invalid_values_are_clear_errors(name, params, field):
    x = torch.ones(2)
    with pytest.raises(MethodError, match=f"invalid .* for method '{name}'.*{field}") as err:
        case(get_method(name), x, [x, x], **params)
    assert err.value.fix


def test_a_missing_base_is_an_error():
    with pytest.raises(MethodError, match="needs a base"):
        get_method("ties")(None, [torch.ones(2)])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(), (3,), (2, 3)])
def test_no_nan_on_degenerate_inputs(name, shape):
    method = get_method(name)
    base = torch.zeros(shape)
    for experts in ([base.clone(), base.clone()], [torch.ones(shape), -torch.ones(shape)]):
        out = case(method, base, experts)
        assert out.shape == base.shape and out.dtype == torch.float32
        assert torch.isfinite(out).all()
    if name not in UNWEIGHTED:
        out = case(method, base, [torch.ones(shape)] * 2, weights=[0.0, 0.0])
        assert torch.equal(out, base)


@pytest.mark.parametrize("name", NAMES)
def test_inputs_are_not_modified_and_half_inputs_work(name):
    method = get_method(name)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 3, generator=gen)
    experts = [torch.randn(4, 3, generator=gen) for _ in range(2)]
    kept = [base.clone(), *(e.clone() for e in experts)]
    out = case(method, base, experts)
    assert torch.equal(base, kept[0]) and all(
        torch.equal(e, k) for e, k in zip(experts, kept[1:], strict=True)
    )
    half = case(method, base.half(), [e.half() for e in experts])
    assert half.dtype == torch.float32 and half.shape == out.shape
