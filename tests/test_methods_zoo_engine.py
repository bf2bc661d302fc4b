"""The method zoo through the streaming engine: each tensor is the method applied to it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import supermerge
from conftest import recipe
from supermerge.engine.params import LayerPositions
from supermerge.engine.plan import tensor_seed
from supermerge.methods import get_method

ZOO = [
    "breadcrumbs", "breadcrumbs_ties", "consensus", "della", "della_linear", "doge", "iso_c",
    "iso_cts", "karcher", "magmax", "model_stock", "multislerp", "pcb", "ram", "ramplus_tl",
    "sce", "tsv", "widen", "wudi",
]
ONE_EXPERT = ["arcee_fusion", "nearswap"]  # the base and one other model


def load_out(out):
    tensors = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.mark.parametrize(
    ("method", "parameters"),
    [(name, {}) for name in ZOO]
    + [("lines", {"alpha": 0.2, "beta": 0.6, "inner": "ties", "inner_params": {"density": 0.5}})],
)
def test_engine_equals_the_method_on_tensors(family, tmp_path, method, parameters):
    base, experts, base_path, paths = family
    out = tmp_path / method
    supermerge.merge(recipe(method, base_path, paths, parameters=parameters, seed=7), out)
    merged = load_out(out)
    positions = LayerPositions(base)
    for name, b in base.items():
        expected = get_method(method)(b, [e[name] for e in experts], seed=tensor_seed(7, name),
                                      name=name, position=positions.position(name),
                                      **parameters)
        torch.testing.assert_close(merged[name], expected, msg=f"{method} {name}")


@pytest.mark.parametrize("method", ONE_EXPERT)
def test_engine_equals_the_method_with_one_expert(family, tmp_path, method):
    base, experts, base_path, paths = family
    out = tmp_path / method
    supermerge.merge(recipe(method, base_path, paths[:1], seed=7), out)
    merged = load_out(out)
    for name, b in base.items():
        expected = get_method(method)(b, [experts[0][name]], seed=tensor_seed(7, name), name=name)
        torch.testing.assert_close(merged[name], expected, msg=f"{method} {name}")


def test_lines_auto_alpha_spans_the_whole_model(family, tmp_path):
    # task arithmetic inner: |sum tau| / |tau_MTL| = 1 over the model -> alpha = 1 / K
    base, experts, base_path, paths = family
    out = tmp_path / "lines"
    supermerge.merge(recipe("lines", base_path, paths, parameters={"beta": 0.3}), out)
    merged = load_out(out)
    positions = LayerPositions(base)
    for name, b in base.items():
        summed = sum(e[name] - b for e in experts)
        # outside the numbered blocks (embeddings, final norm, head): alpha alone
        depth = positions.position(name) if ".layers." in name else 0.0
        scale = 1 / 3 + 0.3 * depth
        torch.testing.assert_close(merged[name], b + scale * summed, msg=name)
    assert any(".layers." not in name and positions.position(name) == 1 for name in base)
