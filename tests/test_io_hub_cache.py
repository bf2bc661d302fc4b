"""Hub ids from the local Hugging Face cache (issue 17, item 5): a model given as
``org/name`` that is no local path opens from huggingface_hub's cache, offline, never
downloading; a model missing from the cache is an error naming the cache folder. The cache
is a fake one built here (HF_HUB_CACHE); no network."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import supermerge
from conftest import make_family
from supermerge.errors import CheckpointError, PlanError
from supermerge.io import open_checkpoint
from supermerge.io.hub import hub_cache_dir, looks_like_hub_id

pytest.importorskip("huggingface_hub")


def cache_model(cache, repo_id, state, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay ``state`` out as huggingface_hub's cache does: blobs, refs/main, snapshots."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    save_file({n: t.contiguous() for n, t in state.items()}, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("supermerge tried the network")

    import huggingface_hub.file_download as fd
    for name in ("http_get", "get_hf_file_metadata", "_request_wrapper"):
        if hasattr(fd, name):
            monkeypatch.setattr(fd, name, no_network)
    return cache


def test_a_hub_id_in_the_cache_opens_offline(hub):
    base, _ = make_family(k=0)
    snapshot = cache_model(hub, "tiny-org/tiny-base", base)
    ckpt = open_checkpoint("tiny-org/tiny-base")
    assert ckpt.model_dir == snapshot
    assert sorted(ckpt.names()) == sorted(base)
    assert torch.equal(ckpt.read("model.norm.weight"), base["model.norm.weight"])
    assert hub_cache_dir() == hub


def test_a_merge_of_cached_hub_ids_and_its_card(hub, tmp_path):
    base, experts = make_family(k=2)
    cache_model(hub, "tiny-org/base", base)
    cache_model(hub, "tiny-org/math", experts[0])
    local = tmp_path / "code.safetensors"
    save_file({n: t.contiguous() for n, t in experts[1].items()}, str(local))
    out = tmp_path / "out"
    supermerge.merge({"merge_method": "task_arithmetic", "base_model": "tiny-org/base",
                      "models": ["tiny-org/math", str(local)]}, out)
    merged = load_file(str(out / "model.safetensors"))
    for name, b in base.items():
        expected = b + (experts[0][name] - b) + (experts[1][name] - b)
        torch.testing.assert_close(merged[name], expected)
    card = (out / "README.md").read_text()
    front = card.split("---\n", 2)[1]
    assert "- tiny-org/base\n- tiny-org/math\n" in front and str(local) not in front
    assert f"`{local}`" in card
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_a_hub_id_missing_from_the_cache_names_the_cache_folder(hub):
    with pytest.raises(CheckpointError, match="nor a model in the Hugging Face cache") as err:
        open_checkpoint("tiny-org/absent")
    assert str(hub) in str(err.value) and "models--tiny-org--absent" in str(err.value)
    assert "hf download tiny-org/absent" in err.value.fix
    with pytest.raises(PlanError, match="tiny-org/absent"):
        supermerge.merge({"merge_method": "linear", "models": ["tiny-org/absent"]},
                         hub.parent / "out")


def test_a_local_folder_wins_over_the_cache_and_paths_are_not_hub_ids(hub, tmp_path):
    base, experts = make_family(k=1)
    cache_model(hub, "org/model", base)
    local = tmp_path / "org" / "model"
    local.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in experts[0].items()},
              str(local / "model.safetensors"))
    (local / "config.json").write_text("{}")
    ckpt = open_checkpoint("org/model")
    assert ckpt.model_dir.resolve() == local.resolve()
    for missing in ["./nothing", "/abs/nothing", "a/b/c", "nothing.safetensors/x/y"]:
        with pytest.raises(CheckpointError, match="checkpoint not found"):
            open_checkpoint(missing)
    assert looks_like_hub_id("gpt2") and not looks_like_hub_id("./gpt2")
