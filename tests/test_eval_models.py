"""Experts, their cache, evaluate, the benchmark and its CLI on a tiny random BERT.

Everything here is built in the session: a 2-layer BERT with a 40-word vocabulary and two
synthetic tasks (which colour word / which animal word a text holds). Seconds, no network.
"""

from __future__ import annotations

import json
import logging
import random

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from supermerge import merge
from supermerge.engine import load_task_state
from supermerge.eval import (
    ExpertCache,
    ExpertConfig,
    SplitSizes,
    Task,
    TaskError,
    evaluate,
    get_experts,
)
from supermerge.eval.experts import expert_key, model_fingerprint
from supermerge.eval.model import load_encoder
from supermerge.methods import available_methods
from supermerge.run import BenchmarkConfig, run_benchmark

transformers = pytest.importorskip("transformers")

FILLER = [f"w{i}" for i in range(30)]
MARKERS = {"colour": ("red", "blue", "green"), "animal": ("cat", "dog")}
SIZES = SplitSizes(test=30, validation=12, train=72)
CONFIG = ExpertConfig(lr=3e-3, head_lr=3e-2, epochs=3, batch_size=12, max_length=12)


def synthetic_rows(name: str, n: int = 120, seed: int = 0) -> list[tuple[str, str]]:
    """n (text, label) pairs: random filler words with one marker word, its class."""
    rng = random.Random(f"{name}{seed}")
    rows = []
    for i in range(n):
        marker = MARKERS[name][i % len(MARKERS[name])]
        words = rng.sample(FILLER, 3)
        words.insert(rng.randrange(4), marker)
        rows.append((" ".join(words), marker))
    return rows


def synthetic_task(name: str, seed: int = 0) -> Task:
    names = tuple(sorted(MARKERS[name]))
    rows = synthetic_rows(name, seed=seed)
    return Task(name, tuple(t for t, _ in rows), tuple(names.index(y) for _, y in rows),
                names, sizes=SIZES)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A seeded random 2-layer BERT with its WordPiece tokenizer, as a model directory."""
    root = tmp_path_factory.mktemp("tiny-bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER,
             *(w for ws in MARKERS.values() for w in ws)]
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    assert tokenizer("w3 red")["input_ids"] == [2, 8, 35, 3]
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    transformers.BertModel(config).save_pretrained(root)
    tokenizer.save_pretrained(str(root))
    # like older checkpoints (all-MiniLM-L6-v2's), keep a buffer the module no longer saves
    weights = load_file(root / "model.safetensors")
    weights["embeddings.position_ids"] = torch.arange(16).unsqueeze(0)
    save_file(weights, root / "model.safetensors", metadata={"format": "pt"})
    return root


@pytest.fixture(scope="module")
def tasks():
    return [synthetic_task("colour"), synthetic_task("animal")]


@pytest.fixture(scope="module")
def built(tiny_base, tasks, tmp_path_factory):
    """The two experts, built once into a module-wide cache."""
    cache = ExpertCache(tmp_path_factory.mktemp("cache"))
    return cache, get_experts(tiny_base, tasks, config=CONFIG, cache=cache)


def test_experts_learn_and_score_one_on_their_own_task(built, tasks):
    _, experts = built
    for task in tasks:
        expert = experts[task.name]
        assert expert.score > 0.7, f"{task.name} expert only reached {expert.score}"
        assert not expert.cached
        assert expert.head_file.is_file() and (expert.path / "config.json").is_file()
        report = evaluate(expert.path, [task], experts=experts)
        assert report.scores[task.name].normalized == pytest.approx(1.0)
        assert report.normalized == pytest.approx(1.0)


def test_second_run_reuses_the_cache(built, tiny_base, tasks):
    cache, experts = built
    again = get_experts(tiny_base, tasks, config=CONFIG, cache=cache)
    assert all(e.cached for e in again.values())
    assert {n: e.path for n, e in again.items()} == {n: e.path for n, e in experts.items()}
    assert again["colour"].score == experts["colour"].score


def test_cache_key_changes_with_data_hyperparameters_and_base(tiny_base, tasks):
    base = model_fingerprint(tiny_base)
    key = expert_key(base, tasks[0], CONFIG)
    assert key == expert_key(base, synthetic_task("colour"), CONFIG)
    assert key != expert_key(base, synthetic_task("colour", seed=1), CONFIG)
    assert key != expert_key(base, tasks[0].with_sizes(SplitSizes(train=10)), CONFIG)
    assert key != expert_key(base, tasks[0], ExpertConfig(**{**vars(CONFIG), "lr": 1e-4}))
    assert key != expert_key("another base", tasks[0], CONFIG)


@pytest.mark.parametrize("damage", ["flip a weight byte", "drop the manifest"])
def test_a_corrupted_cache_entry_is_rebuilt(built, tiny_base, tasks, damage, caplog):
    cache, experts = built
    entry = experts["animal"].path
    if damage == "drop the manifest":
        (entry / "manifest.json").unlink()
    else:
        weights = entry / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="supermerge.eval"):
        rebuilt = get_experts(tiny_base, tasks, config=CONFIG, cache=cache)
    assert "corrupt" in caplog.text
    assert not rebuilt["animal"].cached and rebuilt["colour"].cached
    assert rebuilt["animal"].score == experts["animal"].score  # seeded: the same expert
    assert get_experts(tiny_base, tasks, config=CONFIG, cache=cache)["animal"].cached


def test_evaluate_needs_a_head_of_the_right_size(built, tiny_base, tasks):
    _, experts = built
    with pytest.raises(TaskError, match="no head"):
        evaluate(tiny_base, tasks[:1])
    wrong = {"colour": torch.nn.Linear(32, 5)}
    with pytest.raises(TaskError, match="5 classes"):
        evaluate(tiny_base, tasks[:1], experts=experts, heads=wrong)


def test_a_per_task_merge_answers_each_task_with_its_own_model(built, tiny_base, tasks,
                                                               tmp_path):
    _, experts = built
    method = next((m for m in available_methods() if m.needs == "task id"), None)
    if method is None:
        pytest.skip("no method that needs task ids is registered")
    out = tmp_path / method.name
    merge({"merge_method": method.name, "base_model": str(tiny_base),
           "models": [{"model": str(experts[t.name].path)} for t in tasks]}, out)
    report = evaluate(out, tasks, experts=experts)
    shared = load_encoder(out)
    for index, task in enumerate(tasks):
        own = load_encoder(out)
        own.load_weights(load_task_state(out, index))
        alone = evaluate(own, [task], experts=experts)
        assert report.scores[task.name].score == alone.scores[task.name].score
    assert any(not torch.equal(a, b) for a, b in zip(own.state_dict().values(),
                                                      shared.state_dict().values(), strict=True))


def test_parallel_build_matches_serial(built, tiny_base, tmp_path):
    _, experts = built
    task = synthetic_task("animal")
    steps = []
    parallel = get_experts(tiny_base, [task, synthetic_task("colour")], config=CONFIG,
                           cache=ExpertCache(tmp_path), workers=2,
                           progress=lambda *event: steps.append(event))
    assert parallel["animal"].score == experts["animal"].score
    assert ("train animal", 18, 18) in steps and ("train colour", 18, 18) in steps


def runnable(k: int) -> tuple[set[str], set[str]]:
    """(registry methods a benchmark of k experts runs, those it lists as not run)."""
    ok = {m.name for m in available_methods() if m.needs in ("none", "task id")
          and m.min_models <= k and (m.max_models is None or k <= m.max_models)}
    return ok, {m.name for m in available_methods()} - ok


def test_benchmark_smoke(built, tiny_base, tasks, tmp_path):
    cache, experts = built
    config = BenchmarkConfig(expert=CONFIG, lambdas=(0.5, 1.0), learned_steps=2,
                             hierarchical=True, workers=1)
    results = run_benchmark(tasks, tmp_path / "demo", base=tiny_base, cache=cache,
                            config=config, command="pytest")
    on_disk = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["tasks"] == ["colour", "animal"]
    assert on_disk["experts"] == {n: e.score for n, e in experts.items()}
    run, not_run = runnable(2)
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "slerp"} <= run
    assert set(on_disk["methods"]) == run | {"adamerging", "fisher", "regmean", "supermerge",
                                             "supermerge_paper", "supermerge_hierarchical",
                                             "twin", "surgery", "supermerge_surgery"}
    assert set(on_disk["not_run"]) == not_run and "passthrough" in not_run
    for name, row in on_disk["methods"].items():
        assert set(row["per_task"]) == {"colour", "animal"}, name
        assert 0 <= row["average"] <= 1 and row["normalized"] > 0, name
        assert row["seconds"] > 0 and row["needs"] in ("none", "task id", "unlabelled", "labelled")
    assert on_disk["methods"]["task_arithmetic"]["params"]["lambda"] in (0.5, 1.0)
    assert on_disk["methods"]["supermerge"]["needs"] == "unlabelled"  # distills the experts
    assert on_disk["methods"]["supermerge_paper"]["needs"] == "labelled"
    assert on_disk["methods"]["supermerge_paper"]["non_default"]["objective"] == ["labels",
                                                                                "distill"]
    assert on_disk["methods"]["adamerging"]["needs"] == "unlabelled"
    assert on_disk["methods"]["fisher"]["needs"] == on_disk["methods"]["regmean"]["needs"]
    assert on_disk["methods"]["regmean"]["peak_rss_mib"] >= 0
    assert on_disk["methods"]["twin"]["needs"] == "unlabelled"  # routed: scored from disk
    assert on_disk["methods"]["surgery"]["needs"] == "unlabelled"
    assert on_disk["methods"]["supermerge"]["non_default"] == {"steps": [2, 40]}
    markdown = (tmp_path / "demo" / "results.md").read_text()
    assert "supermerge ran with steps 2 (default 40)." in markdown
    assert "supermerge_surgery then ran Representation Surgery" in markdown
    assert "| ties (lambda " in markdown and "Not run: passthrough" in markdown
    assert (tmp_path / "demo" / "accuracy.png").stat().st_size > 1000
    assert not (tmp_path / "demo" / ".work").exists()


def _write_jsonl(path, name):
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                            for t, y in synthetic_rows(name, n=60)))
    return path


def test_cli_demo_and_evaluate(built, tiny_base, tmp_path):
    from supermerge.cli.bench import register

    cache, experts = built
    group = click.Group("supermerge")
    group.add_command(click.Command("demo", callback=lambda: None))
    register(group)
    assert {"demo", "bench", "evaluate"} <= set(group.commands)
    colour = _write_jsonl(tmp_path / "colour.jsonl", "colour")
    animal = _write_jsonl(tmp_path / "animal.jsonl", "animal")
    runner = CliRunner()
    common = ["--tasks", f"{colour},{animal}", "--base", str(tiny_base), "--cache",
              str(tmp_path / "cache"), "--workers", "1"]
    result = runner.invoke(group, ["demo", *common, "--out", str(tmp_path / "out"),
                                   "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert "task_arithmetic" in result.output and "results.json" in result.output
    expert_dir = next((tmp_path / "cache" / "experts").glob("colour-*"))
    result = runner.invoke(group, ["evaluate", str(expert_dir), *common,
                                   "--json", str(tmp_path / "eval.json"),
                                   "--markdown", str(tmp_path / "eval.md")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["normalized"] == pytest.approx(1.0)  # the expert on its own task
    assert "| colour |" in (tmp_path / "eval.md").read_text()
    result = runner.invoke(group, ["evaluate", str(expert_dir), "--tasks",
                                   str(tmp_path / "missing.jsonl"), "--base", str(tiny_base)])
    assert result.exit_code == 1 and "not found" in result.output


def test_methods_the_library_lacks_are_listed_as_not_run(monkeypatch):
    from supermerge.run import bench

    monkeypatch.setattr(bench, "_learn_missing", lambda: "not in the library yet")
    plan = bench._plan(4, BenchmarkConfig(hierarchical=True))
    assert plan["supermerge"] == plan["supermerge_hierarchical"] == "not in the library yet"
    assert plan["slerp"] == "merges exactly 2 model(s), the benchmark has 4"
    assert plan["task_arithmetic"] is None
    assert "supermerge_hierarchical" not in bench._plan(4, BenchmarkConfig())


def test_benchmark_runs_only_the_methods_named_and_keeps_their_models(built, tiny_base, tasks,
                                                                      tmp_path):
    from supermerge.errors import InputValueError

    cache, _ = built
    config = BenchmarkConfig(expert=CONFIG, lambdas=(1.0,), workers=1, keep_models=True,
                             methods=("regmean", "fisher", "linear"))
    results = run_benchmark(tasks, tmp_path / "demo", base=tiny_base, cache=cache,
                            config=config)
    assert set(results["methods"]) == {"linear", "fisher", "regmean"} and not results["not_run"]
    models = tmp_path / "demo" / "models"
    for name in ("fisher", "regmean"):
        assert (models / name / "heads" / "colour.safetensors").exists()
        kept = evaluate(models / name, tasks, experts=built[1])  # heads from the experts
        assert kept.average == pytest.approx(results["methods"][name]["average"])
    with pytest.raises(InputValueError, match="(?s)'fisherr'.*choose among.*regmean"):
        run_benchmark(tasks, tmp_path / "x", base=tiny_base, cache=cache,
                      config=BenchmarkConfig(expert=CONFIG, methods=("fisherr",)))
    assert not (tmp_path / "x").exists()  # refused before any work
