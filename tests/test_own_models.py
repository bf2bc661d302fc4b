"""A user's own models: experts whose names carry a prefix the base lacks, task heads of
different shapes kept out of a data-free merge, and each task's model loaded ready to use."""

from __future__ import annotations

import logging

import pytest
import torch

import supermerge
from supermerge.errors import PlanError

transformers = pytest.importorskip("transformers")


def _config(**extra):
    return transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=32,
                                   max_position_embeddings=16, **extra)


@pytest.fixture(scope="module")
def own_models(tmp_path_factory):
    """A BertModel base and two BertForSequenceClassification experts (2 and 3 classes,
    named labels) whose backbones are the base plus seeded task vectors."""
    root = tmp_path_factory.mktemp("own")
    torch.manual_seed(0)
    base = transformers.BertModel(_config())
    base.save_pretrained(root / "base")
    experts = {}
    for seed, (task, labels) in enumerate({"spam": ["ham", "spam"],
                                           "topic": ["sport", "news", "art"]}.items()):
        torch.manual_seed(10 + seed)
        config = _config(num_labels=len(labels), id2label=dict(enumerate(labels)),
                         label2id={n: i for i, n in enumerate(labels)})
        expert = transformers.BertForSequenceClassification(config)
        expert.bert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for parameter in expert.bert.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        expert.save_pretrained(root / task)
        experts[task] = {n: t.clone() for n, t in expert.state_dict().items()}
    return root, {n: t.clone() for n, t in base.state_dict().items()}, experts


def _recipe(root, **extra):
    return {"merge_method": "task_arithmetic", "base_model": str(root / "base"),
            "models": [{"model": str(root / "spam")}, {"model": str(root / "topic")}],
            "parameters": {"lambda": 0.5}, **extra}


def test_prefixed_experts_merge_with_heads_and_load_as_task_models(own_models, tmp_path,
                                                                   caplog):
    root, base, experts = own_models
    out = tmp_path / "merged"
    with caplog.at_level(logging.INFO, logger="supermerge"):
        supermerge.merge(_recipe(root, heads="classifier."), out)
    assert "start with 'bert.' where the reference's start with ''" in caplog.text
    with supermerge_checkpoint(out) as merged:
        names = set(merged.names())
        assert not any(n.startswith(("bert.", "classifier.")) for n in names)  # the base's
        for name in names:  # oracle: base + 0.5 * sum of task vectors
            expected = base[name] + 0.5 * sum(e[f"bert.{name}"] - base[name]
                                              for e in experts.values())
            torch.testing.assert_close(merged.read(name), expected)
    card = (out / "README.md").read_text()
    assert "load_task_model" in card and "`topic`" in card
    for index, (task, state) in enumerate(experts.items()):
        for model in (supermerge.load_task_model(out, task), supermerge.load_task_model(
                out, index)):
            assert isinstance(model, transformers.BertForSequenceClassification)
            assert model.config.id2label == state_labels(root / task)
            own = model.state_dict()
            torch.testing.assert_close(own["classifier.weight"], state["classifier.weight"])
            torch.testing.assert_close(
                own["bert.encoder.layer.0.attention.self.query.weight"],
                base["encoder.layer.0.attention.self.query.weight"] + 0.5 * sum(
                    e["bert.encoder.layer.0.attention.self.query.weight"]
                    - base["encoder.layer.0.attention.self.query.weight"]
                    for e in experts.values()))
            logits = model(input_ids=torch.tensor([[2, 5, 7, 3]])).logits
            assert logits.shape == (1, model.config.num_labels)


def supermerge_checkpoint(path):
    from supermerge.io import open_checkpoint

    return open_checkpoint(path)


def state_labels(folder):
    return transformers.AutoConfig.from_pretrained(folder).id2label


def test_an_explicit_prefix_maps_names_and_a_wrong_one_is_refused_as_one_problem(
        own_models, tmp_path):
    root, base, experts = own_models
    recipe = _recipe(root, heads=["classifier."])
    for model in recipe["models"]:
        model["prefix"] = "bert."  # the shorthand of {"bert.": ""}
    supermerge.merge(recipe, tmp_path / "explicit")
    for model in recipe["models"]:
        model["prefix"] = {"roberta.": ""}
    with pytest.raises(PlanError) as caught:
        supermerge.merge(recipe, tmp_path / "wrong")
    problems = caught.value.problems
    assert len(problems) == 2  # one per expert, not one per tensor
    assert "prefix" in problems[0].fix and "on_missing" not in problems[0].fix
    assert not (tmp_path / "wrong").exists()


def test_most_tensors_missing_is_one_problem_even_with_on_missing_base(own_models, tmp_path):
    root, _base, _experts = own_models
    spam = transformers.BertForSequenceClassification.from_pretrained(root / "spam")
    renamed = {n.replace("bert.", "").replace(".", "_"): t  # no prefix explains these
               for n, t in spam.state_dict().items()}
    from safetensors.torch import save_file

    save_file({n: t.contiguous() for n, t in renamed.items()}, str(tmp_path / "odd.safetensors"))
    recipe = _recipe(root, on_missing="base")
    recipe["models"] = [{"model": str(tmp_path / "odd.safetensors")}]
    with pytest.raises(PlanError) as caught:
        supermerge.merge(recipe, tmp_path / "out")
    (problem,) = caught.value.problems
    assert "are missing in this model" in problem.message
    assert "embeddings_LayerNorm" in problem.message
    assert "on_missing" not in problem.fix


def test_heads_that_match_nothing_and_shared_task_names_are_refused(own_models, tmp_path):
    root, _base, _experts = own_models
    with pytest.raises(PlanError, match="would have no head"):
        supermerge.merge(_recipe(root, heads="head."), tmp_path / "a")
    recipe = _recipe(root, heads="classifier.")
    for model in recipe["models"]:
        model["task"] = "same"
    with pytest.raises(PlanError, match="share the task name 'same'"):
        supermerge.merge(recipe, tmp_path / "b")


def test_a_base_with_a_head_gets_the_first_tasks_head_and_config(own_models, tmp_path):
    root, _base, experts = own_models
    recipe = _recipe(root, heads="classifier.")
    recipe["base_model"] = str(root / "topic")  # a classifier base: its head is replaced
    recipe["models"] = [{"model": str(root / "spam")}]
    out = tmp_path / "merged"
    supermerge.merge(recipe, out)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "ham", 1: "spam"}
    torch.testing.assert_close(model.classifier.weight, experts["spam"]["classifier.weight"])
