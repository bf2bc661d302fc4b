"""Layer-wise fitting (ProDistill's schedule): one block at a time on cached inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from supermerge.errors import MethodError
from supermerge.learn import LearnError, MergedModel, Task, TaskData
from supermerge.learn.distill import attach_teachers, captured_blocks, named_blocks
from supermerge.learn.layerwise import block_inputs, learn_layerwise
from supermerge.learn.merge import supermerge

pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def taught(tiny_bert_tasks, experts=None):
    module, base, all_experts, heads, tasks = tiny_bert_tasks
    experts = experts or all_experts
    names = [n for n in base if base[n].is_floating_point()]
    chosen = [t for t in tasks if t.name in experts]
    return attach_teachers(module, experts, names, heads, chosen)


def test_a_block_replayed_on_its_captured_inputs_gives_the_full_pass_state(tiny_bert_tasks) -> None:
    module, base, experts, heads, tasks = tiny_bert_tasks
    model = MergedModel.from_experts(module, base, experts, heads=heads)
    weights = model.merged_parameters()
    with torch.no_grad(), captured_blocks(module) as states:
        model(**tasks[0].data.inputs, task="a", weights=weights)
    for position, (prefix, block) in enumerate(named_blocks(module)):
        captured = block_inputs(model, tasks[0], tasks[0].data, block, weights)
        args, kwargs = captured.args, captured.kwargs
        local = {n[len(prefix) + 1:]: t for n, t in weights.items() if n.startswith(prefix + ".")}
        with torch.no_grad():
            output = functional_call(block, local, args, kwargs)
        replayed = output[0] if isinstance(output, tuple) else output
        torch.testing.assert_close(replayed, states[position], rtol=0, atol=0)


def test_one_expert_fitted_block_by_block_moves_toward_itself(tiny_bert_tasks) -> None:
    """One expert that differs from the base in its blocks' matrices only: each block's
    inputs are then the expert's and its states are reached at coefficient 1, so every
    matrix's coefficient rises from its start; the tensors outside blocks stay put."""
    module, base, experts, heads, tasks = tiny_bert_tasks
    expert = {k: experts["a"][k] if ".layer." in k and v.dim() == 2 else v
              for k, v in base.items()}
    model = MergedModel.from_experts(module, base, {"a": expert}, heads={"a": heads["a"]})
    start = model.coefficients().detach().clone()
    fit = learn_layerwise(model, taught(tiny_bert_tasks, {"a": expert}), steps=40, lr=0.1,
                          eval_every=5)
    matrices = model.groups_of([n for n in model.names if ".layer." in n and base[n].dim() == 2])
    outside = model.groups_of([n for n in model.names if ".layer." not in n])
    after = model.coefficients().detach()
    assert after[:, matrices].median() > 0.9, after[:, matrices]
    torch.testing.assert_close(after[:, outside], start[:, outside])
    assert fit.heldout_loss < 0.5 * fit.history[0].heldout_loss
    assert fit.best_step == 40 * 2 and fit.objective == "distill"


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_layerwise_supermerge_lowers_the_held_out_loss_and_repeats(tiny_bert_tasks,
                                                                   granularity) -> None:
    module, base, experts, heads, tasks = tiny_bert_tasks
    runs = [supermerge(module, base, experts, tasks, heads=heads, layerwise=True, steps=10,
                       eval_every=5, granularity=granularity, basis="task_vectors")
            for _ in range(2)]
    fit = runs[0].fits["root"]
    assert fit.heldout_loss < fit.history[0].heldout_loss
    torch.testing.assert_close(runs[0].fits["root"].raw, runs[1].fits["root"].raw)


def test_progress_counts_every_block_step(tiny_bert_tasks) -> None:
    module, base, experts, heads, tasks = tiny_bert_tasks
    calls = []
    supermerge(module, base, experts, tasks, heads=heads, layerwise=True, steps=3,
               select="off", progress=lambda *a: calls.append(a[:3]))
    assert calls == [("learn", step, 6) for step in range(1, 7)]


def test_layerwise_refuses_what_it_cannot_fit(tiny_bert_tasks) -> None:
    module, base, experts, heads, tasks = tiny_bert_tasks
    with pytest.raises(MethodError, match="layerwise .* needs objective distill"):
        supermerge(module, base, experts, tasks, heads=heads, layerwise=True,
                   objective="labels")
    with pytest.raises(MethodError, match="feature_weight"):
        supermerge(module, base, experts, tasks, heads=heads, layerwise=True,
                   feature_weight=0)
    with pytest.raises(LearnError, match="spans more than one block"):
        supermerge(module, base, experts, tasks, heads=heads, layerwise=True,
                   granularity="task", steps=1)
    model = MergedModel.from_experts(module, base, experts, heads=heads)
    with pytest.raises(LearnError, match="lacks its expert's outputs"):
        learn_layerwise(model, tasks, steps=1)


def test_a_module_without_blocks_is_refused() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    base = {k: v.clone() for k, v in mlp.state_dict().items()}
    expert = {k: v + 0.1 for k, v in base.items()}
    task = Task("a", TaskData(torch.randn(8, 4), None, "a.jsonl"))
    with pytest.raises(LearnError, match="no numbered blocks"):
        supermerge(mlp, base, {"a": expert}, [task], layerwise=True, steps=1)


def test_configurations_keep_what_the_user_set() -> None:
    from supermerge.learn import get_learned_method

    SUPERMERGE = get_learned_method("supermerge")

    def labels(**params):
        return list(SUPERMERGE.validate(params).configurations())

    assert labels() == ["basis tsv, end to end, granularity tensor",
                        "basis task_vectors, layerwise, granularity row"]
    # the paper's configuration pins both options: one fit, nothing to choose
    assert labels(objective="labels", basis="task_vectors") == [
        "basis task_vectors, end to end, granularity tensor"]
    # layerwise needs distillation: dropped with labels
    assert labels(objective="labels") == ["basis tsv, end to end, granularity tensor"]
    assert labels(basis="tsv") == ["basis tsv, end to end, granularity tensor",
                                   "basis tsv, layerwise, granularity row"]
    assert labels(select="off") == ["basis tsv, end to end, granularity tensor"]


@pytest.mark.parametrize("sure", [0.5, 0.99])
def test_selection_keeps_the_first_unless_another_is_surely_better(tiny_bert_tasks, sure,
                                                                  monkeypatch) -> None:
    from supermerge.learn import merge as merge_module

    monkeypatch.setattr(merge_module, "paired_bootstrap", lambda *a, **k: sure)
    module, base, experts, heads, tasks = tiny_bert_tasks
    merge = supermerge(module, base, experts, tasks, heads=heads, steps=4, eval_every=2)
    first, lowest = next(iter(merge.selection)), min(merge.selection, key=merge.selection.get)
    assert merge.chosen == (lowest if sure >= merge_module.SURE else first)


def test_selection_keeps_the_lowest_held_out_prediction_loss(tiny_bert_tasks) -> None:
    from supermerge.learn.objectives import make_objective
    from supermerge.learn.train import prediction_loss

    module, base, experts, heads, tasks = tiny_bert_tasks
    calls = []
    merge = supermerge(module, base, experts, tasks, heads=heads, steps=6, eval_every=3,
                       progress=lambda *a: calls.append(a[1:3]))
    assert len(merge.selection) == 2 and merge.chosen in merge.selection
    first, lowest = next(iter(merge.selection)), min(merge.selection, key=merge.selection.get)
    assert merge.chosen in (first, lowest)  # the first, unless another is surely better
    assert calls[-1] == (2000, 2000) and calls == sorted(calls)
    # the reported loss is the kept model's: predictions only, on the held-out part
    taught_tasks = taught(tiny_bert_tasks)
    kl_only = make_objective("distill", feature_weight=0.0)
    loss = prediction_loss(merge.model, taught_tasks, kl_only, holdout=0.25, seed=0)
    assert loss == pytest.approx(merge.selection[merge.chosen], rel=1e-6)
    with_states = prediction_loss(merge.model, taught_tasks, make_objective("distill"),
                                  holdout=0.25, seed=0)
    assert with_states == pytest.approx(loss, rel=1e-6)  # the state term is dropped
    single = supermerge(module, base, experts, tasks, heads=heads, steps=2, select="off")
    assert single.selection == {} and single.chosen == "basis tsv, end to end, granularity tensor"
