"""Streamed learned merges (``memory: stream``): the coefficients of the in-memory mode,
task vectors kept in a file, blocks built as they run, refusals where it cannot apply."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from click.testing import CliRunner

from supermerge.cli.main import cli
from supermerge.errors import MethodError
from supermerge.learn import MergedModel, Task, TaskData
from supermerge.learn.bases import PREPARE
from supermerge.learn.distill import attach_teachers
from supermerge.learn.errors import LearnError
from supermerge.learn.layerwise import learn_layerwise
from supermerge.learn.merge import SUPERMERGE, supermerge
from supermerge.learn.model import prepare_experts
from supermerge.learn.stream import SpilledVectors
from supermerge.learn.train import learn_coefficients
from supermerge.search.toy import toy_problem

transformers = pytest.importorskip("transformers")


def _fit(module, base, experts, tasks, *, memory, workdir=None, steps=3, objective="labels",
         **options):
    model = MergedModel.from_experts(module, base, experts, memory=memory, workdir=workdir,
                                     **options)
    result = learn_coefficients(model, tasks, objective=objective, steps=steps, eval_every=1,
                                batch_size=4, lr=0.05, holdout=0.0, seed=3)
    return model, result


def _assert_same_fit(ours, theirs) -> None:
    torch.testing.assert_close(ours.raw, theirs.raw)
    assert ours.best_step == theirs.best_step > 0  # the loss fell: W moved
    for a, b in zip(ours.history, theirs.history, strict=True):
        assert a.step == b.step
        torch.testing.assert_close(a.train_loss, b.train_loss)


@pytest.mark.parametrize(("basis", "granularity", "objective"), [
    ("task_vectors", "tensor", "labels"),
    ("tsv", "tensor", "distill"),
    ("task_vectors", "row", "distill"),
    ("tsv", "row", "labels"),
])
def test_streamed_bert_learns_the_coefficients_of_the_in_memory_mode(
        tiny_bert_tasks, tmp_path, basis, granularity, objective) -> None:
    module, base, experts, heads, tasks = tiny_bert_tasks
    if objective == "distill":
        names, _ = prepare_experts(module, base, experts, heads=heads)
        tasks = attach_teachers(module, experts, names, heads, tasks)
    options = {"heads": heads, "granularity": granularity, "prepare": PREPARE[basis],
               "objective": objective}
    _, in_memory = _fit(module, base, experts, tasks, memory="in_memory", **options)
    model, streamed = _fit(module, base, experts, tasks, memory="stream", workdir=tmp_path,
                           **options)
    _assert_same_fit(streamed, in_memory)
    assert isinstance(model._vectors, SpilledVectors)  # nothing stacked in memory
    assert len(list(tmp_path.iterdir())) == 1  # the spill folder, under the workdir
    for name, block in [(n, m) for n, m in module.named_modules() if n.endswith("layer.0")]:
        assert "forward" not in block.__dict__, name  # the blocks' own forward is back
    model._vectors.close()
    assert not list(tmp_path.iterdir())


def tiny_llama_family(k: int = 2):
    """A tied-embedding Llama base, ``k`` perturbed experts and a next-token task each."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=16,
                                      tie_word_embeddings=True)
    module = transformers.LlamaForCausalLM(config).eval()
    base = {k: v.clone() for k, v in module.state_dict().items()}
    experts, tasks = {}, []
    for index in range(k):
        generator = torch.Generator().manual_seed(index)
        experts[f"t{index}"] = {n: v + 0.05 * torch.randn(v.shape, generator=generator)
                                for n, v in base.items()}
        ids = torch.randint(1, 32, (12, 6), generator=generator)
        mask = torch.ones_like(ids)
        mask[:4, 4:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        tasks.append(Task(f"t{index}", TaskData({"input_ids": ids, "attention_mask": mask},
                                                labels), "causal_lm"))
    return module, base, experts, tasks


@pytest.mark.parametrize(("basis", "granularity"), [("task_vectors", "row"), ("tsv", "tensor")])
def test_streamed_causal_lm_learns_the_coefficients_of_the_in_memory_mode(
        tmp_path, basis, granularity) -> None:
    module, base, experts, tasks = tiny_llama_family()
    options = {"granularity": granularity, "prepare": PREPARE[basis]}
    _, in_memory = _fit(module, base, experts, tasks, memory="in_memory", **options)
    model, streamed = _fit(module, base, experts, tasks, memory="stream", workdir=tmp_path,
                           **options)
    _assert_same_fit(streamed, in_memory)
    # the tied embedding is merged outside the blocks; every block tensor inside its block
    assert model._rest == ["model.embed_tokens.weight", "model.norm.weight"]


def test_streamed_forward_without_gradients_equals_the_merged_module(tiny_bert_tasks,
                                                                      tmp_path) -> None:
    module, base, experts, heads, tasks = tiny_bert_tasks
    model = MergedModel.from_experts(module, base, experts, heads=heads, memory="stream",
                                     workdir=tmp_path, init=[0.2, -0.4])
    args, kwargs = tasks[0].data.call_args()
    with torch.no_grad():
        merged = model.merged_parameters()
        oracle = heads["a"](torch.func.functional_call(module, merged, args, kwargs))
        streamed = model(*args, task="a", **kwargs)
    torch.testing.assert_close(streamed, oracle)
    # the merged tensors follow base + sum_i c_i tau_i (checked on one block tensor)
    name = "encoder.layer.1.output.dense.weight"
    expected = base[name] + 0.2 * (experts["a"][name] - base[name]) \
        - 0.4 * (experts["b"][name] - base[name])
    torch.testing.assert_close(merged[name], expected)


def test_memory_stream_is_listed_accepted_and_refused_with_layerwise() -> None:
    listing = CliRunner().invoke(cli, ["methods", "supermerge", "--json"])
    memory = next(p for p in json.loads(listing.stdout)["parameters"] if p["name"] == "memory")
    assert memory["default"] == "in_memory"
    for method in ("supermerge", "adamerging"):
        described = CliRunner().invoke(cli, ["methods", method])
        assert "memory" in described.output and "stream" in described.output
    params = SUPERMERGE.validate({"memory": "stream"})
    assert params.model_options()["memory"] == "stream"
    # select: auto keeps only the configurations streaming can fit (end to end)
    assert [c.layerwise for c in params.configurations().values()] == [False]
    with pytest.raises(MethodError, match="layerwise.*memory stream"):
        SUPERMERGE.validate({"memory": "stream", "layerwise": True, "objective": "distill"})
    with pytest.raises(MethodError, match="memory"):
        SUPERMERGE.validate({"memory": "disk"})


def test_layerwise_fitting_refuses_a_streamed_model(tiny_bert_tasks, tmp_path) -> None:
    module, base, experts, heads, tasks = tiny_bert_tasks
    model = MergedModel.from_experts(module, base, experts, heads=heads, memory="stream",
                                     workdir=tmp_path)
    with pytest.raises(LearnError, match="holds the task vectors in memory"):
        learn_layerwise(model, tasks, steps=1)


@pytest.mark.parametrize("rows", [None, 3])
def test_spilled_merge_follows_the_formula_and_its_gradient_re_reads_the_vectors(
        tmp_path, rows) -> None:
    generator = torch.Generator().manual_seed(0)
    taus = torch.randn(4, 3, 5, dtype=torch.float64, generator=generator)  # K = 4
    other = torch.randn(4, 2, dtype=torch.float64, generator=generator)
    spill = SpilledVectors([("w", (3, 5)), ("b", (2,))], 4, torch.float64, [taus, other],
                           device=torch.device("cpu"), workdir=tmp_path)
    assert [torch.equal(v, t) for v, t in zip(spill.each(0), taus, strict=True)] == [True] * 4
    base = torch.randn(3, 5, dtype=torch.float64, generator=generator)
    c = torch.randn((4, rows) if rows else (4,), dtype=torch.float64, generator=generator,
                    requires_grad=True)
    scale = c.unsqueeze(-1) if rows else c.view(4, 1, 1)
    torch.testing.assert_close(spill.merge(0, base, c), base + (scale * taus).sum(0))
    torch.autograd.gradcheck(lambda coefficients: spill.merge(0, base, coefficients), (c,))
    gradient = torch.randn(3, 5, dtype=torch.float64, generator=generator)
    expected = torch.einsum("krc,rc->kr", taus, gradient) if rows else \
        (taus * gradient).sum((1, 2))
    torch.testing.assert_close(spill.products(0, gradient, rows), expected)
    spill.close()
    assert not list(tmp_path.iterdir())


def test_streamed_hierarchical_merge_learns_every_node_as_in_memory_and_cleans_up(
        tmp_path) -> None:
    fits = {}
    for memory in ("in_memory", "stream"):
        module, experts, toy_tasks = toy_problem(3, seed=2, examples=24)
        tasks = [Task(t.name, TaskData(t.data.inputs, t.data.labels)) for t in toy_tasks]
        (tmp_path / memory).mkdir()
        merge = supermerge(module, module.state_dict(), experts, tasks, hierarchical=True,
                           fan_in=2, steps=4, eval_every=2, lr=0.05, memory=memory,
                           workdir=tmp_path / memory)
        fits[memory] = {node: fit.raw for node, fit in merge.fits.items()}
        del merge
        gc.collect()
        assert not list((tmp_path / memory).iterdir())  # every spill file removed
    assert len(fits["stream"]) == 2  # a level-1 node and the root
    for node, raw in fits["in_memory"].items():
        torch.testing.assert_close(fits["stream"][node], raw)
