"""The README's "your own models" walkthrough, end to end: two classifiers fine-tuned with
plain transformers from one BertModel base (2 and 3 classes, labels written as names),
merged with their heads kept, λ swept on the user's validation files, evaluated, learned,
and each task's model loaded ready to use."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from click.testing import CliRunner

import supermerge
from helpers_words import VOCAB_SIZE, WORDS, fine_tune, word_tokenizer
from supermerge.cli.main import cli

transformers = pytest.importorskip("transformers")

TASKS = {"fruit": ["other", "apple"], "colour": ["none", "red", "blue"]}


def rows(task: str, n: int, seed: int) -> list[dict]:
    """``n`` examples of five words: fruit says whether "apple" is among them; colour which
    of "red" and "blue" is (at most one is), or none."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if task == "fruit":
            words = [rng.choice(WORDS) for _ in range(5)]
            label = "apple" if "apple" in words else "other"
        else:
            label = rng.choice(TASKS["colour"])
            words = [rng.choice([w for w in WORDS if w not in ("red", "blue")])
                     for _ in range(5)]
            if label != "none":
                words[rng.randrange(5)] = label
        out.append({"input": " ".join(words), "label": label})
    return out


def config(**extra):
    return transformers.BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64,
                                   max_position_embeddings=16, **extra)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """base/ (a BertModel and its tokenizer), fruit/ and colour/ (fine-tuned
    BertForSequenceClassification), and each task's validation file."""
    root = tmp_path_factory.mktemp("walkthrough")
    tokenizer = word_tokenizer(root)
    torch.manual_seed(0)
    base = transformers.BertModel(config())
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for seed, (task, labels) in enumerate(TASKS.items()):
        torch.manual_seed(seed)
        model = transformers.BertForSequenceClassification(config(
            num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)}))
        model.bert.load_state_dict(base.state_dict())
        train = rows(task, 256, seed=seed)
        fine_tune(model, tokenizer, [r["input"] for r in train],
                  [labels.index(r["label"]) for r in train], steps=60)
        model.save_pretrained(root / task)
        (root / f"{task}.jsonl").write_text(
            "\n".join(json.dumps(r) for r in rows(task, 48, seed=100 + seed)) + "\n")
    (root / "merge.yaml").write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": "base", "heads": "classifier.",
        "models": ["fruit", "colour"], "parameters": {"lambda": 0.5}}))
    return root


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def data_args(root) -> list[str]:
    return [arg for task in TASKS for arg in ("--data", f"{task}={root / f'{task}.jsonl'}")]


def test_merge_sweep_evaluate_and_load_your_own_classifiers(workspace, tmp_path):
    root = workspace
    run("merge", str(root / "merge.yaml"), "-o", str(tmp_path / "merged"))
    assert sorted(p.name for p in (tmp_path / "merged" / "heads").iterdir()) == [
        "colour.json", "colour.safetensors", "fruit.json", "fruit.safetensors"]

    sweep_json = tmp_path / "sweep.json"
    output = run("sweep", str(root / "merge.yaml"), "-o", str(tmp_path / "best"),
                 "--param", "lambda=0.3,1.0", *data_args(root), "--json", str(sweep_json))
    assert "<- kept" in output
    swept = json.loads(sweep_json.read_text())
    scores = [p["score"] for p in swept["points"]]
    assert [p["parameters"]["lambda"] for p in swept["points"]] == [0.3, 1.0]
    assert swept["best"]["lambda"] == [0.3, 1.0][scores.index(max(scores))]
    best_recipe = yaml.safe_load((tmp_path / "best" / "supermerge_recipe.yaml").read_text())
    assert best_recipe["parameters"]["lambda"] == swept["best"]["lambda"]
    assert not list(tmp_path.glob(".best.sweep-*"))  # candidates are deleted

    report_json = tmp_path / "report.json"
    run("evaluate", str(tmp_path / "best"), *data_args(root), "--json", str(report_json))
    report = json.loads(report_json.read_text())
    assert report["experts"]["fruit"] > 0.8 and report["experts"]["colour"] > 0.8
    assert report["normalized"] == pytest.approx(max(scores))

    colour = supermerge.load_task_model(tmp_path / "best", "colour")
    assert colour.config.id2label == {0: "none", 1: "red", 2: "blue"}
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "best")
    data = [json.loads(line) for line in (root / "colour.jsonl").read_text().splitlines()]
    batch = tokenizer([r["input"] for r in data], return_tensors="pt", padding=True)
    with torch.no_grad():
        predicted = colour(**batch).logits.argmax(-1).tolist()
    accuracy = sum(colour.config.id2label[p] == r["label"]
                   for p, r in zip(predicted, data, strict=True)) / len(data)
    assert accuracy == pytest.approx(report["per_task"]["colour"])


def test_learn_your_own_classifiers_and_load_each_task(workspace, tmp_path, capfd):
    root = workspace
    (root / "learn.yaml").write_text(yaml.safe_dump({
        "merge_method": "supermerge", "base_model": "base", "heads": "classifier.",
        "max_length": 8, "experts": [{"model": task, "data": f"{task}.jsonl", "labels": labels}
                                     for task, labels in TASKS.items()],
        "parameters": {"steps": 6, "eval_every": 3, "select": "off"}}))
    output = run("learn", str(root / "learn.yaml"), "--threads", "1", "-o",
                 str(tmp_path / "learned"))
    assert "of 6 run" in output  # the steps kept and run
    assert "LOAD REPORT" not in output + capfd.readouterr().err  # transformers' noise
    fit = json.loads((tmp_path / "learned" / "coefficients.json").read_text())["nodes"]["root"]
    assert fit["steps_run"] == 6 and 0 <= fit["best_step"] <= 6
    fruit = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "learned")  # the model itself answers the first task, with its labels
    assert fruit.config.id2label == {0: "other", 1: "apple"}
    colour = supermerge.load_task_model(tmp_path / "learned", "colour")
    assert colour.config.num_labels == 3
    torch.testing.assert_close(colour.bert.encoder.layer[1].output.dense.weight,
                               fruit.bert.encoder.layer[1].output.dense.weight)
    output = run("evaluate", str(tmp_path / "learned"), *data_args(root))
    assert "fruit" in output and "colour" in output


def test_backbone_folders_with_head_files_learn_and_load(workspace, tmp_path):
    """The benchmark's expert layout: an encoder folder plus a linear head file, the
    classifier mean-pooling the encoder's states."""
    from safetensors.torch import save_file

    from supermerge.learn.modules import MeanPooledEncoder, PooledClassifier

    root = workspace
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "base")
    experts = []
    for seed, (task, labels) in enumerate(TASKS.items()):
        torch.manual_seed(seed)
        encoder = MeanPooledEncoder(transformers.BertModel.from_pretrained(root / "base"))
        model = PooledClassifier(encoder, torch.nn.Linear(32, len(labels)), encoder.config)
        train = rows(task, 256, seed=seed)
        fine_tune(model, tokenizer, [r["input"] for r in train],
                  [labels.index(r["label"]) for r in train], steps=60)
        encoder.save_pretrained(tmp_path / f"{task}-backbone")
        save_file({k: v.contiguous() for k, v in model.head.state_dict().items()},
                  str(tmp_path / f"{task}-head.safetensors"))
        experts.append({"model": str(tmp_path / f"{task}-backbone"), "task": task,
                        "head": str(tmp_path / f"{task}-head.safetensors"),
                        "data": str(root / f"{task}.jsonl"), "labels": labels})
    recipe = tmp_path / "learn.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "supermerge", "base_model": str(root / "base"),
        "architecture": "pooled_encoder", "max_length": 8, "experts": experts,
        "parameters": {"steps": 6, "eval_every": 3, "select": "off"}}))
    run("learn", str(recipe), "-o", str(tmp_path / "learned"))
    colour = supermerge.load_task_model(tmp_path / "learned", "colour")
    assert isinstance(colour, PooledClassifier)
    assert colour.config.id2label == {0: "none", 1: "red", 2: "blue"}
    head = safetensors_load(tmp_path / "learned" / "heads" / "colour.safetensors")
    torch.testing.assert_close(colour.head.weight, head["weight"])
    report_json = tmp_path / "report.json"
    run("evaluate", str(tmp_path / "learned"), *data_args(root), "--json", str(report_json))
    report = json.loads(report_json.read_text())
    # each expert is its backbone folder with its head file, as trained
    assert report["experts"]["fruit"] > 0.8 and report["experts"]["colour"] > 0.8
    assert 0.0 <= report["per_task"]["colour"] <= 1.0

    experts[0]["head"] = None
    recipe.write_text(yaml.safe_dump({
        "merge_method": "supermerge", "base_model": str(root / "base"),
        "architecture": "pooled_encoder", "experts": experts}))
    result = CliRunner().invoke(cli, ["learn", str(recipe), "-o", str(tmp_path / "x")])
    assert result.exit_code == 1 and "no `head` file" in result.output


def safetensors_load(path):
    from safetensors.torch import load_file

    return load_file(str(path))
