"""Fisher merging and RegMean: hand-checkable oracles, paper invariants, degenerate inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from supermerge.errors import MethodError
from supermerge.learn import (
    LEARNED_METHODS,
    LearnError,
    Task,
    TaskData,
    fisher_merge,
    regmean_merge,
)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.act = nn.Tanh()
        self.classifier = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.act(self.body(x)))


def _expert(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in MLP().state_dict().items()}


def _tasks(names: list[str], n: int = 8) -> list[Task]:
    generator = torch.Generator().manual_seed(1)
    return [Task(name, TaskData(torch.randn(n, 3, generator=generator))) for name in names]


def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values())


def test_regmean_of_one_model_returns_it() -> None:
    expert = _expert(0)
    merged = regmean_merge(MLP(), {"a": expert}, _tasks(["a"]))
    assert merged.keys() == expert.keys()
    for name, tensor in expert.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)


def test_fisher_of_one_model_returns_it() -> None:
    expert = _expert(0)
    merged = fisher_merge(MLP(), {"a": expert}, _tasks(["a"]))
    for name, tensor in expert.items():
        torch.testing.assert_close(merged[name], tensor)


def test_fisher_with_equal_fishers_is_the_plain_average() -> None:
    """A floor dwarfing every Fisher makes all of them (numerically) equal."""
    a, b = _expert(0), _expert(1)
    merged = fisher_merge(MLP(), {"a": a, "b": b}, _tasks(["a", "b"]), floor=1e12)
    for name in a:
        torch.testing.assert_close(merged[name], (a[name] + b[name]) / 2)


def test_fisher_with_identical_experts_and_data_is_their_average_exactly() -> None:
    a = _expert(0)
    b = {k: v.clone() for k, v in a.items()}
    (task,) = _tasks(["t"])
    merged = fisher_merge(MLP(), {"a": a, "b": b}, [task, Task("u", task.data)], seed=3)
    for name in a:
        torch.testing.assert_close(merged[name], a[name])


def test_fisher_weights_and_zero_fisher_fall_back_to_weighted_average() -> None:
    """A bias-free linear model on all-zero inputs has zero gradients: F = 0 everywhere."""
    module = nn.Linear(2, 2, bias=False)
    a = {"weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    b = {"weight": torch.tensor([[5.0, 6.0], [7.0, 8.0]])}
    zeros = [Task("a", TaskData(torch.zeros(4, 2))), Task("b", TaskData(torch.zeros(4, 2)))]
    merged = fisher_merge(module, {"a": a, "b": b}, zeros, weights={"a": 3.0, "b": 1.0})
    assert _finite(merged)
    torch.testing.assert_close(merged["weight"], (3 * a["weight"] + b["weight"]) / 4)
    with pytest.raises(LearnError, match="positive"):
        fisher_merge(module, {"a": a, "b": b}, zeros, weights=[1.0, 0.0])


def test_fisher_with_one_zero_fisher_is_finite_and_follows_the_informed_expert() -> None:
    module = nn.Linear(2, 2, bias=False)
    a = {"weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    b = {"weight": torch.tensor([[5.0, 6.0], [7.0, 8.0]])}
    tasks = [Task("a", TaskData(torch.randn(16, 2, generator=torch.Generator().manual_seed(0)))),
             Task("b", TaskData(torch.zeros(16, 2)))]
    merged = fisher_merge(module, {"a": a, "b": b}, tasks)
    assert _finite(merged)
    torch.testing.assert_close(merged["weight"], a["weight"], rtol=1e-3, atol=1e-3)
    zero_floor = fisher_merge(module, {"a": a, "b": b}, tasks, floor=0.0)
    assert _finite(zero_floor)


def test_regmean_alpha_zero_is_the_diagonal_weighted_average_by_hand() -> None:
    """alpha = 0: W[:, k] = sum_i G_i[k, k] W_i[:, k] / sum_i G_i[k, k]."""
    module = nn.Linear(2, 2, bias=False)
    a = {"weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    b = {"weight": torch.tensor([[5.0, 6.0], [7.0, 8.0]])}
    # expert a sees x = (1, 1): diag(G_a) = (1, 1); b sees (1, 0) and (0, 3) once each:
    # diag(G_b) = (1, 9). Column 0: (W_a + W_b) / 2; column 1: (W_a + 9 W_b) / 10.
    tasks = [Task("a", TaskData(torch.tensor([[1.0, 1.0]]))),
             Task("b", TaskData(torch.tensor([[1.0, 0.0], [0.0, 3.0]])))]
    merged = regmean_merge(module, {"a": a, "b": b}, tasks, alpha=0.0)
    expected = torch.tensor([[(1 + 5) / 2, (2 + 9 * 6) / 10], [(3 + 7) / 2, (4 + 9 * 8) / 10]])
    torch.testing.assert_close(merged["weight"], expected)


def test_regmean_alpha_one_matches_least_squares_and_averages_biases() -> None:
    module = nn.Linear(2, 2)
    a, b = dict(nn.Linear(2, 2).state_dict()), dict(nn.Linear(2, 2).state_dict())
    generator = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(6, 2, generator=generator), torch.randn(6, 2, generator=generator)
    tasks = [Task("a", TaskData(xa)), Task("b", TaskData(xb))]
    merged = regmean_merge(module, {"a": a, "b": b}, tasks, alpha=1.0)
    x = torch.cat([xa, xb]).double()
    y = torch.cat([xa @ a["weight"].T, xb @ b["weight"].T]).double()
    expected = torch.linalg.lstsq(x, y).solution.T.float()
    torch.testing.assert_close(merged["weight"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged["bias"], (a["bias"] + b["bias"]) / 2)


def test_regmean_unseen_feature_and_singular_grams_stay_finite() -> None:
    module = nn.Linear(2, 2, bias=False)
    a = {"weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    b = {"weight": torch.tensor([[5.0, 6.0], [7.0, 8.0]])}
    tasks = [Task("a", TaskData(torch.tensor([[1.0, 0.0]]))),
             Task("b", TaskData(torch.tensor([[2.0, 0.0]])))]
    for alpha in (0.0, 0.9, 1.0):
        merged = regmean_merge(module, {"a": a, "b": b}, tasks, alpha=alpha)
        assert _finite(merged)
        # feature 1 never active: plain average of that column; feature 0: 1:4 weighting
        torch.testing.assert_close(merged["weight"][:, 1], torch.tensor([4.0, 6.0]))
        torch.testing.assert_close(merged["weight"][:, 0], torch.tensor([4.2, 6.2]))
    singular = [Task("a", TaskData(torch.tensor([[1.0, 1.0]]))),
                Task("b", TaskData(torch.tensor([[2.0, 2.0]])))]
    assert _finite(regmean_merge(module, {"a": a, "b": b}, singular, alpha=1.0))


def test_regmean_on_an_expert_with_overflowing_activations_names_it_and_the_layer() -> None:
    """Weights so large that the next layer's inputs overflow to Inf: a LearnError naming
    the expert and the layer (torch's lstsq failed an INTERNAL ASSERT here)."""
    module = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    torch.manual_seed(0)
    good = {k: v.detach().clone() for k, v in module.state_dict().items()}
    huge = {**good, "0.weight": torch.full((4, 3), 3e38)}
    tasks = [Task(name, TaskData(torch.full((8, 3), 2.0))) for name in ("good", "huge")]
    with pytest.raises(LearnError, match="expert 'huge'") as err:
        regmean_merge(module, {"good": good, "huge": huge}, tasks)
    assert err.value.tensor == "1.weight" and "huge or non-finite weights" in err.value.fix


def test_head_prefix_keeps_heads_out_and_uses_each_experts_head() -> None:
    a, b = _expert(0), _expert(1)
    b["classifier.weight"], b["classifier.bias"] = torch.randn(5, 4), torch.randn(5)
    tasks = _tasks(["a", "b"])
    for merge in (fisher_merge, regmean_merge):
        merged = merge(MLP(), {"a": a, "b": b}, tasks, head_prefix="classifier.")
        assert set(merged) == {"body.weight", "body.bias"}
        assert _finite(merged)


def test_expert_missing_a_tensor_is_a_clear_error() -> None:
    a, b = _expert(0), _expert(1)
    del b["body.bias"]
    for merge in (fisher_merge, regmean_merge):
        with pytest.raises(LearnError, match=r"expert 'b' lacks 1 tensor.*body\.bias"):
            merge(MLP(), {"a": a, "b": b}, _tasks(["a", "b"]))


def test_experts_match_tasks_by_name_then_position_else_error() -> None:
    a, b = _expert(0), _expert(1)
    by_position = regmean_merge(MLP(), {"a": a, "b": b}, _tasks(["x", "y"]))
    assert _finite(by_position)
    with pytest.raises(LearnError, match="have no task"):
        fisher_merge(MLP(), {"a": a, "b": b}, _tasks(["x"]))
    with pytest.raises(LearnError, match="alpha"):
        regmean_merge(MLP(), {"a": a}, _tasks(["a"]), alpha=1.5)


def test_fisher_is_seeded_and_integer_buffers_come_from_the_first_expert() -> None:
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    a = {k: v.clone() for k, v in module.state_dict().items()}
    b = {k: v.clone() + (0.1 if v.is_floating_point() else 0) for k, v in a.items()}
    a["1.num_batches_tracked"] = torch.tensor(7)
    tasks = _tasks(["a", "b"])
    one = fisher_merge(module, {"a": a, "b": b}, tasks, seed=5)
    two = fisher_merge(module, {"a": a, "b": b}, tasks, seed=5)
    assert one["1.num_batches_tracked"].item() == 7
    for name in one:
        torch.testing.assert_close(one[name], two[name])
    assert _finite(regmean_merge(module, {"a": a, "b": b}, tasks))


def test_causal_lm_fisher_scores_token_positions() -> None:
    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.out = nn.Linear(3, 5)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.out(self.embed(input_ids))

    ids = torch.tensor([[1, 2, 3], [4, 0, 1]])
    data = TaskData({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    lm = TinyLM()
    a = dict(lm.state_dict())
    b = {k: v + 0.05 for k, v in a.items()}
    tasks = [Task("a", data, "causal_lm"), Task("b", data, "causal_lm")]
    assert _finite(fisher_merge(lm, {"a": a, "b": b}, tasks))
    assert _finite(regmean_merge(lm, {"a": a, "b": b}, tasks))


def test_fisher_and_regmean_are_listed_with_parameters() -> None:
    methods = {m.name: m for m in LEARNED_METHODS}
    assert methods["fisher"].needs == methods["regmean"].needs == "unlabelled"
    assert {p.name for p in methods["fisher"].describe()} >= {"examples", "floor", "seed"}
    assert methods["regmean"].validate({"alpha": 0.5}).alpha == 0.5
    with pytest.raises(MethodError, match="alpha"):
        methods["regmean"].validate({"alpha": 2})


class Body(nn.Module):
    """MLP without its classifier: the module when heads are separate modules."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x))


def test_module_heads_give_the_same_merge_as_head_tensors() -> None:
    """Each task's head as an nn.Module on the body's output is the same model as the
    expert's own classifier tensors: both merges must agree."""
    a, b = _expert(0), _expert(1)
    heads = {}
    for name, expert in (("a", a), ("b", b)):
        heads[name] = nn.Linear(4, 2)
        heads[name].load_state_dict({"weight": expert["classifier.weight"],
                                     "bias": expert["classifier.bias"]})
    bodies = {n: {k: v for k, v in e.items() if k.startswith("body.")}
              for n, e in (("a", a), ("b", b))}
    tasks = _tasks(["a", "b"])
    for merge in (fisher_merge, regmean_merge):
        with_tensors = merge(MLP(), {"a": a, "b": b}, tasks, head_prefix="classifier.")
        with_modules = merge(Body(), bodies, tasks, heads=heads)
        assert with_modules.keys() == with_tensors.keys()
        for name, tensor in with_tensors.items():
            torch.testing.assert_close(with_modules[name], tensor)
    with pytest.raises(LearnError, match="no head for task.*'b'"):
        fisher_merge(Body(), bodies, tasks, heads={"a": heads["a"]})


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 3)
        self.body = nn.Linear(3, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.body(self.embed(input_ids)).mean(1)


def test_regmean_leaves_padding_out_of_the_grams() -> None:
    """The same examples padded with a loud pad token give the same merge as unpadded."""
    torch.manual_seed(0)
    a, b = dict(Tokens().state_dict()), dict(Tokens().state_dict())
    a["embed.weight"][0] = b["embed.weight"][0] = 50.0  # the pad token's embedding
    ids = torch.tensor([[1, 2, 3], [4, 5, 1]])
    plain = TaskData({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    padded_ids = torch.cat([ids, torch.zeros(2, 2, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(2, 2, dtype=torch.long)], dim=1)
    padded = TaskData({"input_ids": padded_ids, "attention_mask": mask})
    progress: list[tuple[int, int]] = []
    expected = regmean_merge(Tokens(), {"a": a, "b": b}, [Task("a", plain), Task("b", plain)])
    merged = regmean_merge(Tokens(), {"a": a, "b": b}, [Task("a", padded), Task("b", padded)],
                           progress=lambda stage, done, total: progress.append((done, total)))
    torch.testing.assert_close(merged["body.weight"], expected["body.weight"])
    assert progress[-1] == (4, 4)


def test_normalized_fisher_weighs_each_expert_by_its_unit_fisher(monkeypatch) -> None:
    """Given Fishers a: [3, 4] (norm 5), b: [0, 200] (norm 200), floor 0: normalised,
    entry 1 is (0.8 * 1 + 1 * 3) / 1.8; plain, b's large Fisher dominates it."""
    import supermerge.learn.fisher as fisher_module

    fishers = {"a": torch.tensor([[3.0, 4.0]]), "b": torch.tensor([[0.0, 200.0]])}
    monkeypatch.setattr(fisher_module, "_diagonal_fisher",
                        lambda module, state, head, names, task, *_, **__: {
                            "weight": fishers[task.name]})
    module = nn.Linear(2, 1, bias=False)
    experts = {"a": {"weight": torch.ones(1, 2)}, "b": {"weight": torch.full((1, 2), 3.0)}}
    tasks = _tasks(["a", "b"])
    normalized = fisher_merge(module, experts, tasks, floor=0.0, normalize=True)
    torch.testing.assert_close(normalized["weight"], torch.tensor([[1.0, 3.8 / 1.8]]))
    plain = fisher_merge(module, experts, tasks, floor=0.0)
    torch.testing.assert_close(plain["weight"], torch.tensor([[1.0, 604.0 / 204.0]]))


def test_exact_fisher_of_a_softmax_layer_by_hand() -> None:
    """logits = W x: d log p_y / dW = (e_y - p) x^T, so the exact expectation over y is
    F[i, j] = p_i (1 - p_i) x_j^2; averaged over two examples."""
    from supermerge.learn.fisher import _diagonal_fisher
    from supermerge.learn.statistics import ExampleCounter

    module = nn.Linear(2, 2, bias=False)
    state = {"weight": torch.tensor([[1.0, 0.0], [0.0, 0.0]])}
    x = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    task = Task("a", TaskData(x))
    counter = ExampleCounter([("a", task, None)], 8, 1, None)
    fisher = _diagonal_fisher(module, state, None, ["weight"], task, counter,
                              torch.Generator(), exact=True)["weight"]
    expected = torch.zeros(2, 2)
    for row in x:
        p = torch.softmax(state["weight"] @ row, dim=0)
        expected += (p * (1 - p))[:, None] * row.square()[None, :] / len(x)
    torch.testing.assert_close(fisher, expected)
    lm = [Task("a", TaskData(torch.zeros(1, 2, dtype=torch.long)), "causal_lm")]
    with pytest.raises(LearnError, match="classification tasks only"):
        fisher_merge(module, {"a": state}, lm, labels="exact")
