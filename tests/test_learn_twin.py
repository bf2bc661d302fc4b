"""Twin-Merging (``twin``): SVD-compressed exclusive parts, the routed combination, the
router, and `supermerge learn` end to end with load_task_model routing each input."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch.func import functional_call

import supermerge
from supermerge.cli.main import cli
from supermerge.errors import MethodError
from supermerge.learn.registry import get_learned_method
from supermerge.learn.twin import (
    Router,
    TwinModel,
    TwinState,
    compress,
    dense,
    read_twin,
    routed_tensor,
    twin_merge,
)
from test_learn_cli import learn_setup, write  # noqa: F401  (a module fixture)

transformers = pytest.importorskip("transformers")


def test_compress_keeps_the_top_singular_directions_by_hand() -> None:
    # singular values 3 and 1 along the axes: rank 1 keeps the 3, rank 2 is lossless
    delta = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    u, v = compress(delta, 1)
    assert u.shape == (3, 1) and v.shape == (1, 2)
    assert torch.allclose(dense((u, v)), torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    assert compress(delta, 2)[0] is delta and len(compress(delta, 2)) == 1
    bias = torch.tensor([1.0, -2.0])
    assert compress(bias, 1) == (bias,)  # not a matrix: kept whole


def test_routed_tensor_mixes_the_parts_by_hand() -> None:
    shared = torch.tensor([1.0, 2.0])
    parts = [(torch.tensor([1.0, 0.0]),), (torch.tensor([0.0, 4.0]),)]
    mixed = routed_tensor(shared, parts, torch.tensor([0.25, 0.75]))
    assert torch.equal(mixed, torch.tensor([1.25, 5.0]))  # 1 + .25, 2 + .75 * 4
    low = (torch.tensor([[2.0], [1.0]]), torch.tensor([[1.0, 3.0]]))  # [[2, 6], [1, 3]]
    matrix = routed_tensor(torch.zeros(2, 2), [low], torch.tensor([0.5]))
    assert torch.equal(matrix, torch.tensor([[1.0, 3.0], [0.5, 1.5]]))


def _merge(tasks_fixture, names, **params):
    module, _base, experts, heads, tasks = tasks_fixture
    chosen = [t for t in tasks if t.name in names]
    return twin_merge(module, {n: experts[n] for n in names}, chosen,
                      heads={n: heads[n] for n in names}, **params)


def test_shared_expert_is_task_arithmetic_and_full_rank_parts_restore_each_expert(
        tiny_bert_tasks, tmp_path) -> None:
    module, base, experts, _heads, _tasks = tiny_bert_tasks
    result = _merge(tiny_bert_tasks, ["a", "b"], rank=1000, steps=5, scale=0.3)
    twin = json.loads(result.files["twin.json"])
    assert twin["tasks"] == ["a", "b"] and twin["rank"] == 1000
    name = "encoder.layer.0.attention.self.query.weight"
    by_hand = base[name] + 0.3 * ((experts["a"][name] - base[name])
                                  + (experts["b"][name] - base[name]))
    assert torch.allclose(result.tensors[name], by_hand, atol=1e-6)
    parts = _written(result, tmp_path).parts
    for index, expert in enumerate(["a", "b"]):
        one_hot = torch.nn.functional.one_hot(torch.tensor(index), 2).float()
        for tensor, per_task in parts.items():
            routed = routed_tensor(result.tensors[tensor], per_task, one_hot)
            assert torch.allclose(routed, experts[expert][tensor], atol=1e-6), tensor


def test_low_rank_parts_are_the_truncated_svd_of_expert_minus_shared(tiny_bert_tasks,
                                                                     tmp_path) -> None:
    _module, _base, experts, _heads, _tasks = tiny_bert_tasks
    result = _merge(tiny_bert_tasks, ["a", "b"], rank=2, steps=5)
    name = "encoder.layer.1.output.dense.weight"  # 16 x 32
    u, v = _written(result, tmp_path).parts[name][1]
    delta = experts["b"][name] - result.tensors[name]
    left, values, right = torch.linalg.svd(delta, full_matrices=False)
    by_hand = left[:, :2] @ torch.diag(values[:2]) @ right[:2]
    assert u.shape == (16, 2) and v.shape == (2, 32)
    assert torch.allclose(u @ v, by_hand, atol=1e-5)


def test_one_expert_routes_fully_to_itself_and_returns_it(tiny_bert_tasks, tmp_path) -> None:
    module, _base, experts, heads, tasks = tiny_bert_tasks
    result = _merge(tiny_bert_tasks, ["a"], rank=1000, steps=3)
    twin = _written(result, tmp_path)
    model = _Headed(module, heads["a"])
    model.encoder.load_state_dict({**module.state_dict(), **result.tensors})
    routed = TwinModel(model, twin, model.head, "encoder.")
    inputs = tasks[0].data.select(torch.arange(4)).inputs
    output = routed(**inputs)
    assert torch.equal(output.routing, torch.ones(4, 1))
    expected = heads["a"](functional_call(module, experts["a"], (), inputs))
    assert torch.allclose(output.logits, expected, atol=1e-5)


def test_twin_is_listed_with_its_parameters_and_validates_them() -> None:
    method = get_learned_method("twin")
    assert method.needs == "unlabelled" and "2406.15479" in method.paper
    assert method.validate({"lambda": 0.5}).scale == 0.5
    with pytest.raises(MethodError, match="rank"):
        method.validate({"rank": 0})
    listing = CliRunner().invoke(cli, ["methods"])
    assert listing.exit_code == 0 and "twin" in listing.output


def test_learn_twin_end_to_end_routes_each_input_as_by_hand(learn_setup, tmp_path) -> None:  # noqa: F811
    root, recipe = learn_setup
    twin = {**recipe, "merge_method": "twin",
            "parameters": {"rank": 1000, "steps": 60, "lr": 0.01}}
    out = tmp_path / "twin"
    result = CliRunner().invoke(cli, ["learn", write(root, twin), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert {"twin.json", "twin.safetensors", "config.json"} <= {p.name for p in out.iterdir()}
    model = supermerge.load_task_model(out, "apple")
    assert isinstance(model, TwinModel)
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "base")
    tokens = tokenizer(["apple red pear", "blue red"], return_tensors="pt", padding=True)
    output = model(**tokens)
    assert torch.allclose(output.routing.sum(-1), torch.ones(2))
    # by hand: each input on shared + sum_t w_t (expert_t - shared), with apple's head
    shared = transformers.BertForSequenceClassification.from_pretrained(out).state_dict()
    expert_states = [transformers.BertForSequenceClassification.from_pretrained(
        root / name).state_dict() for name in ("apple", "red")]
    for row in range(2):
        weights = {name: tensor + sum(
            w * (e[name] - tensor) for w, e in zip(output.routing[row], expert_states,
                                                    strict=True))
            for name, tensor in shared.items()
            if tensor.is_floating_point() and not name.startswith("classifier.")}
        weights.update({k: v for k, v in expert_states[0].items() if k.startswith("classifier.")})
        oracle = transformers.BertForSequenceClassification.from_pretrained(root / "apple")
        oracle.load_state_dict(weights, strict=False)
        one = {k: v[row:row + 1] for k, v in tokens.items()}
        assert torch.allclose(output.logits[row], oracle.eval()(**one).logits[0], atol=1e-4)
    model._hooked = None  # the per-input path gives the same logits
    assert torch.allclose(model(**tokens).logits, output.logits, atol=1e-5)


def test_a_parameter_outside_linear_layers_is_routed_input_by_input() -> None:
    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(2))
            self.head = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.head(x * self.scale)

    torch.manual_seed(0)
    model, router = Scaled(), Router(2, 4, 2)
    parts = {"scale": [(torch.tensor([1.0, 0.0]),), (torch.tensor([0.0, 1.0]),)]}
    routed = TwinModel(model, TwinState(("a", "b"), parts, router, None), model.head)
    x = torch.tensor([[1.0, 2.0], [-3.0, 0.5]])
    output = routed(x)
    for row in range(2):
        w = torch.softmax(router(x[row:row + 1]), -1)[0]  # features: x * shared scale (1)
        by_hand = model.head(x[row] * torch.stack([1 + w[0], 1 + w[1]]))
        assert torch.allclose(output.logits[row], by_hand, atol=1e-6)


def test_learn_twin_refuses_a_bad_rank_before_training(learn_setup, tmp_path) -> None:  # noqa: F811
    root, recipe = learn_setup
    bad = {**recipe, "merge_method": "twin", "parameters": {"rank": 0}}
    out = tmp_path / "o"
    result = CliRunner().invoke(cli, ["learn", write(root, bad), "-o", str(out)])
    assert result.exit_code != 0 and "rank" in result.output and not out.exists()


class _Headed(torch.nn.Module):
    """A pooled encoder and a linear head, named as load_task_model's pooled classifier."""

    def __init__(self, encoder: torch.nn.Module, head: torch.nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head
        self.config = None

    def forward(self, **inputs):
        return self.head(self.encoder(**inputs))


def _written(result, folder):
    """The twin files of a merge result, written to ``folder`` and read back."""
    for name, data in result.files.items():
        (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return read_twin(folder)
