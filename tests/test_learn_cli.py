"""`supermerge learn`: a learned merge of tiny BERT classifiers from a YAML recipe."""

from __future__ import annotations

import json
import random

import pytest
import safetensors.torch
import torch
import yaml
from click.testing import CliRunner

import supermerge
from helpers_words import VOCAB_SIZE, WORDS, fine_tune, word_tokenizer
from supermerge.cli.main import cli

transformers = pytest.importorskip("transformers")



def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(5))


def examples(keyword: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = [{"input": sentence(rng)} for _ in range(n)]
    for row in rows:
        row["label"] = "yes" if keyword in row["input"].split() else "no"
    return rows


def tiny_classifier(seed: int):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB_SIZE, hidden_size=16,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16,
                                     num_labels=2)
    return transformers.BertForSequenceClassification(config)


@pytest.fixture(scope="module")
def learn_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("learn")
    tokenizer = word_tokenizer(root)
    base = tiny_classifier(0)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    experts = []
    for i, keyword in enumerate(["apple", "red"]):
        model = tiny_classifier(0)
        rows = examples(keyword, 256, seed=i)
        fine_tune(model, tokenizer, [r["input"] for r in rows],
                  [int(r["label"] == "yes") for r in rows], steps=40)
        model.save_pretrained(root / keyword)
        (root / f"{keyword}.jsonl").write_text(
            "\n".join(json.dumps(r) for r in examples(keyword, 32, seed=100 + i)))
        experts.append({"model": keyword, "data": f"{keyword}.jsonl", "labels": ["no", "yes"]})
    recipe = {"merge_method": "supermerge", "base_model": "base", "head_prefix": "classifier.",
              "max_length": 8, "experts": experts,
              "parameters": {"steps": 12, "eval_every": 4, "batch_size": 8}}
    return root, recipe


def write(root, recipe) -> str:
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_learn_exports_a_model_with_its_coefficients_and_heads(learn_setup, tmp_path):
    root, recipe = learn_setup
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["learn", write(root, recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "held-out loss" in result.output
    for name in ["coefficients.json", "coefficients.csv", "coefficients.safetensors",
                 "coefficients.png", "heads/apple.safetensors", "heads/red.safetensors",
                 "supermerge_recipe.yaml", "README.md"]:
        assert (out / name).exists(), name
    coefficients = json.loads((out / "coefficients.json").read_text())
    assert "apple" in json.dumps(coefficients) and "bert.encoder.layer.0" in json.dumps(
        coefficients)
    model = transformers.BertForSequenceClassification.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[2, 5, 6, 3]])).logits).all()
    heads = {task: safetensors.torch.load_file(out / f"heads/{task}.safetensors")
             for task in ("apple", "red")}
    # the exported model carries the first task's head, never a newly initialised one
    torch.testing.assert_close(model.classifier.weight, heads["apple"]["classifier.weight"])
    red = supermerge.load_task_model(out, "red")
    torch.testing.assert_close(red.classifier.weight, heads["red"]["classifier.weight"])
    torch.testing.assert_close(red.bert.pooler.dense.weight, model.bert.pooler.dense.weight)
    assert json.loads((out / "heads/red.json").read_text())["index"] == 1


def test_learn_refuses_bad_input_before_training(learn_setup, tmp_path):
    root, recipe = learn_setup
    runner = CliRunner()
    missing = {**recipe, "experts": [{**recipe["experts"][0], "data": "nowhere.jsonl"},
                                     recipe["experts"][1]]}
    result = runner.invoke(cli, ["learn", write(root, missing), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "nowhere.jsonl" in result.output
    wrong_labels = {**recipe, "experts": [{**recipe["experts"][0], "labels": ["a", "b"]},
                                          recipe["experts"][1]]}
    result = runner.invoke(cli, ["learn", write(root, wrong_labels), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "yes" in result.output
    bad_param = {**recipe, "parameters": {"stepz": 3}}
    result = runner.invoke(cli, ["learn", write(root, bad_param), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "stepz" in result.output
    assert not (tmp_path / "o").exists()


def test_a_failed_export_leaves_no_model_without_its_heads(learn_setup, tmp_path, monkeypatch):
    import supermerge.learn.export as export

    root, recipe = learn_setup

    def broken(fits):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "plot_coefficients", broken)
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["learn", write(root, recipe), "-o", str(out)])
    assert result.exit_code != 0
    assert not out.exists() and not list(tmp_path.glob(".merged*"))


def _expert_states(root):
    from supermerge.io import open_checkpoint
    from supermerge.learn import CheckpointState

    return {k: CheckpointState(open_checkpoint(root / k)) for k in ("apple", "red")}


def test_learn_regmean_exports_the_python_merge_with_each_experts_head(learn_setup, tmp_path):
    from safetensors.torch import load_file

    from supermerge.learn import Task, load_task_data, regmean_merge

    root, recipe = learn_setup
    regmean = {**recipe, "merge_method": "regmean", "parameters": {"alpha": 0.5},
               "examples": 16}
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["learn", write(root, regmean), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "regmean merge ->" in result.output
    assert (out / "heads/apple.safetensors").exists() and not (out / "coefficients.json").exists()
    # the same merge from Python, on the same 16 examples per task
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "base")
    tasks = [Task(k, load_task_data(root / f"{k}.jsonl", tokenizer=tokenizer, max_length=8,
                                    label_names=["no", "yes"], limit=16))
             for k in ("apple", "red")]
    module = transformers.BertForSequenceClassification.from_pretrained(root / "base")
    expected = regmean_merge(module, _expert_states(root), tasks, head_prefix="classifier.",
                             alpha=0.5)
    model = transformers.BertForSequenceClassification.from_pretrained(out)
    state = model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor)
    head = load_file(out / "heads/red.safetensors")
    red = transformers.BertForSequenceClassification.from_pretrained(root / "red")
    torch.testing.assert_close(head["classifier.weight"], red.classifier.weight.detach())


def test_learn_fisher_follows_expert_weights_and_reports_progress(learn_setup, tmp_path):
    from supermerge.recipes.learn import run_learn_recipe

    root, recipe = learn_setup
    experts = [{**recipe["experts"][0], "weight": 1e9}, recipe["experts"][1]]
    fisher = {**recipe, "merge_method": "fisher", "experts": experts, "examples": 8,
              "parameters": {"seed": 1}}
    seen = []
    outcome = run_learn_recipe(write(root, fisher), tmp_path / "merged",
                               progress=lambda *step: seen.append(step))
    assert outcome.merge is None and outcome.method == "fisher"
    assert seen[-1] == ("statistics", 16, 16)  # 8 examples for each of the two experts
    merged = transformers.BertForSequenceClassification.from_pretrained(outcome.out)
    apple = transformers.BertForSequenceClassification.from_pretrained(root / "apple")
    for name, tensor in apple.bert.state_dict().items():  # weight 1e9: apple's tensors
        torch.testing.assert_close(merged.bert.state_dict()[name], tensor, rtol=1e-4,
                                   atol=1e-5)


def test_learn_refuses_weights_outside_fisher_and_merge_refuses_data_methods(learn_setup,
                                                                             tmp_path):
    root, recipe = learn_setup
    weighted = {**recipe, "experts": [{**recipe["experts"][0], "weight": 2.0},
                                      recipe["experts"][1]]}
    result = CliRunner().invoke(cli, ["learn", write(root, weighted), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "only fisher" in result.output
    merge_recipe = root / "merge.yaml"
    merge_recipe.write_text(yaml.safe_dump({"merge_method": "regmean", "base_model": "base",
                                            "models": [{"model": "apple"}, {"model": "red"}]}))
    result = CliRunner().invoke(cli, ["merge", str(merge_recipe), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "supermerge learn" in result.output
    assert not (tmp_path / "o").exists()


def _parallel_learn_worker(rank: int, world: int, port: int, recipe: str, out: str) -> None:
    import os

    # The test process hosts the store (as torchrun's agent does): no rank binds a port.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    result = CliRunner().invoke(cli, ["learn", recipe, "-o", out, "--data-parallel"])
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump({"exit_code": result.exit_code, "output": result.output}, f)


def test_learn_data_parallel_over_two_processes_matches_one(learn_setup, tmp_path):
    import torch.multiprocessing as mp
    from torch.distributed import TCPStore

    root, recipe = learn_setup
    path = write(root, recipe)
    # Port 0: the OS picks a free port and the store keeps it bound (no pick-then-bind race).
    store = TCPStore("127.0.0.1", 0, world_size=2, is_master=True, wait_for_workers=False)
    out = tmp_path / "parallel"
    mp.spawn(_parallel_learn_worker, args=(2, store.port, path, str(out)), nprocs=2)
    del store
    ranks = [json.loads((tmp_path / f"parallel.rank{r}.json").read_text()) for r in range(2)]
    assert [r["exit_code"] for r in ranks] == [0, 0], ranks
    assert "supermerge merge ->" in ranks[0]["output"]
    assert "merge ->" not in ranks[1]["output"] and "Loading" not in ranks[1]["output"]
    single = tmp_path / "single"
    assert CliRunner().invoke(cli, ["learn", path, "-o", str(single)]).exit_code == 0
    learned = [json.loads((d / "coefficients.json").read_text())["nodes"]["root"]
               for d in (out, single)]
    torch.testing.assert_close(torch.tensor(learned[0]["coefficients"]),
                               torch.tensor(learned[1]["coefficients"]), rtol=1e-4, atol=1e-5)
    fisher = {**recipe, "merge_method": "fisher", "parameters": {}}
    from supermerge.errors import RecipeError
    from supermerge.recipes.learn import run_learn_recipe

    with pytest.raises(RecipeError, match="no data-parallel mode"):
        run_learn_recipe(write(root, fisher), tmp_path / "f", parallel=object())


# --- issue 10: hostile or mistaken learn recipes, refused before any work ----------------


@pytest.mark.parametrize("name", ["../escape", "heads/apple", "..", "a\\b"])
def test_learn_refuses_a_task_name_that_is_a_path_at_load(learn_setup, tmp_path, monkeypatch,
                                                         name):
    root, recipe = learn_setup
    bad = {**recipe, "experts": [{**recipe["experts"][0], "task": name}, recipe["experts"][1]]}

    def no_model_opened(path):
        raise AssertionError(f"{path} opened before the recipe was refused")

    monkeypatch.setattr("supermerge.recipes.learn.open_checkpoint", no_model_opened)
    result = CliRunner().invoke(cli, ["learn", write(root, bad), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "cannot name a file" in result.output, result.output
    assert repr(name) in result.output and not (tmp_path / "o").exists()


def test_learn_refuses_a_head_prefix_that_matches_no_tensor(learn_setup, tmp_path,
                                                            monkeypatch):
    root, recipe = learn_setup

    def no_data_read(*args, **kwargs):
        raise AssertionError("data read before the head prefix was checked")

    monkeypatch.setattr("supermerge.recipes.learn.load_task_data", no_data_read)
    typo = {**recipe, "head_prefix": "classifer."}
    result = CliRunner().invoke(cli, ["learn", write(root, typo), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1, result.output
    assert "'classifer.'" in result.output and "'apple', 'red'" in result.output
    assert "classifier.weight" in result.output and "bert." in result.output
    assert not (tmp_path / "o").exists()


def test_fisher_and_regmean_take_label_names_without_a_labels_list(learn_setup, tmp_path):
    """They read only the inputs: labels written as names need no `labels:` list; the
    labelled method still asks for it."""
    root, recipe = learn_setup
    experts = [{k: v for k, v in e.items() if k != "labels"} for e in recipe["experts"]]
    for method in ("fisher", "regmean"):
        closed = {**recipe, "merge_method": method, "experts": experts, "examples": 4,
                  "parameters": {}}
        out = tmp_path / method
        result = CliRunner().invoke(cli, ["learn", write(root, closed), "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert (out / "heads/apple.safetensors").exists()
    labelled = {**recipe, "experts": experts}
    result = CliRunner().invoke(cli, ["learn", write(root, labelled), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "label_names" in result.output


def test_learn_refuses_a_pickled_base_that_holds_code(learn_setup, tmp_path):
    import shutil

    from helpers_io import RunsCode

    root, recipe = learn_setup
    base = tmp_path / "base"
    shutil.copytree(root / "base", base)
    (base / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(1), "x": RunsCode(marker)}, base / "pytorch_model.bin")
    hostile = {**recipe, "base_model": str(base)}
    result = CliRunner().invoke(cli, ["learn", write(root, hostile), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1, result.output
    assert "holds Python code" in result.output and "pytorch_model.bin" in result.output
    assert "Traceback" not in result.output and not marker.exists()
    assert not (tmp_path / "o").exists()


def test_the_same_expert_listed_twice_is_warned(learn_setup, caplog):
    import logging

    from supermerge.recipes.learn import load_learn_recipe

    root, recipe = learn_setup
    first = recipe["experts"][0]
    twice = {**recipe, "experts": [first, {**first, "model": f"./{first['model']}",
                                           "task": "apple-again"}]}
    with caplog.at_level(logging.WARNING, logger="supermerge"):
        load_learn_recipe(write(root, twice))
    assert "listed 2 times under `experts`" in caplog.text


def test_distill_learns_from_unlabelled_inputs_and_labels_refuses_them(learn_setup, tmp_path):
    root, recipe = learn_setup
    (root / "more.jsonl").write_text("\n".join(
        json.dumps({"input": r["input"]}) for r in examples("apple", 16, seed=7)))
    experts = [{**e, "unlabelled": "more.jsonl"} for e in recipe["experts"]]
    labels_only = {**recipe, "experts": experts,
                   "parameters": {**recipe["parameters"], "objective": "labels"}}
    result = CliRunner().invoke(cli, ["learn", write(root, labels_only), "-o", str(tmp_path / "a")])
    assert result.exit_code == 1 and "labels objective cannot use" in result.output
    assert not (tmp_path / "a").exists()
    distill = {**labels_only, "parameters": {**recipe["parameters"], "objective": "labels+distill",
                                             "basis": "tsv"}}
    out = tmp_path / "b"
    result = CliRunner().invoke(cli, ["learn", write(root, distill), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "heads" / "apple.safetensors").is_file()


def test_learn_takes_lora_adapter_experts_with_their_saved_heads(learn_setup, tmp_path):
    """Adapter folders as experts: each reads as the base + its LoRA update, and its head is
    the classifier it saves whole (modules_to_save)."""
    from safetensors.torch import load_file

    from helpers_lora import write_adapter

    root, recipe = learn_setup
    experts = []
    for i, keyword in enumerate(["apple", "red"]):
        trained = load_file(root / keyword / "model.safetensors")
        gen = torch.Generator().manual_seed(i)
        tensors = {f"bert.encoder.layer.{j}.attention.self.query.{part}": torch.randn(
            shape, generator=gen) * 0.1 for j in range(2)
            for part, shape in (("lora_A.weight", (2, 16)), ("lora_B.weight", (16, 2)))}
        tensors.update({f"classifier.modules_to_save.default.{p}": trained[f"classifier.{p}"]
                        for p in ("weight", "bias")})
        write_adapter(tmp_path / f"{keyword}-lora", tensors, r=2, alpha=2,
                      modules_to_save=["classifier"])
        # the second spelled BASE+ADAPTER, the adapter relative to the recipe's folder
        model = str(tmp_path / f"{keyword}-lora") if i == 0 else f"{root / 'base'}+red-lora"
        experts.append({**recipe["experts"][i], "model": model, "task": keyword,
                        "data": str(root / f"{keyword}.jsonl")})
    adapters = {**recipe, "base_model": str(root / "base"), "experts": experts,
                "parameters": {"steps": 4, "eval_every": 2, "batch_size": 8}}
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["learn", write(tmp_path, adapters), "-o", str(out)])
    assert result.exit_code == 0, result.output
    head = load_file(out / "heads" / "apple.safetensors")
    assert torch.equal(next(v for k, v in head.items() if k.endswith("classifier.weight")),
                       load_file(root / "apple" / "model.safetensors")["classifier.weight"])
    model = transformers.BertForSequenceClassification.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[2, 5, 6, 3]])).logits).all()
