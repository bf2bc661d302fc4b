"""MergedModel: merged weights, gradients into W only, groups, heads, maps, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from supermerge.learn import (
    LearnError,
    MergedModel,
    TaskData,
    assign_groups,
    block_of,
    supervised_loss,
)
from test_learn_toys import (
    CLASSES,
    MLP,
    one_thread,  # noqa: F401  (autouse fixture)
    two_task_toy,
)


def _loss(model: MergedModel, val: dict[str, TaskData]) -> torch.Tensor:
    weights = model.merged_parameters()
    return sum(
        supervised_loss(model(data.inputs, task=t, weights=weights), data.labels,
                        "classification")
        for t, data in val.items()
    )


def test_gradient_matches_finite_differences() -> None:
    toy = two_task_toy()
    module = MLP().double()
    module.load_state_dict(toy.base_state)
    experts = {k: {n: t.double() for n, t in e.items()} for k, e in toy.experts.items()}
    val = {k: TaskData(v.inputs.double(), v.labels) for k, v in toy.val.items()}
    model = MergedModel.from_experts(module, module.state_dict(), experts, head_prefix="head.",
                                     vector_dtype=torch.float64)
    assert model.weight.dtype == torch.float64
    with torch.no_grad():  # a generic point, not the uniform init
        model.weight.add_(torch.linspace(-0.5, 0.5, model.weight.numel()).view_as(model.weight))
    _loss(model, val).backward()
    analytic = model.weight.grad.clone()
    numeric = torch.zeros_like(analytic)
    h = 1e-6
    for index in range(analytic.numel()):
        for sign in (1, -1):
            with torch.no_grad():
                model.weight.view(-1)[index] += sign * h
                numeric.view(-1)[index] += sign * _loss(model, val).item() / (2 * h)
                model.weight.view(-1)[index] -= sign * h
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-9)
    assert all(p.grad is None for p in module.parameters())


def test_merged_weights_follow_the_formula_and_heads_stay_with_their_task() -> None:
    toy = two_task_toy()
    base = toy.base_state
    model = MergedModel.from_experts(toy.module, base, toy.experts, head_prefix="head.",
                                     granularity="task", coefficient_map="identity", init=0.25)
    assert model.tasks == ["a", "b"]
    assert not any(n.startswith("head.") for n in model.names)
    merged = model.merged_state_dict()
    for name in model.names:
        expected = base[name] + 0.25 * sum(e[name] - base[name] for e in toy.experts.values())
        torch.testing.assert_close(merged[name], expected)
    # task a is answered by the merged body with expert a's own head, never an average
    x = toy.test["a"].inputs[:5]
    reference = MLP()
    reference.load_state_dict({**merged, **{k: toy.experts["a"][k] for k in ("head.weight",
                                                                            "head.bias")}})
    torch.testing.assert_close(model(x, task="a"), reference(x))
    torch.testing.assert_close(model.head_state_dicts()["b"]["head.weight"],
                               toy.experts["b"]["head.weight"])
    with pytest.raises(LearnError, match="no head for task 'c'"):
        model(x, task="c")


def test_head_modules_apply_to_the_backbone_output() -> None:
    toy = two_task_toy()
    body_state = {k.removeprefix("body."): v for k, v in toy.base_state.items()
                  if k.startswith("body.")}
    body = MLP().body
    body.load_state_dict(body_state)
    experts = {t: {k.removeprefix("body."): v for k, v in e.items() if k.startswith("body.")}
               for t, e in toy.experts.items()}
    heads = {}
    for t, e in toy.experts.items():
        heads[t] = nn.Linear(24, CLASSES)
        heads[t].load_state_dict({"weight": e["head.weight"], "bias": e["head.bias"]})
    model = MergedModel.from_experts(body, body.state_dict(), experts, heads=heads)
    by_prefix = MergedModel.from_experts(toy.module, toy.base_state, toy.experts,
                                         head_prefix="head.")
    x = toy.test["b"].inputs[:4]
    torch.testing.assert_close(model(x, task="b"), by_prefix(x, task="b"))
    assert not any(p.requires_grad for p in heads["b"].parameters())


@pytest.mark.parametrize(("name", "init"), [("tanh", 0.3), ("clamp", 0.3), ("identity", 0.3),
                                            ("tanh", -0.5)])
def test_init_sets_every_mapped_coefficient(name: str, init: float) -> None:
    toy = two_task_toy()
    model = MergedModel.from_experts(toy.module, toy.base_state, toy.experts,
                                     head_prefix="head.", coefficient_map=name, init=init)
    torch.testing.assert_close(model.coefficients(), torch.full((2, 4), init))
    if name == "tanh":
        assert model.weight[0, 0].item() == pytest.approx(math.atanh(init))


@pytest.mark.parametrize(("name", "init"), [("tanh", 1.0), ("clamp", 1.5), ("clamp", -0.1)])
def test_init_outside_the_map_is_refused(name: str, init: float) -> None:
    toy = two_task_toy()
    with pytest.raises(LearnError, match="outside the range"):
        MergedModel.from_experts(toy.module, toy.base_state, toy.experts, head_prefix="head.",
                                 coefficient_map=name, init=init)


def test_bfloat16_task_vectors_stay_close_to_float32() -> None:
    toy = two_task_toy()
    full = MergedModel.from_experts(toy.module, toy.base_state, toy.experts, head_prefix="head.")
    half = MergedModel.from_experts(toy.module, toy.base_state, toy.experts, head_prefix="head.",
                                    vector_dtype=torch.bfloat16)
    assert half.weight.dtype == torch.float32
    a, b = full.merged_state_dict(), half.merged_state_dict()
    for name in full.names:  # bfloat16 keeps about 3 significant digits of each delta
        delta = a[name] - toy.base_state[name]
        torch.testing.assert_close(b[name] - toy.base_state[name], delta, rtol=0,
                                   atol=1e-2 * delta.abs().max().item())


def test_block_groups_follow_transformer_layer_names() -> None:
    names = ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.q.weight",
             "bert.encoder.layer.0.output.dense.bias", "bert.encoder.layer.1.output.dense.bias",
             "model.layers.12.mlp.up_proj.weight", "transformer.h.3.attn.c_attn.weight",
             "encoder.block.2.layer.1.DenseReluDense.wi.weight", "vit.blocks.0.norm1.weight",
             "lm_head.weight"]
    groups, index = assign_groups(names, "block")
    assert groups == ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0",
                      "bert.encoder.layer.1", "model.layers.12", "transformer.h.3",
                      "encoder.block.2", "vit.blocks.0", "lm_head.weight"]
    assert index == [0, 1, 1, 2, 3, 4, 5, 6, 7]
    assert assign_groups(names, "task") == (["all"], [0] * len(names))
    assert block_of("highway.weight") is None


def test_tiny_bert_blocks_integer_buffers_and_classifier_heads_of_any_size() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(config)
    experts = {}
    for task in ("x", "y"):
        expert = transformers.BertForSequenceClassification(config)
        state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in base.state_dict().items()}
        expert.load_state_dict(state)
        experts[task] = expert.state_dict()
    # heads may differ in their number of classes: y answers with 5
    experts["y"]["classifier.weight"] = torch.randn(5, 16)
    experts["y"]["classifier.bias"] = torch.randn(5)
    model = MergedModel.from_experts(base, base.state_dict(), experts,
                                     head_prefix="classifier.", granularity="block")
    assert "bert.encoder.layer.1" in model.group_names
    assert not any(n.startswith("classifier.") for n in model.names)
    assert all(base.state_dict()[n].is_floating_point() for n in model.names)
    merged = model.merged_state_dict()
    for name, tensor in base.state_dict().items():
        if not tensor.is_floating_point():
            assert torch.equal(merged[name], tensor), name
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    logits = model(input_ids=ids, task="y").logits
    logits.sum().backward()
    assert logits.shape == (2, 5) and model(input_ids=ids, task="x").logits.shape == (2, 3)
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(ids))


def test_tied_weights_merge_once_and_both_names_get_the_merge() -> None:
    module = Tied()
    base = module.state_dict()
    assert set(base) == {"embed.weight", "out.weight"}
    expert = {k: v + 1.0 for k, v in base.items()}
    model = MergedModel.from_experts(module, base, {"e": expert}, coefficient_map="identity",
                                     init=0.5)
    assert model.names == ["embed.weight"]
    merged = model.merged_state_dict()
    torch.testing.assert_close(merged["out.weight"], base["embed.weight"] + 0.5)
    assert merged["out.weight"] is merged["embed.weight"]
    model(torch.tensor([[1, 2]])).sum().backward()
    assert model.weight.grad is not None


@pytest.mark.parametrize(("granularity", "coefficient_map", "vector_dtype", "streamed"), [
    ("tensor", "tanh", torch.float32, False), ("tensor", "tanh", torch.float32, True),
    ("task", "clamp", torch.float32, True), ("block", "tanh", torch.bfloat16, True),
    ("row", "tanh", torch.float32, False), ("row", "identity", torch.float32, True)])
def test_reduced_leaf_gradients_equal_autograd_through_the_merge(
        granularity, coefficient_map, vector_dtype, streamed) -> None:
    """The training step's gradient (merged leaves reduced after all tasks, or streamed as
    each is computed) is the gradient autograd gives through merged_parameters()."""
    from supermerge.learn import Task
    from supermerge.learn.objectives import supervised_loss as objective
    from supermerge.learn.train import _backward

    toy = two_task_toy()
    model = MergedModel.from_experts(toy.module, toy.base_state, toy.experts,
                                     head_prefix="head.", granularity=granularity,
                                     coefficient_map=coefficient_map, init=0.4,
                                     vector_dtype=vector_dtype)
    with torch.no_grad():
        model.weight.add_(torch.linspace(-0.3, 0.3, model.weight.numel()).view_as(model.weight))
    _loss(model, toy.val).backward()
    expected = model.weight.grad.clone()
    model.weight.grad = None
    tasks = [Task(name, data) for name, data in toy.val.items()]
    total = _backward(model, tasks, [t.data for t in tasks], objective, streamed=streamed)
    # bfloat16 vectors: both reduce in bfloat16 (8-bit mantissa), rounding differently
    rtol = 1e-4 if vector_dtype == torch.float32 else 3e-2
    torch.testing.assert_close(model.weight.grad, expected, rtol=rtol,
                               atol=rtol * float(expected.abs().max()))
    assert total == pytest.approx(_loss(model, toy.val).item(), rel=1e-5)
    assert all(p.grad is None for p in toy.module.parameters())


def test_streamed_leaves_hold_no_gradient_after_a_backward_pass() -> None:
    toy = two_task_toy()
    model = MergedModel.from_experts(toy.module, toy.base_state, toy.experts,
                                     head_prefix="head.")
    for streamed in (False, True):
        leaves = model.merged_leaves(streamed=streamed)
        task, data = next(iter(toy.val.items()))
        supervised_loss(model(data.inputs, task=task, weights=leaves.weights), data.labels,
                        "classification").backward()
        held = [n for n, leaf in leaves.weights.items() if leaf.grad is not None]
        assert held == ([] if streamed else model.names)
        leaves.backward()
        assert model.weight.grad is not None and bool(model.weight.grad.abs().sum() > 0)
        model.weight.grad = None


def test_row_granularity_scales_each_output_row_of_each_task_vector_by_hand() -> None:
    toy = two_task_toy()
    model = MergedModel.from_experts(toy.module, toy.base_state, toy.experts,
                                     head_prefix="head.", granularity="row",
                                     coefficient_map="identity", init=0.5)
    rows = sum(toy.base_state[n].shape[0] if toy.base_state[n].dim() else 1 for n in model.names)
    assert model.weight.shape == (len(toy.experts), rows) == (2, len(model.group_names))
    with torch.no_grad():
        model.weight.copy_(torch.arange(model.weight.numel(), dtype=torch.float32
                                        ).view_as(model.weight) / 100)
    merged = model.merged_parameters()
    start = 0
    for name in model.names:
        base = toy.base_state[name]
        count = base.shape[0] if base.dim() else 1
        expected = base.clone().reshape(count, -1)
        for i, expert in enumerate(toy.experts.values()):
            for row in range(count):
                c = model.weight[i, start + row].item()
                expected[row] += c * (expert[name] - base).reshape(count, -1)[row]
        torch.testing.assert_close(merged[name], expected.reshape(base.shape))
        assert model.group_names[start] == f"{name}[0]"
        start += count
