"""Per-task merges end to end: supermerge.merge writes the shared model, the bit masks and
task_state.json; load_task_state rebuilds each task's model exactly as computed in memory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import supermerge
from conftest import make_family, recipe, save_family
from supermerge.engine import load_task_state, read_task_state
from supermerge.engine.task_state import TASK_STATE_FILE, TaskStateWriter, mask_name, unpack_mask
from supermerge.errors import CheckpointError, InputValueError
from supermerge.methods import emr, tall_masks


def shared_model(out):
    tensors = {}
    for file in sorted(out.glob("model*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def flat(state):
    return torch.cat([t.reshape(-1) for t in state.values()])


def emr_oracle(base, experts):
    """Per tensor: (shared, masks); rescalers from the whole model flattened into one vector
    (the paper's sums over every weight)."""
    whole = emr(flat(base), [flat(e) for e in experts])
    per_tensor = {n: emr(b, [e[n] for e in experts]) for n, b in base.items()}
    return per_tensor, whole.scales


def test_tall_masks_end_to_end(family, tmp_path):
    base, experts, base_path, paths = family
    out = tmp_path / "out"
    rows = [{"model": str(p), "parameters": {"tall_lambda": lam}}
            for p, lam in zip(paths, [0.2, 0.4, 1.0], strict=True)]
    supermerge.merge(recipe("tall_masks", base_path, paths, models=rows), out)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "model.safetensors", "supermerge_recipe.yaml", "task_state.json",
        TASK_STATE_FILE]
    merged = shared_model(out)
    lambdas = [{"tall_lambda": lam} for lam in (0.2, 0.4, 1.0)]
    oracle = {n: tall_masks(b, [e[n] for e in experts], per_model=lambdas)
              for n, b in base.items()}
    for name, expected in oracle.items():  # the shared model is task arithmetic
        assert torch.equal(merged[name], expected.shared), name
        torch.testing.assert_close(merged[name], base[name] + sum(e[name] - base[name]
                                                                  for e in experts))
    masks = load_file(str(out / TASK_STATE_FILE))
    assert len(masks) == 3 * len(base)
    for t in range(3):
        rebuilt = load_task_state(out, t)
        assert set(rebuilt) == set(base)
        for name, b in base.items():
            stored = unpack_mask(masks[mask_name(t, name)], b.shape)
            assert torch.equal(stored, oracle[name].masks[t]), (t, name)
            assert torch.equal(rebuilt[name], oracle[name].task(b, t)), (t, name)
    state = json.loads((out / "task_state.json").read_text())
    assert state["method"] == "tall_masks" and state["base_model"] == str(base_path)
    assert [(t["name"], t["scale"]) for t in state["tasks"]] == [(str(p), 1.0) for p in paths]
    card = (out / "README.md").read_text()
    assert "needs task ids" in card and "load_task_state" in card


def test_emr_end_to_end_uses_whole_model_rescalers(family, tmp_path):
    base, experts, base_path, paths = family
    out = tmp_path / "out"
    supermerge.merge(recipe("emr", base_path, paths), out, threads=3)
    per_tensor, scales = emr_oracle(base, experts)
    state = read_task_state(out)
    assert state.method == "emr" and state.tasks == tuple(str(p) for p in paths)
    assert state.scales == pytest.approx(scales, rel=1e-9)
    assert all(s != 1.0 for s in state.scales)
    merged = shared_model(out)
    for name, expected in per_tensor.items():
        assert torch.equal(merged[name], expected.shared), name
    for t in range(3):
        rebuilt = load_task_state(out, t)
        for name, b in base.items():
            unified = per_tensor[name].shared - b
            expected = b + scales[t] * per_tensor[name].masks[t] * unified  # the paper's theta_t
            torch.testing.assert_close(rebuilt[name], expected, msg=f"{t} {name}")


def test_tasks_by_name_and_base_as_a_state_dict(family, tmp_path):
    base, _, base_path, paths = family
    out = tmp_path / "out"
    supermerge.merge(recipe("emr", base_path, paths), out)
    by_index = load_task_state(out, 1)
    for task in (str(paths[1]), "expert1.safetensors", "expert1"):
        rebuilt = load_task_state(out, task, base=base)
        assert all(torch.equal(rebuilt[n], by_index[n]) for n in base), task
    with pytest.raises(CheckpointError, match="no task 'expert9'") as err:
        load_task_state(out, "expert9")
    assert "0: " in err.value.fix and "expert2" in err.value.fix
    for bad in (3, -1, True):
        with pytest.raises(CheckpointError, match="no task"):
            load_task_state(out, bad)
    with pytest.raises(CheckpointError, match="base state dict has no tensor"):
        load_task_state(out, 0, base={"x": torch.ones(1)})


def test_an_ordinary_merge_has_no_task_state(family, tmp_path):
    _, _, base_path, paths = family
    out = tmp_path / "out"
    supermerge.merge(recipe("task_arithmetic", base_path, paths), out)
    assert not (out / TASK_STATE_FILE).exists() and not (out / "task_state.json").exists()
    assert "task ids" not in (out / "README.md").read_text()
    with pytest.raises(CheckpointError, match="not the output of a per-task merge"):
        load_task_state(out, 0)


def test_integer_buffers_bf16_output_and_vocabulary_rows(tmp_path):
    """Integer tensors are copied and get no mask; a smaller expert vocabulary merges the
    common rows only (every task keeps the base's other rows); bf16 output stays bf16."""
    base, experts = make_family(k=2)
    base["model.position_ids"] = torch.arange(6).reshape(2, 3)
    for e in experts:
        e["model.position_ids"] = base["model.position_ids"].clone()
    experts[1]["model.embed_tokens.weight"] = experts[1]["model.embed_tokens.weight"][:12]
    base_path, paths = save_family(tmp_path / "in", base, experts)
    out = tmp_path / "out"
    supermerge.merge(recipe("tall_masks", base_path, paths, dtype="bfloat16",
                            parameters={"tall_lambda": 0.4}), out)
    masks = load_file(str(out / TASK_STATE_FILE))
    assert not any("position_ids" in n for n in masks)
    merged = shared_model(out)
    emb = "model.embed_tokens.weight"
    for t in range(2):
        rebuilt = load_task_state(out, t)
        assert torch.equal(rebuilt["model.position_ids"], base["model.position_ids"])
        assert rebuilt[emb].dtype == torch.bfloat16
        assert torch.equal(rebuilt[emb][12:], base[emb][12:].bfloat16())
        head = tall_masks(base[emb][:12], [e[emb][:12] for e in experts], tall_lambda=0.4)
        expected = torch.where(head.masks[t], head.shared.bfloat16(), base[emb][:12].bfloat16())
        assert torch.equal(merged[emb][:12], head.shared.bfloat16())
        assert torch.equal(rebuilt[emb][:12], expected)


def test_a_failure_mid_merge_publishes_nothing(tmp_path):
    base, experts = make_family(k=2)
    experts[1]["model.layers.1.mlp.weight"][0, 0] = float("nan")
    base_path, paths = save_family(tmp_path / "in", base, experts)
    out = tmp_path / "out"
    with pytest.raises(InputValueError, match="model.layers.1.mlp.weight"):
        supermerge.merge(recipe("tall_masks", base_path, paths), out)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_failure_after_the_masks_publishes_nothing(family, tmp_path, monkeypatch):
    _, _, base_path, paths = family
    out = tmp_path / "out"
    supermerge.merge(recipe("task_arithmetic", base_path, paths), out)
    before = shared_model(out)

    def broken(self, writer):
        raise OSError("disk gone")

    monkeypatch.setattr(TaskStateWriter, "finish", broken)
    with pytest.raises(OSError, match="disk gone"):
        supermerge.merge(recipe("emr", base_path, paths), out, overwrite=True)
    # the old model is untouched, no masks were published, no temporary is left
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "model.safetensors", "supermerge_recipe.yaml"]
    assert all(torch.equal(t, before[n]) for n, t in shared_model(out).items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_a_mask_that_does_not_fit_is_a_clear_error(family, tmp_path):
    _, _, base_path, paths = family
    out = tmp_path / "out"
    supermerge.merge(recipe("tall_masks", base_path, paths), out)
    masks = load_file(str(out / TASK_STATE_FILE))
    name = mask_name(0, "model.norm.weight")
    masks[name] = torch.zeros(5, dtype=torch.uint8)
    save_file(masks, str(out / TASK_STATE_FILE))
    with pytest.raises(CheckpointError, match="does not fit") as err:
        load_task_state(out, 0)
    assert err.value.tensor == name
