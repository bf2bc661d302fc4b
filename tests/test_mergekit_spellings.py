"""mergekit's parameter spellings mean what they mean in mergekit (issue 17, item 3):
``normalize``, ``rescale``, ``int8_mask``, ``weight`` on the unweighted methods, nuslerp's
weights and modes, passthrough's ``scale``, gradients and filters. Oracles by hand."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import load_file

import supermerge
from conftest import recipe
from supermerge.errors import MethodError, PlanError
from supermerge.methods import get_method

T = torch.tensor
R2 = math.sqrt(0.5)


def load_out(out):
    tensors = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


# -- normalize ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["task_arithmetic", "dare_linear", "della_linear",
                                  "breadcrumbs"])
def test_normalize_divides_the_weighted_sum_by_the_summed_weight(name):
    method = get_method(name)
    base, tau1, tau2 = T([1.0, 2.0, 3.0, 4.0]), T([4.0, -2.0, 1.0, 8.0]), T([-4.0, 2.0, 3.0, 0.5])
    extra = {"density": 1.0} if name != "task_arithmetic" else {}
    if name == "della_linear":
        extra["epsilon"] = 0.0
    if name == "breadcrumbs":
        extra["gamma"] = 0.0
    experts = [base + tau1, base + tau2]
    got = method(base, experts, weights=[1.0, 3.0], normalize=True, **extra)
    torch.testing.assert_close(got, base + (tau1 + 3 * tau2) / 4)
    plain = method(base, experts, weights=[1.0, 3.0], **extra)  # off by default, as mergekit
    torch.testing.assert_close(plain, base + tau1 + 3 * tau2)
    # weights summing to (nearly) zero: mergekit skips the division
    zero = method(base, experts, weights=[1.0, -1.0], normalize=True, **extra)
    torch.testing.assert_close(zero, base + tau1 - tau2)


# -- rescale -----------------------------------------------------------------------------


def test_ties_and_breadcrumbs_rescale_restore_the_l1_norm():
    base = torch.zeros(4)
    tau = T([4.0, -1.0, 2.0, 0.5])
    ties = get_method("ties")
    # keep 2 of 4: [4, 0, 2, 0]; L1 7.5 before, 6 after
    assert torch.equal(ties(base, [tau], density=0.5), T([4.0, 0.0, 2.0, 0.0]))
    torch.testing.assert_close(ties(base, [tau], density=0.5, rescale=True),
                               T([5.0, 0.0, 2.5, 0.0]))
    crumbs = get_method("breadcrumbs")
    tau = T([10.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 0.5])
    kept = T([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 0.0])  # top 1 and bottom 1 gone
    torch.testing.assert_close(crumbs(torch.zeros(10), [tau], density=0.8, gamma=0.1), kept)
    torch.testing.assert_close(crumbs(torch.zeros(10), [tau], density=0.8, gamma=0.1,
                                      rescale=True), kept * (46.5 / 36.0))
    # nothing kept: no division by zero, as mergekit's guard
    assert torch.equal(ties(base, [torch.zeros(4)], density=0.5, rescale=True), base)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_rescale_false_keeps_the_same_entries_unscaled(name):
    """Our rescale (the default) divides by the keep probability; mergekit's
    ``rescale: false`` keeps the survivors as they are, the same survivors."""
    gen = torch.Generator().manual_seed(0)
    base, tau = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    extra = {"epsilon": 0.0} if name.startswith("della") else {}
    method = get_method(name)
    scaled = method(base, [base + tau], density=0.25, seed=5, **extra) - base
    plain = method(base, [base + tau], density=0.25, seed=5, rescale=False, **extra) - base
    assert 0 < int((plain != 0).sum()) < 64
    torch.testing.assert_close(plain, scaled * 0.25)
    torch.testing.assert_close(plain[plain != 0], tau[plain != 0])


# -- int8_mask ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_ties", "dare_linear",
                                  "breadcrumbs", "della", "della_linear"])
def test_int8_mask_is_accepted_and_changes_nothing(name):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(32, generator=gen)
    experts = [base + torch.randn(32, generator=gen) for _ in range(2)]
    method = get_method(name)
    assert torch.equal(method(base, experts, seed=3, int8_mask=True),
                       method(base, experts, seed=3))


def test_the_plan_logs_what_an_accepted_mergekit_key_does_not_change(family, tmp_path, caplog):
    _, _, base_path, paths = family
    caplog.set_level(logging.INFO, logger="supermerge")
    supermerge.merge(recipe("ties", base_path, paths, parameters={"int8_mask": True}),
                     tmp_path / "ties")
    assert "`int8_mask` changes nothing" in caplog.text
    caplog.clear()
    supermerge.merge(recipe("model_stock", base_path, paths,
                            models=[{"model": str(p), "parameters": {"weight": w}}
                                    for p, w in zip(paths, [0.6, 0.4, 1.0], strict=True)]),
                     tmp_path / "stock")
    assert "`weight` changes nothing" in caplog.text


# -- nuslerp -----------------------------------------------------------------------------


def test_nuslerp_weights_set_t_as_in_mergekit():
    nuslerp = get_method("nuslerp")
    base, x1, x2 = T([1.0, 1.0]), T([2.0, 1.0]), T([1.0, 2.0])
    # t = w2 / (w1 + w2) = 0.75: sin(pi/8), sin(3 pi/8) on orthogonal unit task vectors
    expected = base + T([math.sin(math.pi / 8), math.sin(3 * math.pi / 8)])
    torch.testing.assert_close(nuslerp(base, [x1, x2], weights=[1.0, 3.0]), expected)
    torch.testing.assert_close(nuslerp(base, [x1, x2], t=0.75), expected)
    # weights summing to zero: t = 0.5, as mergekit
    torch.testing.assert_close(nuslerp(base, [x1, x2], weights=[-0.5, 0.5]),
                               base + T([R2, R2]))
    with pytest.raises(MethodError, match="either `t` or the models' weights"):
        nuslerp(base, [x1, x2], weights=[1.0, 3.0], t=0.5)


def test_nuslerp_without_a_base_interpolates_the_models():
    nuslerp = get_method("nuslerp")
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    torch.testing.assert_close(nuslerp(None, [a, b]), T([R2, R2]))
    assert not nuslerp.needs_base


def test_nuslerp_flatten_false_interpolates_rows_or_columns():
    nuslerp = get_method("nuslerp")
    base = torch.zeros(2, 2)
    # columns orthogonal pairwise, rows not: the two modes give different answers
    tau1, tau2 = T([[1.0, 0.0], [0.0, 2.0]]), T([[0.0, 1.0], [3.0, 0.0]])
    rows = nuslerp(base, [tau1, tau2], nuslerp_flatten=False)
    columns = nuslerp(base, [tau1, tau2], nuslerp_flatten=False, nuslerp_row_wise=True)
    # each row pair is orthogonal as well here; by hand at t = 0.5 (sin(pi/4) / sin(pi/2))
    torch.testing.assert_close(rows, R2 * (tau1 + tau2))
    # columns: (1, 0) with (0, 3), and (0, 2) with (1, 0): also orthogonal
    torch.testing.assert_close(columns, R2 * (tau1 + tau2))
    # a case where the modes differ: row pairs colinear (linear), columns not
    tau1, tau2 = T([[1.0, 1.0], [1.0, -1.0]]), T([[2.0, 2.0], [-1.0, 1.0]])
    rows = nuslerp(base, [tau1, tau2], nuslerp_flatten=False, t=0.25)
    torch.testing.assert_close(rows[0], torch.lerp(tau1[0], tau2[0], 0.25))
    columns = nuslerp(base, [tau1, tau2], nuslerp_flatten=False, nuslerp_row_wise=True, t=0.25)
    for j in range(2):
        one = nuslerp(torch.zeros(2), [tau1[:, j], tau2[:, j]], t=0.25)
        torch.testing.assert_close(columns[:, j], one)
    assert not torch.allclose(rows, columns)
    # ours: row_wise is nuslerp_flatten false for a matrix; both row modes refused together
    torch.testing.assert_close(nuslerp(base, [tau1, tau2], row_wise=True, t=0.25), rows)
    with pytest.raises(MethodError, match="contradict"):
        nuslerp(base, [tau1, tau2], row_wise=True, nuslerp_row_wise=True)


def test_nuslerp_last_dimension_vectors_of_a_3d_tensor():
    nuslerp = get_method("nuslerp")
    gen = torch.Generator().manual_seed(2)
    base, a, b = (torch.randn(2, 3, 4, generator=gen) for _ in range(3))
    got = nuslerp(base, [a, b], nuslerp_flatten=False, t=0.3)
    for i in range(2):
        for j in range(3):
            one = nuslerp(base[i, j], [a[i, j], b[i, j]], t=0.3)
            torch.testing.assert_close(got[i, j], one)
    got = nuslerp(base, [a, b], nuslerp_flatten=False, nuslerp_row_wise=True, t=0.3)
    for j in range(3):
        for k in range(4):
            one = nuslerp(base[:, j, k], [a[:, j, k], b[:, j, k]], t=0.3)
            torch.testing.assert_close(got[:, j, k], one)


# -- through recipes: gradients, filters, scale ------------------------------------------


def test_gradient_slerp_recipe_with_filters_and_ignored_weights(family, tmp_path):
    """mergekit's examples/gradient-slerp.yml in miniature (models: syntax)."""
    base, experts, base_path, paths = family
    parameters = {"t": [{"filter": "mlp.weight", "value": [0.0, 1.0]}, {"value": 0.5}]}
    models = [{"model": str(base_path), "parameters": {"weight": 0.6}},
              {"model": str(paths[0]), "parameters": {"weight": 0.4}}]
    out = tmp_path / "out"
    supermerge.merge(recipe("slerp", base_path, None, parameters=parameters, models=models), out)
    merged = load_out(out)
    slerp = get_method("slerp")
    for name, b in base.items():
        t = {"model.layers.0.mlp.weight": 0.0, "model.layers.1.mlp.weight": 1.0}.get(name, 0.5)
        torch.testing.assert_close(merged[name], slerp(None, [b, experts[0][name]], t=t),
                                   msg=name)
    assert torch.equal(merged["model.layers.0.mlp.weight"], base["model.layers.0.mlp.weight"])


def test_passthrough_scale_with_filters_per_model(family, tmp_path):
    """mergekit's test_passthrough_scale: a filter list on the model's ``scale``."""
    _, experts, _, paths = family
    scale = [{"filter": "layers.1", "value": 0}, {"filter": "*", "value": 1}]
    out = tmp_path / "out"
    supermerge.merge(recipe("passthrough", None, None,
                            models=[{"model": str(paths[0]), "parameters": {"scale": scale}}]),
                     out)
    merged = load_out(out)
    for name, x in experts[0].items():
        expected = torch.zeros_like(x) if "layers.1" in name else x
        assert torch.equal(merged[name], expected), name


def test_a_models_filters_that_miss_fall_back_to_the_recipes_value(family, tmp_path):
    base, experts, base_path, paths = family
    models = [{"model": str(paths[0]),
               "parameters": {"weight": [{"filter": "mlp.bias", "value": 0.0}]}}]
    out = tmp_path / "out"
    supermerge.merge(recipe("task_arithmetic", base_path, None, models=models,
                            parameters={"weight": 2.0, "normalize": False}), out)
    merged = load_out(out)
    for name, b in base.items():
        w = 0.0 if "mlp.bias" in name else 2.0
        torch.testing.assert_close(merged[name], b + w * (experts[0][name] - b), msg=name)


def test_nuslerp_recipe_without_a_base_and_with_weights(family, tmp_path):
    base, experts, _, paths = family
    models = [{"model": str(paths[0]), "parameters": {"weight": 1.0}},
              {"model": str(paths[1]), "parameters": {"weight": 3.0}}]
    out = tmp_path / "out"
    supermerge.merge(recipe("nuslerp", None, None, models=models,
                            parameters={"nuslerp_flatten": False}), out)
    merged = load_out(out)
    nuslerp = get_method("nuslerp")
    for name in base:
        expected = nuslerp(None, [experts[0][name], experts[1][name]], t=0.75,
                           nuslerp_flatten=False)
        torch.testing.assert_close(merged[name], expected, msg=name)


def test_an_unknown_spelling_is_still_refused(family, tmp_path):
    _, _, base_path, paths = family
    with pytest.raises(PlanError, match="int8_maks"):
        supermerge.merge(recipe("ties", base_path, paths, parameters={"int8_maks": True}),
                         tmp_path / "out")
