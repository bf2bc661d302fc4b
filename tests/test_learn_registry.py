"""The learned-method registry: one description and one run signature for every method."""

from __future__ import annotations

import pytest
import torch

import supermerge.learn.method as method_module
from supermerge.errors import MethodError
from supermerge.learn import LEARNED_METHODS, get_learned_method
from supermerge.learn.method import LearnedMethod, closed_form_run
from supermerge.methods.registry import Params
from supermerge.recipes.learn import LearnRecipe

pytest.importorskip("transformers")


def test_every_learned_method_is_registered_and_found_by_name() -> None:
    assert [m.name for m in LEARNED_METHODS] == ["adamerging", "fisher", "regmean", "supermerge",
                                                 "surgery", "twin"]
    assert {m.name for m in LEARNED_METHODS if m.trains} == {"adamerging", "supermerge",
                                                              "surgery", "twin"}
    assert all(get_learned_method(m.name) is m for m in LEARNED_METHODS)
    with pytest.raises(MethodError, match="did you mean 'supermerge'"):
        get_learned_method("supermerg")


def test_a_new_learned_method_is_one_registration(tiny_bert_tasks, monkeypatch) -> None:
    """A method registered from its own module is found, validated and run like the
    built-in ones, and a learn recipe accepts its name; nothing else names it."""
    module, base, experts, heads, tasks = tiny_bert_tasks

    class MeanParams(Params):
        scale: float = 1.0

    def mean_merge(module, experts, tasks, *, head_prefix=None, heads=None, progress=None,
                   scale=1.0):
        names = [n for n, t in module.state_dict().items() if t.is_floating_point()]
        return {n: scale * sum(e[n] for e in experts.values()) / len(experts) for n in names}

    monkeypatch.setitem(method_module._REGISTRY, "toy_mean", LearnedMethod(
        name="toy_mean", summary="the plain mean", paper="-", needs="unlabelled",
        params=MeanParams, run=closed_form_run("toy_mean", mean_merge, MeanParams),
        trains=False))
    found = get_learned_method("toy_mean")
    outcome = found.run(module, experts, tasks, heads=heads, scale="1.0")  # typed by MeanParams
    name = next(n for n in outcome.state if n.endswith("layer.0.attention.self.query.weight"))
    torch.testing.assert_close(outcome.state[name], (experts["a"][name] + experts["b"][name]) / 2)
    assert outcome.merge is None and set(outcome.heads) == {"a", "b"}
    recipe = {"merge_method": "toy_mean", "base_model": "b",
              "experts": [{"model": "a", "data": "a.jsonl"}]}
    assert LearnRecipe.model_validate(recipe).method is found
    with pytest.raises(ValueError, match="unknown learned method 'toy_men'"):
        LearnRecipe.model_validate({**recipe, "merge_method": "toy_men"})


def test_trained_and_closed_form_outcomes_carry_the_merged_state(tiny_bert_tasks) -> None:
    module, base, experts, heads, tasks = tiny_bert_tasks
    trained = get_learned_method("supermerge").run(module, experts, tasks, heads=heads,
                                                   steps=2, select="off")
    assert trained.merge is not None and trained.peak_rss >= 0
    merged = trained.merge.model.merged_state_dict()
    assert all(torch.equal(trained.state[n], merged[n]) for n in merged)
    closed = get_learned_method("regmean").run(module, experts, tasks, heads=heads, examples=4)
    with pytest.raises(MethodError, match="invalid parameters for method 'regmean'"):
        get_learned_method("regmean").run(module, experts, tasks, heads=heads, alpha=2.0)
    assert closed.merge is None and set(closed.heads) == {"a", "b"}
    assert set(closed.state) == set(module.state_dict())
