"""Export of learned merges and the entries of `supermerge methods`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from supermerge.errors import MethodError
from supermerge.io import open_checkpoint
from supermerge.learn import (
    LEARNED_METHODS,
    CheckpointState,
    export_learned,
    plot_coefficients,
    supermerge,
)
from test_learn_toys import (
    MLP,
    one_thread,  # noqa: F401  (autouse fixture)
    two_task_toy,
)


@pytest.fixture(scope="module")
def learned():
    toy = two_task_toy()
    return supermerge(toy.module, toy.base_state, toy.experts, toy.tasks(), head_prefix="head.",
                      granularity="block", steps=5)


def test_export_writes_model_coefficients_heatmap_and_heads(tmp_path: Path, learned) -> None:
    out = export_learned(tmp_path / "merged", learned, method="supermerge",
                         base_models=["base", "a", "b"], recipe_yaml="method: supermerge\n")
    merged = learned.model.merged_state_dict()
    first_head = learned.model.head_state_dicts()["a"]
    with open_checkpoint(out / "model.safetensors") as written:
        for name in merged:  # the head is the first task's, never the module's own
            expected = first_head[name] if name.startswith("head.") else merged[name]
            torch.testing.assert_close(written.read(name), expected)
    nodes = json.loads((out / "coefficients.json").read_text())["nodes"]
    assert nodes["root"]["groups"] == learned.model.group_names
    assert nodes["root"]["experts"] == ["a", "b"]
    torch.testing.assert_close(torch.tensor(nodes["root"]["coefficients"]),
                               learned.fits["root"].coefficients)
    rows = list(csv.DictReader((out / "coefficients.csv").open()))
    assert len(rows) == 2 * len(learned.model.group_names) and rows[0]["node"] == "root"
    tensors = load_file(out / "coefficients.safetensors")
    torch.testing.assert_close(tensors["root.coefficients"], torch.tanh(tensors["root.raw"]))
    assert (out / "coefficients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    head = load_file(out / "heads" / "b.safetensors")
    toy = two_task_toy()
    torch.testing.assert_close(head["head.weight"], toy.experts["b"]["head.weight"])
    card = (out / "README.md").read_text()
    assert "base_model_relation: merge" in card and "supermerge" in card and "root" in card


def test_heatmap_of_several_nodes(learned) -> None:
    fits = {"level1.0": learned.fits["root"], "root": learned.fits["root"]}
    png = plot_coefficients(fits)
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_checkpoints_serve_as_lazy_experts(tmp_path: Path) -> None:
    toy = two_task_toy()
    paths = {}
    for name, state in toy.experts.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(state, paths[name])
    lazy = {n: CheckpointState(open_checkpoint(p)) for n, p in paths.items()}
    options = {"head_prefix": "head.", "steps": 3}
    from_files = supermerge(toy.module, toy.base_state, lazy, toy.tasks(), **options)
    in_memory = supermerge(toy.module, toy.base_state, toy.experts, toy.tasks(), **options)
    torch.testing.assert_close(from_files.fits["root"].raw, in_memory.fits["root"].raw)
    assert isinstance(from_files.model.module, MLP)


def test_learned_methods_are_listed_with_parameters_and_data_needs() -> None:
    methods = {m.name: m for m in LEARNED_METHODS}
    assert {n: m.needs for n, m in methods.items()} == {
        "adamerging": "unlabelled", "fisher": "unlabelled", "regmean": "unlabelled",
        "supermerge": "unlabelled", "surgery": "unlabelled", "twin": "unlabelled"}
    supermerge = methods["supermerge"]
    assert supermerge.data_needed(supermerge.validate({})) == "unlabelled"  # distill
    assert supermerge.data_needed(supermerge.validate({"objective": "labels+distill"})
                                  ) == "labelled"
    rows = {p.name: p for p in methods["supermerge"].describe()}
    assert rows["fan_in"].default == 2 and rows["hierarchical"].default is False
    assert rows["steps"].default == 40 and rows["lr"].default == 5e-2
    assert rows["objective"].default == "distill" and rows["basis"].default == "tsv"
    assert all(p.description and not p.per_model for p in rows.values())
    assert {"ties", "density"} <= {p.name for p in methods["adamerging"].describe()}
    with pytest.raises(MethodError, match="fan_in"):
        methods["supermerge"].validate({"fan_in": 1})
    with pytest.raises(MethodError, match="fan_in: Extra inputs"):
        methods["adamerging"].validate({"fan_in": 2})
