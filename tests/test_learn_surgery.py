"""Representation Surgery (``surgery``): the module by hand, its training, and `supermerge
learn` end to end (as a method and as `surgery: true` on another method's merge)."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

import supermerge
from supermerge.cli.main import cli
from supermerge.errors import MethodError
from supermerge.learn.features import feature_site, head_features
from supermerge.learn.registry import get_learned_method
from supermerge.learn.surgery import Surgery, read_surgery, surgery_merge, train_surgery
from test_learn_cli import learn_setup, write  # noqa: F401  (a module fixture)

transformers = pytest.importorskip("transformers")


def test_surgery_module_subtracts_its_relu_bottleneck_by_hand() -> None:
    surgery = Surgery(2, 2)
    assert torch.equal(surgery(torch.tensor([[2.0, 3.0]])), torch.tensor([[2.0, 3.0]]))  # up = 0
    surgery.load_state_dict({"down.weight": torch.tensor([[1.0, 0.0], [0.0, -1.0]]),
                             "up.weight": torch.tensor([[0.5, 0.0], [1.0, 0.0]])})
    # down z = [2, -3] -> relu [2, 0] -> up [1, 2]; z - [1, 2] = [1, 1]
    assert torch.equal(surgery(torch.tensor([[2.0, 3.0]])), torch.tensor([[1.0, 1.0]]))


def test_training_removes_a_bias_the_merged_features_carry() -> None:
    generator = torch.Generator().manual_seed(0)
    expert = torch.randn(64, 8, generator=generator)
    merged = expert + torch.tensor([1.0, -2.0, 0, 0, 0, 0, 0, 0.5])  # a representation bias
    trained = train_surgery(merged, expert, rank=4, steps=300, lr=0.01)
    before = (merged - expert).abs().mean()
    after = (trained(merged) - expert).abs().mean().detach()
    assert after < 0.3 * before


def test_one_expert_at_lambda_one_needs_no_surgery(tiny_bert_tasks) -> None:
    module, _base, experts, heads, tasks = tiny_bert_tasks
    result = surgery_merge(module, {"a": experts["a"]}, tasks[:1], heads={"a": heads["a"]},
                           scale=1.0, steps=20, lr=0.01)
    tensors = safetensors.torch.load(result.files["surgery.safetensors"])
    assert torch.equal(tensors["0.up"], torch.zeros_like(tensors["0.up"]))  # identity kept
    name = "encoder.layer.0.output.dense.weight"
    assert torch.allclose(result.tensors[name], experts["a"][name], atol=1e-6)


def test_surgered_features_are_closer_to_each_expert(tiny_bert_tasks, tmp_path) -> None:
    module, _base, experts, heads, tasks = tiny_bert_tasks
    result = surgery_merge(module, experts, tasks, heads=heads, steps=300, lr=0.01, rank=8)
    for name, data in result.files.items():
        (tmp_path / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    modules = read_surgery(tmp_path).modules
    weights = {**module.state_dict(), **result.tensors}
    for task in tasks:
        site = feature_site(module, None, heads[task.name])
        merged = head_features(module, weights, site, heads[task.name], task)
        expert = head_features(module, experts[task.name], site, heads[task.name], task)
        surgered = modules[task.name](merged).detach()
        assert (surgered - expert).abs().mean() < (merged - expert).abs().mean(), task.name


def test_surgery_is_listed_and_validates_its_parameters() -> None:
    method = get_learned_method("surgery")
    assert method.needs == "unlabelled" and "2402.02705" in method.paper
    assert method.validate({"lambda": 0.5, "merge": "ties"}).scale == 0.5
    with pytest.raises(MethodError, match="rank"):
        method.validate({"rank": 0})
    listing = CliRunner().invoke(cli, ["methods"])
    assert listing.exit_code == 0 and "surgery" in listing.output


def test_learn_with_surgery_applies_each_tasks_module_before_its_head(learn_setup,  # noqa: F811
                                                                      tmp_path) -> None:
    root, recipe = learn_setup
    fisher = {**recipe, "merge_method": "fisher", "parameters": {},
              "surgery": {"steps": 40, "lr": 0.01, "rank": 4}}
    out = tmp_path / "fisher-surgery"
    result = CliRunner().invoke(cli, ["learn", write(root, fisher), "-o", str(out)])
    assert result.exit_code == 0, result.output
    tensors = safetensors.torch.load_file(out / "surgery.safetensors")
    model = supermerge.load_task_model(out, "red")
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "base")
    tokens = tokenizer(["apple red pear", "blue red"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**tokens).logits
        pooled = model.bert(**tokens).pooler_output
        down, up = tensors["1.down"], tensors["1.up"]  # red is the second task
        surgered = pooled - torch.relu(pooled @ down.T) @ up.T
        by_hand = torch.nn.functional.linear(surgered, model.classifier.weight,
                                             model.classifier.bias)
    assert not torch.equal(up, torch.zeros_like(up))
    assert torch.allclose(logits, by_hand, atol=1e-5)


def test_learn_surgery_method_and_bad_surgery_parameters(learn_setup, tmp_path) -> None:  # noqa: F811
    root, recipe = learn_setup
    method = {**recipe, "merge_method": "surgery", "parameters": {"steps": 10}}
    out = tmp_path / "surgery"
    result = CliRunner().invoke(cli, ["learn", write(root, method), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert set(read_surgery(out).modules) == {"apple", "red"}
    bad = {**recipe, "merge_method": "fisher", "parameters": {}, "surgery": {"rank": 0}}
    result = CliRunner().invoke(cli, ["learn", write(root, bad), "-o", str(tmp_path / "o")])
    assert result.exit_code != 0 and "rank" in result.output
    assert not (tmp_path / "o").exists()


def test_supermerge_surgery_repairs_a_model_merged_by_any_method(learn_setup,  # noqa: F811
                                                                   tmp_path) -> None:
    root, recipe = learn_setup
    merged = tmp_path / "ta"
    supermerge.merge({"merge_method": "task_arithmetic", "base_model": str(root / "base"),
                      "models": [{"model": str(root / "apple")}, {"model": str(root / "red")}],
                      "parameters": {"lambda": 0.5}}, merged)
    learn = {**recipe, "merge_method": "fisher", "parameters": {},
             "surgery": {"steps": 20, "lr": 0.01}}
    out = tmp_path / "repaired"
    result = CliRunner().invoke(cli, ["surgery", str(merged), "--recipe", write(root, learn),
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    before = safetensors.torch.load_file(merged / "model.safetensors")
    after = safetensors.torch.load_file(out / "model.safetensors")
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(before[name], after[name])  # the merge itself is kept as it is
    assert set(read_surgery(out).modules) == {"apple", "red"}
    assert supermerge.load_task_model(out, "apple")(**{"input_ids": torch.tensor([[1, 2]])}
                                                    ).logits.shape == (1, 2)
    wrong = CliRunner().invoke(cli, ["surgery", str(root / "base" / "config.json"), "--recipe",
                                     write(root, learn), "-o", str(tmp_path / "x")])
    assert wrong.exit_code != 0 and not (tmp_path / "x").exists()
