"""`supermerge search` and `supermerge map` end to end on a tiny random BERT and two tasks."""

from __future__ import annotations

import csv
import json
import random

import click
import pytest
import torch
import yaml
from click.testing import CliRunner

from supermerge.cli.search import register
from supermerge.eval.model import head_path, new_head, save_head
from supermerge.recipes import load_recipe

transformers = pytest.importorskip("transformers")

FILLER = [f"w{i}" for i in range(20)]
MARKERS = {"colour": ("red", "blue", "green"), "animal": ("cat", "dog")}


@pytest.fixture(scope="module")
def space_file(tmp_path_factory):
    """A tiny random BERT, two 'experts' (the base nudged, each with a head for its
    synthetic task: which marker word a text holds) and a space file over their weights.
    Nothing is trained: these tests check the commands, not the scores."""
    root = tmp_path_factory.mktemp("search-cli")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER,
             *(w for ws in MARKERS.values() for w in ws)]
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=16,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    model = transformers.BertModel(config)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(str(root / "base"))
    files, experts = [], []
    for index, (name, markers) in enumerate(MARKERS.items()):
        rng = random.Random(name)
        rows = [{"text": " ".join(rng.sample(FILLER, 3) + [markers[i % len(markers)]]),
                 "label": markers[i % len(markers)]} for i in range(80)]
        files.append(root / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        experts.append(root / f"expert-{name}")
        model.save_pretrained(experts[-1])
        save_head(new_head(16, len(markers), seed=index), head_path(experts[-1], name))
    space = {"merge_method": "task_arithmetic", "base_model": "base",
             "models": [e.name for e in experts],
             "search": {"parameters": {"weight": [0.0, 1.5]},
                        "tasks": [f.name for f in files], "max_length": 12}}
    path = root / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.fixture(scope="module")
def cli():
    group = click.Group("supermerge")
    register(group)
    return group


def test_search_writes_the_best_recipe_and_model_and_resumes(cli, space_file, tmp_path):
    runner = CliRunner()
    args = ["search", str(space_file), "-o", str(tmp_path), "--popsize", "3"]
    result = runner.invoke(cli, [*args, "--generations", "2"])
    assert result.exit_code == 0, result.output
    recipe = load_recipe(tmp_path / "best_recipe.yaml")  # a normal recipe
    assert recipe.merge_method == "task_arithmetic" and len(recipe.models) == 2
    assert (tmp_path / "model" / "config.json").is_file()
    summary = json.loads((tmp_path / "search.json").read_text())
    assert summary["evaluations"] == 6
    result = runner.invoke(cli, [*args, "--generations", "3", "--no-export"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "history.csv") as f:
        assert [r["generation"] for r in csv.DictReader(f)] == ["1"] * 3 + ["2"] * 3 + ["3"] * 3


def test_map_writes_the_front_and_its_plot(cli, space_file, tmp_path):
    result = CliRunner().invoke(cli, ["map", str(space_file), "-o", str(tmp_path),
                                      "--checks", "3", "--resolution", "11"])
    assert result.exit_code == 0, result.output
    front = json.loads((tmp_path / "map.json").read_text())
    checks = len(front["checks"])  # at most 3: fewer when the front has fewer points
    assert 1 <= checks <= 3 and front["evaluations"] == 9 + checks
    assert (tmp_path / "front.png").stat().st_size > 1000
    assert "re-measured front points" in result.output


def test_bad_spaces_are_one_clear_error(cli, space_file, tmp_path):
    bad = tmp_path / "bad.yaml"
    document = yaml.safe_load(space_file.read_text())
    document["search"]["parameters"] = {"weight": [1.0, 1.0]}
    bad.write_text(yaml.safe_dump(document))
    result = CliRunner().invoke(cli, ["search", str(bad), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "empty" in result.output and "Traceback" not in result.output
