"""LoRA adapters as output (`output: adapter`): the merged update factored by truncated SVD
into a PEFT adapter folder, with the SVD tail reported as each tensor's error bound."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import supermerge
from conftest import make_family, save_family
from helpers_io import write_model_dir
from helpers_lora import factors, linear_lora, tiny_base, tiny_llama_config, write_adapter
from supermerge.engine import adapter as adapter_module
from supermerge.errors import OutputError, PlanError
from supermerge.io import open_checkpoint
from supermerge.methods.primitives import low_rank

Q0, UP0 = "model.layers.0.q_proj", "model.layers.0.up_proj"


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]


def test_low_rank_keeps_the_top_singular_values_and_reports_the_tail():
    u, v = orthonormal(7, 4, 0), orthonormal(5, 4, 1)
    s = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    matrix = u @ torch.diag(s) @ v.T
    got = low_rank(matrix, 2)
    assert got.p.shape == (7, 2) and got.q.shape == (2, 5)
    torch.testing.assert_close(got.p @ got.q, u[:, :2] @ torch.diag(s[:2]) @ v[:, :2].T)
    assert got.energy == pytest.approx(13 / 14.25)
    assert got.relative_error == pytest.approx(math.sqrt(1.25 / 14.25))
    assert got.norm == pytest.approx(math.sqrt(14.25))
    padded = low_rank(matrix, 6)  # more than min(m, n): zero components
    assert padded.p.shape == (7, 6) and padded.relative_error == pytest.approx(0, abs=1e-12)
    torch.testing.assert_close(padded.p @ padded.q, matrix)
    zero = low_rank(torch.zeros(3, 4), 2)
    assert (zero.energy, zero.relative_error, zero.norm) == (1.0, 0.0, 0.0)


def test_dense_merge_as_adapter_factors_weights_saves_whole_norms_reports_biases(tmp_path):
    base, experts = make_family(k=2, seed=3)
    base_path, paths = save_family(tmp_path / "in", base, experts)
    write_model_dir(tmp_path / "base", base)  # a folder: the adapter names it as its base
    recipe = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
              "models": [str(p) for p in paths], "parameters": {"lambda": 0.5},
              "output": "adapter", "rank": 3}
    result = supermerge.merge(recipe, tmp_path / "ad")
    out = result.out
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (3, 3, "LORA")
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    assert config["target_modules"] == ["model.embed_tokens", "model.layers.0.mlp",
                                        "model.layers.1.mlp"]
    assert config["modules_to_save"] == ["model.norm"]
    stored = load_file(out / "adapter_model.safetensors")
    assert stored["base_model.model.model.layers.0.mlp.lora_A.weight"].shape == (3, 8)
    assert stored["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (3, 16)
    report = result.adapter
    assert sorted(n for n, _ in report.dropped) == ["model.layers.0.mlp.bias",
                                                    "model.layers.1.mlp.bias"]
    # read back through the adapter reader: the base + B A, off the dense merge by exactly
    # the reported relative error of each tensor
    dense = {n: base[n] + 0.5 * (experts[0][n] - base[n] + experts[1][n] - base[n])
             for n in base}
    view = open_checkpoint(out)
    for f in report.factored:
        delta = dense[f.name] - base[f.name]
        err = torch.linalg.vector_norm(view.read(f.name) - dense[f.name])
        assert float(err / torch.linalg.vector_norm(delta)) == pytest.approx(
            f.relative_error, rel=1e-3, abs=1e-6)
        assert f.relative_error > 0.05  # rank 3 of 8: a real tail
    torch.testing.assert_close(view.read("model.norm.weight"), dense["model.norm.weight"])
    assert torch.equal(view.read("model.layers.0.mlp.bias"), base["model.layers.0.mlp.bias"])
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "relative error" in card
    assert "model.layers.0.mlp.bias" in card and "model.norm" in card


def test_merging_adapters_to_an_adapter_is_exact_at_the_summed_rank(tmp_path):
    base = tiny_base(tmp_path / "base")
    a1, b1 = factors(6, 6, 2, seed=1)
    a2, b2 = factors(6, 6, 2, seed=2)
    write_adapter(tmp_path / "ad1", linear_lora(Q0, a1, b1), r=2, alpha=2)
    write_adapter(tmp_path / "ad2", linear_lora(Q0, a2, b2), r=2, alpha=4)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
              "models": [str(tmp_path / "ad1"), str(tmp_path / "ad2")],
              "output": "adapter", "rank": 4}
    result = supermerge.merge(recipe, tmp_path / "out")
    assert [f.name for f in result.adapter.factored] == [f"{Q0}.weight"]
    assert result.adapter.factored[0].relative_error < 1e-5
    expected = base[f"{Q0}.weight"] + b1 @ a1 + 2 * b2 @ a2
    torch.testing.assert_close(open_checkpoint(result.out).read(f"{Q0}.weight"), expected,
                               rtol=1e-5, atol=1e-5)
    assert json.loads((result.out / "adapter_config.json").read_text())["target_modules"] == [
        Q0]


def test_adapter_output_is_checked_before_any_work_and_never_half_written(tmp_path,
                                                                          monkeypatch):
    base = tiny_base(tmp_path / "base")
    write_adapter(tmp_path / "ad", linear_lora(Q0, *factors(6, 6, 2, seed=1)), r=2, alpha=2)
    models = [f"{tmp_path / 'base'}+{tmp_path / 'ad'}"]
    with pytest.raises(PlanError, match="no base model"):
        supermerge.merge({"merge_method": "linear", "models": models, "output": "adapter",
                          "rank": 2}, tmp_path / "o")
    with pytest.raises(PlanError, match="positive integer `rank`"):
        supermerge.merge({"merge_method": "linear", "base_model": str(tmp_path / "base"),
                          "models": models, "output": "adapter"}, tmp_path / "o")
    with pytest.raises(PlanError, match="per-task masks"):
        supermerge.merge({"merge_method": "tall_masks", "base_model": str(tmp_path / "base"),
                          "models": models * 2, "output": "adapter", "rank": 2},
                         tmp_path / "o")
    with pytest.raises(OutputError, match="would be empty"):
        supermerge.merge({"merge_method": "task_arithmetic",
                          "base_model": str(tmp_path / "base"), "models": models,
                          "parameters": {"lambda": 0.0}, "output": "adapter", "rank": 2},
                         tmp_path / "o")

    def broken(matrix, rank, **options):
        raise RuntimeError("SVD did not converge")

    monkeypatch.setattr(adapter_module, "low_rank", broken)
    with pytest.raises(RuntimeError):
        supermerge.merge({"merge_method": "task_arithmetic",
                          "base_model": str(tmp_path / "base"), "models": models,
                          "output": "adapter", "rank": 2}, tmp_path / "o")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "base"]
    assert base  # the inputs are untouched: read again below
    assert torch.equal(load_file(tmp_path / "base" / "model.safetensors")[f"{Q0}.weight"],
                       base[f"{Q0}.weight"])


def test_peft_loads_the_merged_adapter_and_it_matches_our_dense_merge(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=16, num_labels=2)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "base")
    for i, targets in enumerate((["query", "value"], ["query", "dense"])):
        torch.manual_seed(i + 1)
        model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base")
        wrapped = peft.get_peft_model(model, peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, modules_to_save=["classifier"]))
        with torch.no_grad():
            for name, param in wrapped.named_parameters():
                if "lora_B" in name or "modules_to_save" in name:
                    param.normal_(0, 0.2)
        wrapped.save_pretrained(tmp_path / f"ad{i}")
    recipe = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
              "models": [str(tmp_path / "ad0"), str(tmp_path / "ad1")],
              "parameters": {"lambda": 0.5}}
    dense = load_file(supermerge.merge(recipe, tmp_path / "dense").out / "model.safetensors")
    result = supermerge.merge({**recipe, "output": "adapter", "rank": 8}, tmp_path / "out")
    assert result.adapter.modules_to_save == ["classifier"]
    assert max(f.relative_error for f in result.adapter.factored) < 1e-5  # 4 + 4 <= 8

    base_model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base")
    loaded = peft.PeftModel.from_pretrained(base_model, result.out).merge_and_unload()
    state = loaded.state_dict()
    worst = max(float((state[n] - dense[n]).abs().max()) for n in dense if n in state)
    assert worst < 1e-5, worst
    low = supermerge.merge({**recipe, "output": "adapter", "rank": 2}, tmp_path / "low")
    assert 0.05 < low.adapter.worst.relative_error < 1 and low.adapter.energy < 1


def test_cli_merge_prints_the_adapters_energy_and_json_carries_the_bounds(tmp_path):
    import yaml
    from click.testing import CliRunner

    from supermerge.cli.main import cli

    tiny_base(tmp_path / "base")
    write_adapter(tmp_path / "ad", linear_lora(Q0, *factors(6, 6, 3, seed=1)), r=3, alpha=3)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": "base",
                                      "models": ["base+ad"], "output": "adapter", "rank": 1}))
    runner = CliRunner()
    result = runner.invoke(cli, ["merge", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "LoRA adapter: 1 tensor(s) at rank 1" in result.output
    assert f"({Q0}.weight)" in result.output
    result = runner.invoke(cli, ["merge", str(recipe), "-o", str(tmp_path / "out2"), "--json"])
    document = json.loads(result.stdout)
    assert document["adapter"]["rank"] == 1
    error = document["adapter"]["tensors"][0]["relative_error"]
    assert 0 < error < 1 and document["adapter"]["energy"] == pytest.approx(1 - error**2)


# --- supermerge extract ------------------------------------------------------------------


def test_extract_recovers_a_low_rank_fine_tune_and_reports_its_tail(tmp_path):
    """tuned = base + U diag(s) V^T with s = (3, 2, 1, 0.5) on one weight, a norm shifted:
    rank 2 keeps (9 + 4) / 14.25 of the energy with relative error sqrt(1.25 / 14.25)."""
    from click.testing import CliRunner

    from supermerge.cli.main import cli

    base = tiny_base(tmp_path / "base")
    u, v = orthonormal(10, 4, 3).float(), orthonormal(6, 4, 4).float()
    update = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5])) @ v.T
    tuned = {**base, f"{UP0}.weight": base[f"{UP0}.weight"] + update,
             "model.norm.weight": base["model.norm.weight"] + 0.25}
    write_model_dir(tmp_path / "tuned", tuned)
    result = supermerge.extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "lora",
                                rank=2)
    (factor,) = result.adapter.factored
    assert factor.name == f"{UP0}.weight"
    assert factor.energy == pytest.approx(13 / 14.25, rel=1e-5)
    assert factor.relative_error == pytest.approx(math.sqrt(1.25 / 14.25), rel=1e-4)
    assert result.adapter.modules_to_save == ["model.norm"]
    view = open_checkpoint(tmp_path / "lora")
    torch.testing.assert_close(view.read(f"{UP0}.weight"), base[f"{UP0}.weight"]
                               + u[:, :2] @ torch.diag(torch.tensor([3.0, 2.0])) @ v[:, :2].T,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(view.read("model.norm.weight"), tuned["model.norm.weight"])

    out = CliRunner().invoke(cli, ["extract", str(tmp_path / "base"), str(tmp_path / "tuned"),
                                   "-o", str(tmp_path / "lora4"), "--rank", "4"])
    assert out.exit_code == 0, out.output
    assert "100.00% of the update's energy captured" in out.output
    assert "stored whole (modules_to_save): model.norm" in out.output


def test_extract_refuses_mismatched_models_before_reading_a_weight(tmp_path):
    tiny_base(tmp_path / "base")
    write_model_dir(tmp_path / "other", {"x.weight": torch.ones(3, 3)})
    with pytest.raises(PlanError, match="missing"):
        supermerge.extract(tmp_path / "base", tmp_path / "other", tmp_path / "lora", rank=2)
    assert not (tmp_path / "lora").exists()


def test_extracted_adapter_loads_in_peft_and_equals_the_rank_r_fine_tune(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tiny_llama_config()
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "tuned")
    result = supermerge.extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "lora",
                                rank=4)
    assert 0 < result.adapter.energy < 1
    fresh = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    merged = peft.PeftModel.from_pretrained(fresh, tmp_path / "lora").merge_and_unload()
    ours = open_checkpoint(tmp_path / "lora")
    state = merged.state_dict()
    worst = max(float((state[n] - ours.read(n)).abs().max()) for n in ours.names()
                if n in state)
    assert worst < 1e-5, worst
    tuned = load_file(tmp_path / "tuned" / "model.safetensors")
    assert torch.equal(state["model.norm.weight"], tuned["model.norm.weight"])


def test_randomized_low_rank_is_seeded_near_optimal_and_reports_its_exact_error():
    gen = torch.Generator().manual_seed(0)
    u, v = orthonormal(60, 40, 5), orthonormal(50, 40, 6)
    s = torch.tensor([0.7**i for i in range(40)], dtype=torch.float64)
    matrix = (u @ torch.diag(s) @ v.T).float()
    exact = low_rank(matrix, 4)
    fast = low_rank(matrix, 4, generator=torch.Generator().manual_seed(1))
    again = low_rank(matrix, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fast.p, again.p) and torch.equal(fast.q, again.q)
    actual = float(torch.linalg.vector_norm(matrix - fast.p @ fast.q)
                   / torch.linalg.vector_norm(matrix))
    assert fast.relative_error == pytest.approx(actual, rel=1e-3)
    assert exact.relative_error <= fast.relative_error <= 1.01 * exact.relative_error
    assert fast.energy == pytest.approx(1 - fast.relative_error**2, abs=1e-6)
    low = torch.randn(60, 3, generator=gen) @ torch.randn(3, 50, generator=gen)
    assert low_rank(low, 4, generator=torch.Generator().manual_seed(2)).relative_error < 1e-5


def test_extract_with_randomized_svd_through_the_cli(tmp_path):
    from click.testing import CliRunner

    from supermerge.cli.main import cli

    gen = torch.Generator().manual_seed(7)
    base = {"w.weight": torch.randn(40, 30, generator=gen)}
    tuned = {"w.weight": base["w.weight"] + 0.1 * torch.randn(40, 30, generator=gen)}
    write_model_dir(tmp_path / "base", base)
    write_model_dir(tmp_path / "tuned", tuned)
    runner = CliRunner()
    reported = {}
    for svd, out in (("exact", "e"), ("randomized", "r1"), ("randomized", "r2")):
        result = runner.invoke(cli, ["extract", str(tmp_path / "base"), str(tmp_path / "tuned"),
                                     "-o", str(tmp_path / out), "-r", "2", "--svd", svd,
                                     "--json"])
        assert result.exit_code == 0, result.output
        reported[out] = json.loads(result.stdout)["adapter"]["tensors"][0]["relative_error"]
    r1 = load_file(tmp_path / "r1" / "adapter_model.safetensors")
    r2 = load_file(tmp_path / "r2" / "adapter_model.safetensors")
    assert all(torch.equal(r1[k], r2[k]) for k in r1)  # seeded: the same bytes every run
    delta = tuned["w.weight"] - base["w.weight"]
    for out in ("e", "r1"):
        read = open_checkpoint(tmp_path / out).read("w.weight")
        actual = float(torch.linalg.vector_norm(read - tuned["w.weight"])
                       / torch.linalg.vector_norm(delta))
        assert reported[out] == pytest.approx(actual, rel=1e-3)
    assert reported["e"] < reported["r1"] < 1  # random noise: no rank 2 is exact
