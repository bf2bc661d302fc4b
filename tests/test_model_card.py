"""The model card (issue 17, item 6): ``base_model`` holds only hub ids, each once; local
paths are named in the body, as mergekit's card does; the card parses with
huggingface_hub's ModelCard when that library is installed."""

from __future__ import annotations

import pytest
import torch
import yaml

import supermerge
from conftest import recipe
from supermerge.io import CheckpointWriter
from supermerge.io.writer import is_hub_id


def front_and_body(out):
    _, front, body = (out / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(front), body


def test_hub_ids_by_the_hubs_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ["gpt2", "org/model", "Org-1/model_v2.5", "a.b/c-d"]:
        assert is_hub_id(name), name
    for name in ["/abs/model", "./model", "../model", "~/model", "a/b/c", "org/", "-org/m",
                 "org/m-", "org--x/m", "org/m..x", "org/.m", "a b/c", "x" * 97, ""]:
        assert not is_hub_id(name), name
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").mkdir()
    assert not is_hub_id("org/model")  # a folder of that name exists here: a local path


def test_local_paths_go_in_the_body_and_hub_ids_in_base_model_once(tmp_path):
    local = str(tmp_path / "experts" / "math")
    with CheckpointWriter(tmp_path / "out") as writer:
        writer.add("w", torch.ones(1))
        writer.write_model_card(base_models=["org/base", local, "org/code", "org/base"],
                                method="ties", recipe_yaml="merge_method: ties\n")
        out = writer.commit()
    meta, body = front_and_body(out)
    assert meta["base_model"] == ["org/base", "org/code"]
    assert meta["base_model_relation"] == "merge"
    assert f"`{local}`" in body
    assert "[org/code](https://huggingface.co/org/code)" in body
    assert body.count("org/base](") == 1 and "merge of 3 model(s)" in body


def test_a_merge_of_local_files_without_a_base_names_each_model_once(family, tmp_path):
    _, _, _, paths = family
    out = tmp_path / "out"
    supermerge.merge(recipe("linear", None, paths), out)
    meta, body = front_and_body(out)
    assert "base_model" not in meta and meta["base_model_relation"] == "merge"
    assert {"merge", "supermerge"} <= set(meta["tags"])
    for path in paths:
        assert body.count(f"`{path}`") == 1
    assert "merge of 3 model(s)" in body


def test_the_card_parses_with_huggingface_hub(tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    with CheckpointWriter(tmp_path / "out") as writer:
        writer.add("w", torch.ones(1))
        writer.write_model_card(base_models=["org/math", str(tmp_path / "local"), "org/math"],
                                method="ties", recipe_yaml="merge_method: ties\n",
                                extra_markdown="## Notes\n\nnone")
        out = writer.commit()
    card = hub.ModelCard((out / "README.md").read_text())
    assert card.data.base_model == ["org/math"]
    assert card.data.library_name == "transformers"
    assert "merge" in card.data.tags
    assert "## Models merged" in card.text
