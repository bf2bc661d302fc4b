"""LoRA adapters as inputs: the adapter seen through its base (W0 + scale * B @ A), merged
by the streaming engine, checked against hand-computed oracles and peft itself."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import supermerge
from helpers_lora import (
    PREFIX,
    factors,
    linear_lora,
    one_adapter,
    tiny_base,
    tiny_llama_config,
    write_adapter,
)
from supermerge.errors import CheckpointError, PlanError
from supermerge.io import open_checkpoint

Q0, Q1, UP0 = "model.layers.0.q_proj", "model.layers.1.q_proj", "model.layers.0.up_proj"


def merged(out) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def test_task_arithmetic_over_two_adapters_is_the_hand_computed_sum(tmp_path):
    base = tiny_base(tmp_path / "base")
    a1, b1 = factors(6, 6, 2, seed=1)
    a2, b2 = factors(10, 6, 4, seed=2)
    a3, b3 = factors(6, 6, 4, seed=3)
    write_adapter(tmp_path / "ad1", linear_lora(Q0, a1, b1), r=2, alpha=4,
                  base=str(tmp_path / "base"))
    write_adapter(tmp_path / "ad2", {**linear_lora(UP0, a2, b2), **linear_lora(Q0, a3, b3)},
                  r=4, alpha=2)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
              "models": [{"model": str(tmp_path / "ad1"), "parameters": {"weight": 0.7}},
                         {"model": str(tmp_path / "ad2"), "parameters": {"weight": 0.4}}],
              "parameters": {"lambda": 0.5}}
    out = supermerge.merge(recipe, tmp_path / "out").out
    got = merged(out)
    # W0 + lambda * sum_i w_i s_i B_i A_i, s = alpha / r
    expect_q0 = base[f"{Q0}.weight"] + 0.5 * (0.7 * 2.0 * b1 @ a1 + 0.4 * 0.5 * b3 @ a3)
    expect_up0 = base[f"{UP0}.weight"] + 0.5 * 0.4 * 0.5 * b2 @ a2
    torch.testing.assert_close(got[f"{Q0}.weight"], expect_q0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[f"{UP0}.weight"], expect_up0, rtol=1e-5, atol=1e-5)
    for name in set(base) - {f"{Q0}.weight", f"{UP0}.weight"}:
        assert torch.equal(got[name], base[name]), name
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_rslora_rank_and_alpha_patterns_and_adapter_name_segment(tmp_path):
    base = tiny_base(tmp_path / "base")
    a0, b0 = factors(6, 6, 4, seed=1)
    a1, b1 = factors(6, 6, 2, seed=2)
    tensors = {f"{Q0}.lora_A.default.weight": a0, f"{Q0}.lora_B.default.weight": b0,
               f"{Q1}.lora_A.default.weight": a1, f"{Q1}.lora_B.default.weight": b1}
    write_adapter(tmp_path / "ad", tensors, r=4, alpha=8, base=str(tmp_path / "base"),
                  use_rslora=True, rank_pattern={"layers.1.q_proj": 2},
                  alpha_pattern={r"layers\.1\.q_proj": 3})
    view = open_checkpoint(tmp_path / "ad")
    torch.testing.assert_close(view.read(f"{Q0}.weight"),
                               base[f"{Q0}.weight"] + 8 / math.sqrt(4) * b0 @ a0)
    torch.testing.assert_close(view.read(f"{Q1}.weight"),
                               base[f"{Q1}.weight"] + 3 / math.sqrt(2) * b1 @ a1)
    assert view.info(f"{Q0}.weight").shape == (6, 6)
    assert torch.equal(view.read("model.norm.weight"), base["model.norm.weight"])


def test_fan_in_fan_out_embedding_conv_bias_and_saved_modules(tmp_path):
    """GPT-2's Conv1D layout (W [in, out]), embedding LoRA (W [num, dim] += s (B A)^T),
    conv LoRA, a trained LoRA bias and modules_to_save, each against its own formula."""
    base = tiny_base(tmp_path / "base")
    gen = torch.Generator().manual_seed(5)
    # fan_in_fan_out: the base's up_proj is [10, 6] = [in, out]: A [r, 10], B [6, r]
    a_f, b_f = torch.randn(2, 10, generator=gen), torch.randn(6, 2, generator=gen)
    # in the same adapter an ordinary [out, in] layer (peft's nn.Linear under
    # fan_in_fan_out: GPT-2's lm_head) keeps the usual layout, as its shapes say
    a_s, b_s = torch.randn(2, 6, generator=gen), torch.randn(2, 2, generator=gen)
    write_adapter(tmp_path / "fifo", {**linear_lora(UP0, a_f, b_f),
                                      **linear_lora("score", a_s, b_s)},
                  r=2, alpha=2, base=str(tmp_path / "base"), fan_in_fan_out=True)
    view = open_checkpoint(tmp_path / "fifo")
    torch.testing.assert_close(view.read(f"{UP0}.weight"),
                               base[f"{UP0}.weight"] + (b_f @ a_f).T)
    torch.testing.assert_close(view.read("score.weight"), base["score.weight"] + b_s @ a_s)
    assert view.adapter.modules["score.weight"].fan_in_fan_out is False

    emb_a, emb_b = torch.randn(3, 12, generator=gen), torch.randn(6, 3, generator=gen)
    conv_a, conv_b = torch.randn(2, 3, 3, 3, generator=gen), torch.randn(4, 2, 1, 1,
                                                                         generator=gen)
    bias = torch.randn(6, generator=gen)
    score = torch.randn(2, 6, generator=gen)
    a_q, b_q = factors(6, 6, 3, seed=9)
    tensors = {"model.embed_tokens.lora_embedding_A": emb_a,
               "model.embed_tokens.lora_embedding_B": emb_b,
               "model.conv.lora_A.weight": conv_a, "model.conv.lora_B.weight": conv_b,
               **linear_lora(Q0, a_q, b_q), f"{Q0}.lora_B.bias": bias,
               "score.modules_to_save.default.weight": score}
    write_adapter(tmp_path / "mixed", tensors, r=3, alpha=6, base=str(tmp_path / "base"),
                  rank_pattern={"conv": 2}, modules_to_save=["score"])
    view = open_checkpoint(tmp_path / "mixed")
    torch.testing.assert_close(view.read("model.embed_tokens.weight"),
                               base["model.embed_tokens.weight"] + 2.0 * (emb_b @ emb_a).T)
    conv_delta = torch.einsum("or,rikl->oikl", conv_b[:, :, 0, 0], conv_a)
    torch.testing.assert_close(view.read("model.conv.weight"),
                               base["model.conv.weight"] + 3.0 * conv_delta)
    torch.testing.assert_close(view.read(f"{Q0}.weight"), base[f"{Q0}.weight"] + 2 * b_q @ a_q)
    torch.testing.assert_close(view.read(f"{Q0}.bias"), base[f"{Q0}.bias"] + 2 * bias)
    assert torch.equal(view.read("score.weight"), score)
    assert sorted(view.adapter.saved) == ["score.weight"]


def test_half_precision_base_keeps_the_update_unrounded(tmp_path):
    """A bfloat16 base: the header keeps bfloat16, the value read is W0 + s B A in float32
    (rounded to bfloat16 the update would be lost in W0's last bits)."""
    state = {"w.weight": torch.full((4, 4), 8.0).bfloat16()}
    from helpers_io import write_model_dir

    write_model_dir(tmp_path / "base", state)
    a, b = torch.full((1, 4), 1e-3), torch.ones(4, 1)
    write_adapter(tmp_path / "ad", linear_lora("w", a, b), r=1, alpha=1,
                  base=str(tmp_path / "base"))
    view = open_checkpoint(tmp_path / "ad")
    assert view.info("w.weight").dtype == torch.bfloat16
    got = view.read("w.weight")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.full((4, 4), 8.001))


def test_base_plus_adapter_spelling_relative_to_the_recipe(tmp_path, monkeypatch):
    base = tiny_base(tmp_path / "base")
    a, b = factors(6, 6, 2, seed=1)
    write_adapter(tmp_path / "ad", linear_lora(Q0, a, b), r=2, alpha=2)  # names no base
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(
        {"merge_method": "linear", "models": ["base+ad"]}))
    monkeypatch.chdir(tmp_path.parent)  # the halves resolve against the recipe's folder
    out = supermerge.merge(tmp_path / "recipe.yaml", tmp_path / "out").out
    torch.testing.assert_close(merged(out)[f"{Q0}.weight"], base[f"{Q0}.weight"] + b @ a)


def test_recipe_base_differing_from_the_adapters_is_used_with_a_warning(tmp_path, caplog):
    tiny_base(tmp_path / "base")
    other = tiny_base(tmp_path / "other", seed=1)
    a, b = factors(6, 6, 2, seed=1)
    write_adapter(tmp_path / "ad", linear_lora(Q0, a, b), r=2, alpha=2,
                  base=str(tmp_path / "base"))
    with caplog.at_level(logging.WARNING):
        view = open_checkpoint(tmp_path / "ad", base=str(tmp_path / "other"))
    assert str(tmp_path / "base") in caplog.text and str(tmp_path / "other") in caplog.text
    torch.testing.assert_close(view.read(f"{Q0}.weight"), other[f"{Q0}.weight"] + b @ a)


def test_the_bare_adapter_file_is_refused_never_merged_as_the_base(tmp_path):
    tiny_base(tmp_path / "base")
    a, b = factors(6, 6, 2, seed=1)
    write_adapter(tmp_path / "ad", linear_lora(Q0, a, b), r=2, alpha=2,
                  base=str(tmp_path / "base"))
    bare = tmp_path / "ad" / "adapter_model.safetensors"
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(bare)
    assert err.value.file == str(bare) and str(tmp_path / "ad") in err.value.fix
    recipe = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
              "models": [str(bare)], "on_missing": "base"}
    with pytest.raises(PlanError, match="LoRA adapter"):
        supermerge.merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("tensors", "config", "words"), [
    ({"model.layers.0.k_proj.lora_A.weight": torch.ones(2, 6),
      "model.layers.0.k_proj.lora_B.weight": torch.ones(6, 2)}, {},
     ["model.layers.0.k_proj.weight", "does not have", "q_proj"]),
    ({f"{Q0}.lora_A.weight": torch.ones(2, 6), f"{Q0}.lora_B.weight": torch.ones(6, 3)}, {},
     ["rank mismatch", "lora_B"]),
    ({f"{Q0}.lora_A.weight": torch.ones(2, 6)}, {}, ["lora_B", "missing"]),
    ({**linear_lora(Q0, torch.ones(2, 6), torch.ones(6, 2)),
      f"{Q0}.lora_magnitude_vector": torch.ones(6)}, {}, ["DoRA"]),
    (linear_lora(Q0, torch.ones(2, 6), torch.ones(6, 2)), {"use_dora": True}, ["use_dora"]),
    (linear_lora(Q0, torch.ones(2, 6), torch.ones(6, 2)), {"r": 4}, ["rank 2", "r = 4"]),
    (linear_lora(Q0, torch.ones(2, 6), torch.ones(8, 2)), {}, ["[8, 6]", "[6, 6]"]),
    (linear_lora(Q0, torch.ones(2, 6), torch.ones(6, 2)), {"peft_type": "IA3"}, ["IA3"]),
])
def test_bad_adapters_are_refused_from_headers_naming_file_tensor_and_fix(
        tmp_path, tensors, config, words):
    tiny_base(tmp_path / "base")
    folder = write_adapter(tmp_path / "ad", tensors, **{"r": 2, "alpha": 2, **config},
                           base=str(tmp_path / "base"))
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(folder)
    text = str(err.value)
    assert all(w in text for w in words), text
    assert err.value.fix and str(folder) in (err.value.file or "")


def test_an_adapter_without_a_base_asks_for_one(tmp_path):
    write_adapter(tmp_path / "ad", linear_lora(Q0, torch.ones(2, 6), torch.ones(6, 2)), r=2,
                  alpha=2)
    with pytest.raises(CheckpointError, match="names no base") as err:
        open_checkpoint(tmp_path / "ad")
    assert "base_model" in err.value.fix and "BASE+ADAPTER" in err.value.fix


def test_ties_and_dare_stream_over_adapters_and_never_touch_the_inputs(tmp_path):
    tiny_base(tmp_path / "base")
    for i in range(3):
        a, b = factors(6, 6, 2, seed=i)
        write_adapter(tmp_path / f"ad{i}", linear_lora(Q0, a, b), r=2, alpha=2,
                      base=str(tmp_path / "base"))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for method, params in (("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5})):
        recipe = {"merge_method": method, "base_model": str(tmp_path / "base"),
                  "models": [str(tmp_path / f"ad{i}") for i in range(3)],
                  "parameters": {**params, "weight": 1.0}}
        result = supermerge.merge(recipe, tmp_path / method)
        assert result.merged > 0 and (tmp_path / method / "model.safetensors").is_file()
    assert {p: p.read_bytes() for p in before} == before


def test_peft_round_trip_equals_merge_and_unload(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tiny_llama_config(tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                           target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                           rank_pattern={"layers.1.self_attn.q_proj": 2})
    wrapped = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                param.normal_(0, 0.5)  # peft starts one factor at zero: no update at all
    wrapped.save_pretrained(tmp_path / "ad")
    expected = wrapped.merge_and_unload().state_dict()

    recipe = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
              "models": [str(tmp_path / "ad")], "parameters": {"lambda": 1.0}}
    got = merged(supermerge.merge(recipe, tmp_path / "out").out)
    assert set(got) == set(expected)
    worst = max(float((got[n] - expected[n]).abs().max()) for n in got)
    assert worst < 1e-5, worst
    changed = [n for n in got if not torch.equal(got[n], load_file(
        tmp_path / "base" / "model.safetensors")[n])]
    assert len(changed) == 2 * 3 + 1  # q, v, down in 2 layers, and the embedding


def test_raw_peft_prefix_is_required_only_as_written(tmp_path):
    """Keys saved without ``base_model.model.`` (some tools strip it) read the same."""
    base, folder, update = one_adapter(tmp_path, Q0)
    stored = load_file(folder / "adapter_model.safetensors")
    save_file({k.removeprefix(PREFIX): v for k, v in stored.items()},
              folder / "adapter_model.safetensors")
    torch.testing.assert_close(open_checkpoint(folder).read(f"{Q0}.weight"),
                               base[f"{Q0}.weight"] + update)


def test_an_output_inside_either_half_of_base_plus_adapter_is_refused(tmp_path):
    tiny_base(tmp_path / "base")
    write_adapter(tmp_path / "ad", linear_lora(Q0, *factors(6, 6, 2, seed=1)), r=2, alpha=2)
    recipe = {"merge_method": "linear", "models": [f"{tmp_path / 'base'}+{tmp_path / 'ad'}"]}
    for out in (tmp_path / "ad" / "merged", tmp_path / "base" / "merged"):
        with pytest.raises(PlanError, match="input"):
            supermerge.merge(recipe, out)
        assert not out.exists()


def test_an_older_adapter_model_bin_reads_the_same(tmp_path):
    base, folder, update = one_adapter(tmp_path, Q0)
    stored = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(stored, folder / "adapter_model.bin")
    view = open_checkpoint(folder)
    assert view.adapter.weights.name == "adapter_model.bin"
    torch.testing.assert_close(view.read(f"{Q0}.weight"), base[f"{Q0}.weight"] + update)
    with pytest.raises(CheckpointError, match="LoRA adapter"):
        open_checkpoint(folder / "adapter_model.bin")
