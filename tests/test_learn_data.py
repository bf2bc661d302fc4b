"""Validation data and bad input: clear errors before any training step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from supermerge.errors import SupermergeError
from supermerge.learn import LearnError, Task, TaskData, load_task_data, supermerge
from test_learn_toys import (
    one_thread,  # noqa: F401  (autouse fixture)
    two_task_toy,
)


class CharTokenizer:
    """Hugging Face calling convention, one token per character (ord), right padding."""

    pad_token = "\0"

    def __call__(self, texts, *, padding=True, truncation=True, max_length=128,
                 return_tensors="pt"):
        ids = [[ord(c) for c in text][:max_length] for text in texts]
        if not padding:
            return {"input_ids": ids}
        width = max(map(len, ids))
        return {
            "input_ids": torch.tensor([row + [0] * (width - len(row)) for row in ids]),
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row))
                                            for row in ids]),
        }


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_numbers_and_csv_text_load(tmp_path: Path) -> None:
    data = load_task_data(_jsonl(tmp_path / "a.jsonl", [{"input": [1, 2], "label": 0},
                                                         {"input": [3, 4], "label": 2}]))
    torch.testing.assert_close(data.inputs, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert data.labels.tolist() == [0, 2] and len(data) == 2
    (tmp_path / "b.csv").write_text("text,sentiment\ngood,pos\nbad,neg\nfine,pos\n")
    data = load_task_data(tmp_path / "b.csv", tokenizer=CharTokenizer(), input_key="text",
                          label_key="sentiment", label_names=["neg", "pos"], limit=2)
    assert data.labels.tolist() == [1, 0]
    assert data.inputs["input_ids"].shape == (2, 4)
    assert data.call_args() == ((), data.inputs)


def test_causal_lm_data_scores_only_the_completion(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "lm.jsonl", [{"input": "ab", "label": "cd"},
                                          {"input": "x", "label": "y"}])
    data = load_task_data(path, kind="causal_lm", tokenizer=CharTokenizer())
    assert data.labels.tolist() == [[-100, -100, ord("c"), ord("d")],
                                    [-100, ord("y"), -100, -100]]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "validation file not found"),
        ("", "holds no examples"),
        ('{"input": [1], "label": 0}\n{"label": 1}\n', "example 2 has no 'input'"),
        ('{"input": [1], "label": 0}\n{"input": [2]}\n', "example 2 has no 'label'"),
        ('{"input": "some text", "label": 0}\n', "no tokenizer"),
        ('{"input": [1], "label": 0.5}\n', "not class indices"),
        ('{"input": [1], "label": 0}\nnot json\n', "line 2 is not a JSON object"),
        ('[1, 2]\n', "line 1 is not a JSON object"),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "val.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(LearnError, match=message) as caught:
        load_task_data(path)
    assert caught.value.file == str(path)
    assert isinstance(caught.value, SupermergeError)


def _run(toy, experts, tasks, calls: list) -> None:
    supermerge(toy.module, toy.base_state, experts, tasks, head_prefix="head.",
               progress=lambda *a: calls.append(a), steps=3)


def test_labels_outside_the_head_are_refused_before_training() -> None:
    toy = two_task_toy()
    calls: list = []
    bad = TaskData(toy.val["b"].inputs, torch.full((len(toy.val["b"]),), 3))
    with pytest.raises(LearnError, match=r"task 'b' has labels \[3\] outside its head's 3 classes"):
        _run(toy, toy.experts, [toy.tasks()[0], Task("b", bad)], calls)
    assert calls == []


def test_an_expert_without_a_head_for_its_task_is_refused_before_training() -> None:
    toy = two_task_toy()
    headless = {k: v for k, v in toy.experts["b"].items() if not k.startswith("head.")}
    calls: list = []
    with pytest.raises(LearnError, match="task 'b' has no head"):
        _run(toy, {"a": toy.experts["a"], "b": headless}, toy.tasks(), calls)
    assert calls == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: {k: v for k, v in s.items() if k != "body.2.bias"}, "lacks 1 tensor"),
        (lambda s: {**s, "body.9.weight": torch.zeros(2)}, "has 1 tensor.* the base lacks"),
        (lambda s: {**s, "body.0.weight": torch.zeros(24, 9)}, r"has shape \(24, 9\)"),
    ],
)
def test_mismatched_architectures_are_refused_before_training(change, message: str) -> None:
    toy = two_task_toy()
    calls: list = []
    experts = {"a": toy.experts["a"], "b": change(toy.experts["b"])}
    with pytest.raises(LearnError, match=message):
        _run(toy, experts, toy.tasks(), calls)
    assert calls == []


def test_inputs_and_labels_must_agree_in_length() -> None:
    with pytest.raises(LearnError, match="different numbers of examples"):
        TaskData(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))


def test_unlabelled_inputs_are_appended_and_left_out_of_the_labels(tmp_path) -> None:
    from helpers_words import word_tokenizer
    from supermerge.learn.data import IGNORE_INDEX, load_task_data

    tokenizer = word_tokenizer(tmp_path)
    (tmp_path / "val.jsonl").write_text('{"input": "red apple", "label": 1}\n'
                                        '{"input": "blue", "label": 0}\n')
    (tmp_path / "more.jsonl").write_text('{"input": "red red red apple"}\n')
    data = load_task_data(tmp_path / "val.jsonl", tokenizer=tokenizer,
                          unlabelled=tmp_path / "more.jsonl")
    assert data.labels.tolist() == [1, 0, IGNORE_INDEX]
    assert data.inputs["input_ids"].shape[0] == 3
    assert data.inputs["attention_mask"][2].sum() > data.inputs["attention_mask"][1].sum()
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    lm = load_task_data(tmp_path / "val.jsonl", kind="causal_lm", tokenizer=tokenizer,
                        unlabelled=tmp_path / "more.jsonl", label_key="none")
    mask = lm.inputs["attention_mask"]
    scored = lm.labels != IGNORE_INDEX
    assert torch.equal(scored, mask.bool())  # unlabelled text: every real token is scored
