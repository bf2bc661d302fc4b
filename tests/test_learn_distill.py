"""SuperMerge's objectives and bases: distillation from the experts, the TSV basis."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import inputs
from supermerge.learn import LearnError, MergedModel, Task, TaskData, learn_coefficients
from supermerge.learn.bases import tsv_basis
from supermerge.learn.distill import attach_teachers, block_modules, captured_blocks
from supermerge.learn.merge import adamerging, supermerge
from supermerge.learn.objectives import feature_distance, kl_to_teacher, make_objective
from supermerge.methods.tsv_method import tsv_matrix

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_block_modules_and_capture_find_every_bert_layer(tiny_bert_tasks) -> None:
    module = tiny_bert_tasks[0]
    assert len(block_modules(module)) == 2
    with captured_blocks(module) as states:
        module(**inputs(3, 0))
    assert [tuple(s.shape) for s in states] == [(3, 7, 16), (3, 7, 16)]
    with captured_blocks(module, enabled=False) as states:
        module(**inputs(3, 0))
    assert states == []


def test_feature_distance_by_hand_masks_padding() -> None:
    student = [torch.tensor([[[1.0, 0.0], [9.0, 9.0]]])]  # second token is padding
    teacher = [torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])]
    mask = torch.tensor([[1, 0]])
    # ||(1,0) - (3,4)||^2 / ||(3,4)||^2 = (4 + 16) / 25
    assert feature_distance(student, teacher, mask).item() == pytest.approx(20 / 25)
    assert feature_distance(student, teacher, None).item() == pytest.approx((20 + 162) / 25)
    # two examples: the mean of their relative distances (1/1 and 0/4)
    student = [torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]])]
    teacher = [torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])]
    assert feature_distance(student, teacher, torch.ones(2, 1)).item() == pytest.approx(0.5)


def test_kl_to_teacher_by_hand() -> None:
    teacher = torch.log(torch.tensor([[0.5, 0.5]]))
    student = torch.log(torch.tensor([[0.25, 0.75]]))
    expected = 0.5 * torch.log(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(2 / 3))
    assert kl_to_teacher(student, teacher).item() == pytest.approx(expected.item(), rel=1e-6)
    assert kl_to_teacher(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_distilling_an_expert_from_itself_costs_nothing(tiny_bert_tasks) -> None:
    module, base, experts, heads, tasks = tiny_bert_tasks
    names = [n for n in base if base[n].is_floating_point()]
    taught = attach_teachers(module, {"a": experts["a"]}, names, heads, tasks[:1])
    model = MergedModel.from_experts(module, base, {"a": experts["a"]}, heads={"a": heads["a"]},
                                     coefficient_map="identity", init=1.0)
    objective = make_objective("distill", feature_weight=1.0)
    batch = taught[0].data
    with captured_blocks(module) as states:
        output = model(**batch.inputs, task="a")
    assert objective(output, batch, "classification", states).item() == pytest.approx(0, abs=1e-6)
    model.set_weight(torch.full_like(model.weight, 0.5))
    with captured_blocks(module) as states:
        output = model(**batch.inputs, task="a")
    assert objective(output, batch, "classification", states).item() > 1e-4


def test_tsv_basis_at_a_uniform_coefficient_is_tsv_m(tiny_bert_tasks) -> None:
    module, base, experts, heads, _ = tiny_bert_tasks
    model = MergedModel.from_experts(module, base, experts, heads=heads, init=0.6,
                                     prepare=tsv_basis)
    merged = model.merged_state_dict()
    for name in model.names:
        taus = [experts[e][name].float() - base[name] for e in experts]
        if base[name].dim() == 2:
            expected = base[name] + 0.6 * tsv_matrix(taus)
        else:
            expected = base[name] + 0.6 * sum(taus) / len(taus)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_distilled_tsv_supermerge_lowers_the_held_out_distance(tiny_bert_tasks) -> None:
    module, base, experts, heads, tasks = tiny_bert_tasks
    result = supermerge(module, base, experts, tasks, heads=heads, objective="distill",
                        basis="tsv", steps=20, eval_every=5, lr=0.05)
    fit = result.fits["root"]
    assert fit.objective == "distill"
    assert fit.heldout_loss < fit.history[0].heldout_loss
    assert fit.heldout_accuracy is not None


def test_distill_needs_no_labels_but_an_expert_per_task(tiny_bert_tasks) -> None:
    module, base, experts, heads, tasks = tiny_bert_tasks
    unlabelled = [Task(t.name, TaskData(t.data.inputs, None, t.data.source)) for t in tasks]
    result = adamerging(module, base, experts, unlabelled, heads=heads, objective="distill",
                        steps=2, eval_every=1)
    assert result.fits["root"].heldout_accuracy is None
    renamed = [Task("c", unlabelled[0].data)]
    with pytest.raises(LearnError, match="no expert is named like task"):
        supermerge(module, base, experts, renamed, heads={"c": heads["a"]},
                   objective="distill", steps=2)


def test_hierarchical_distillation_learns_every_node_from_the_original_experts(
        tiny_bert_tasks) -> None:
    module, base, experts, heads, tasks = tiny_bert_tasks
    three = {**experts, "c": {k: v * 1.01 if v.is_floating_point() else v
                              for k, v in experts["a"].items()}}
    torch.manual_seed(3)
    heads3 = {**heads, "c": nn.Linear(16, 3)}
    tasks3 = [*tasks, Task("c", tasks[0].data)]
    result = supermerge(module, base, three, tasks3, heads=heads3, objective="distill",
                        hierarchical=True, fan_in=2, steps=3, eval_every=1)
    assert len(result.fits) == 2 and all(f.objective == "distill" for f in result.fits.values())


def test_a_non_finite_loss_stops_training_and_names_the_task(tiny_bert_tasks) -> None:
    module, base, experts, heads, tasks = tiny_bert_tasks
    huge = {k: v * 1e30 if v.is_floating_point() else v for k, v in experts["b"].items()}
    model = MergedModel.from_experts(module, base, {"a": experts["a"], "b": huge}, heads=heads)
    with pytest.raises(LearnError, match="loss of task 'a' is (nan|inf)"):
        learn_coefficients(model, tasks, steps=2)


def test_patience_stops_early_and_keeps_the_best_step(tiny_bert_tasks) -> None:
    module, base, experts, heads, tasks = tiny_bert_tasks
    model = MergedModel.from_experts(module, base, experts, heads=heads)
    calls = []
    fit = learn_coefficients(model, tasks, steps=200, eval_every=1, lr=5.0, patience=2,
                             progress=lambda *a: calls.append(a))
    last = fit.history[-1].step
    assert last < 200 and calls[-1][:3] == ("learn", 200, 200)
    best = min(fit.history, key=lambda e: e.heldout_loss)
    assert fit.best_step == best.step and last - best.step == 2


def test_reg_pulls_the_coefficients_toward_their_start(tiny_bert_tasks) -> None:
    module, base, experts, heads, tasks = tiny_bert_tasks
    drift = {}
    for reg in (0.0, 100.0):
        model = MergedModel.from_experts(module, base, experts, heads=heads)
        start = model.coefficients().detach().clone()
        learn_coefficients(model, tasks, steps=15, eval_every=15, lr=0.1, holdout=0, reg=reg)
        drift[reg] = (model.coefficients() - start).abs().max().item()
    assert drift[100.0] < 0.2 * drift[0.0]
