"""Learning coefficients: SuperMerge against task arithmetic, harmful experts, the loop."""

from __future__ import annotations

import torch

from supermerge.learn import (
    MergedModel,
    Task,
    TaskData,
    adamerging,
    entropy_loss,
    learn_coefficients,
    model_thresholds,
    supermerge,
    supervised_loss,
    ties_prepare,
)
from test_learn_toys import (
    accuracy,
    mean_accuracy,
    one_thread,  # noqa: F401  (autouse fixture)
    two_task_toy,
)

PAPER = {"objective": "labels", "basis": "task_vectors", "steps": 200, "lr": 1e-2,
         "batch_size": 16}
"""SuperMerge as its paper configures it (the library's defaults before distillation)."""


def test_supermerge_reaches_task_arithmetic_with_the_best_lambda() -> None:
    toy = two_task_toy()
    grid = [round(0.1 * i, 1) for i in range(1, 11)]
    arithmetic = max(
        mean_accuracy(
            MergedModel.from_experts(toy.module, toy.base_state, toy.experts, head_prefix="head.",
                                     coefficient_map="identity", granularity="task", init=lam),
            toy,
        )
        for lam in grid
    )
    result = supermerge(toy.module, toy.base_state, toy.experts, toy.tasks(), head_prefix="head.",
                        **PAPER)
    assert mean_accuracy(result.model, toy) >= arithmetic


def test_a_harmful_expert_gets_a_near_zero_weight_where_adamerging_cannot_subtract() -> None:
    toy = two_task_toy()
    base = toy.base_state
    # its task vector undoes both experts twice over
    harm = {k: base[k] - 2 * sum(e[k] - base[k] for e in toy.experts.values()) for k in base}
    experts = {**toy.experts, "harm": harm}
    options = {"head_prefix": "head.", "granularity": "task", "steps": 150}
    paper = {k: v for k, v in PAPER.items() if k != "steps"}
    without, with_harm = (
        MergedModel.from_experts(toy.module, base, pool, head_prefix="head.",
                                 granularity="task", coefficient_map="identity")
        for pool in (toy.experts, experts)
    )
    for task, data in toy.test.items():  # at lambda 0.3 it hurts every task
        assert accuracy(with_harm, task, data) < accuracy(without, task, data) - 0.2
    learned = supermerge(toy.module, base, experts, toy.tasks(), **options, **paper)
    adaptive = adamerging(toy.module, base, experts, toy.tasks(), lr=1e-2, **options)
    assert learned.fits["root"].coefficients[2, 0].item() < 0.05
    assert adaptive.fits["root"].coefficients.min() >= 0  # the clamp cannot subtract
    assert mean_accuracy(learned.model, toy) > mean_accuracy(adaptive.model, toy)


def test_the_best_heldout_coefficients_are_kept_and_both_losses_reported() -> None:
    toy = two_task_toy()
    model = MergedModel.from_experts(toy.module, toy.base_state, toy.experts, head_prefix="head.")
    calls = []
    result = learn_coefficients(model, toy.tasks(), steps=40, eval_every=10,
                                progress=lambda *a: calls.append(a))
    assert [c[1] for c in calls] == list(range(1, 41)) and calls[-1][:3] == ("learn", 40, 40)
    assert [e.step for e in result.history] == [0, 10, 20, 30, 40]
    best = min(result.history, key=lambda e: e.heldout_loss)
    assert (result.best_step, result.heldout_loss, result.train_loss) == (
        best.step, best.heldout_loss, best.train_loss)
    torch.testing.assert_close(model.weight.detach(), result.raw)
    torch.testing.assert_close(result.coefficients, torch.tanh(result.raw))
    assert result.group_names == model.group_names and result.expert_names == ["a", "b"]


def test_the_loop_backpropagates_the_summed_task_losses() -> None:
    toy = two_task_toy()

    def fresh() -> MergedModel:
        return MergedModel.from_experts(toy.module, toy.base_state, toy.experts,
                                        head_prefix="head.", granularity="block")

    looped = fresh()
    learn_coefficients(looped, toy.tasks(), steps=1, batch_size=1000, holdout=0)
    direct = fresh()
    weights = direct.merged_parameters()
    sum(supervised_loss(direct(d.inputs, task=t, weights=weights), d.labels, "classification")
        for t, d in toy.val.items()).backward()
    torch.testing.assert_close(looped.weight.grad, direct.weight.grad)


def test_training_is_seeded_and_without_holdout_keeps_the_last_step() -> None:
    toy = two_task_toy()

    def run(seed: int) -> torch.Tensor:
        model = MergedModel.from_experts(toy.module, toy.base_state, toy.experts,
                                         head_prefix="head.")
        result = learn_coefficients(model, toy.tasks(), steps=15, batch_size=8, holdout=0,
                                    seed=seed)
        assert result.heldout_loss is None and result.best_step in (0, 15)
        return result.raw

    torch.testing.assert_close(run(3), run(3), rtol=0, atol=0)
    assert not torch.equal(run(3), run(4))


def test_adamerging_plus_plus_learns_on_trimmed_sign_consistent_vectors() -> None:
    stacked = torch.tensor([[3.0, -1.0, 0.5, 2.0], [-1.0, -2.0, 0.1, 1.0]])
    prepared = ties_prepare(stacked, density=0.5)
    # keep the 2 largest of each row, elect signs (+2, -2, 0, +3), drop disagreeing entries
    torch.testing.assert_close(prepared, torch.tensor([[3.0, 0.0, 0.0, 2.0],
                                                       [0.0, -2.0, 0.0, 0.0]]))
    toy = two_task_toy()
    unlabelled = [Task(t.name, TaskData(t.data.inputs)) for t in toy.tasks()]
    result = adamerging(toy.module, toy.base_state, toy.experts, unlabelled, head_prefix="head.",
                        ties=True, density=0.5, steps=5)
    assert result.fits["root"].coefficient_map == "clamp"


def test_adamerging_plus_plus_trims_the_whole_model_like_the_paper() -> None:
    """tau = (a: [4, 3], b: [1, 2]) at density 0.5: the whole model keeps its top 2 (both in
    a, threshold 3), where a per-tensor trim keeps the top 1 of each tensor."""
    vectors = [{"a": torch.tensor([4.0, 3.0]), "b": torch.tensor([1.0, 2.0])},
               {"a": torch.tensor([-1.0, 0.5]), "b": torch.tensor([0.0, -8.0])}]
    thresholds = model_thresholds(vectors, density=0.5)
    assert thresholds == (3.0, 1.0)
    stacked_b = torch.stack([v["b"] for v in vectors])
    torch.testing.assert_close(ties_prepare(stacked_b, thresholds=thresholds),
                               torch.tensor([[0.0, 0.0], [0.0, -8.0]]))
    # per tensor: (0, 2) and (0, -8) kept; the elected sign of entry 1 is -: 2 is dropped
    torch.testing.assert_close(ties_prepare(stacked_b, density=0.5),
                               torch.tensor([[0.0, 0.0], [0.0, -8.0]]))
    stacked_a = torch.stack([v["a"] for v in vectors])
    # whole model: (4, 3) and (-1, 0) kept; signs (+, +): -1 disagrees
    torch.testing.assert_close(ties_prepare(stacked_a, thresholds=thresholds),
                               torch.tensor([[4.0, 3.0], [0.0, 0.0]]))
    # per tensor: (4, 0) and (-1, 0) kept; signs (+, 0)
    torch.testing.assert_close(ties_prepare(stacked_a, density=0.5),
                               torch.tensor([[4.0, 0.0], [0.0, 0.0]]))
    toy = two_task_toy()
    unlabelled = [Task(t.name, TaskData(t.data.inputs)) for t in toy.tasks()]
    result = adamerging(toy.module, toy.base_state, toy.experts, unlabelled, head_prefix="head.",
                        ties=True, density=0.5, trim_scope="model", steps=3)
    assert torch.isfinite(result.fits["root"].coefficients).all()


def test_objectives_on_hand_computed_values() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    labels = torch.tensor([0, 1])
    expected = -(torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.1))) / 2
    torch.testing.assert_close(supervised_loss(logits, labels, "classification"), expected)
    entropy = -(0.5 * torch.log(torch.tensor(0.5)) * 2
                + 0.9 * torch.log(torch.tensor(0.9)) + 0.1 * torch.log(torch.tensor(0.1))) / 2
    torch.testing.assert_close(entropy_loss(logits, None, "classification"), entropy)
    # causal LM: position t predicts token t + 1; -100 positions are not scored
    lm_logits = torch.log(torch.tensor([[[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]]))
    tokens = torch.tensor([[0, 1, -100]])
    torch.testing.assert_close(supervised_loss(lm_logits, tokens, "causal_lm"),
                               -torch.log(torch.tensor(0.8)))


def test_paired_bootstrap_is_sure_only_of_a_consistent_difference() -> None:
    from supermerge.learn.train import paired_bootstrap

    incumbent = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 0.5])]
    lower = [t - 0.1 for t in incumbent]  # lower on every example: every resample agrees
    assert paired_bootstrap(lower, incumbent) == 1.0
    assert paired_bootstrap(incumbent, lower) == 0.0
    assert paired_bootstrap(incumbent, incumbent) == 0.0  # a tie is not better
    mixed = [incumbent[0] + torch.tensor([-1.0, 1.0, -1.0, 1.0]), incumbent[1]]
    assert 0.2 < paired_bootstrap(mixed, incumbent, seed=3) < 0.8  # a coin toss
