"""Reading checkpoints: every format, header-only metadata, bad input, concurrent reads."""

from __future__ import annotations

import json
import os
import random
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers_io import assert_matches, sample_state_dict, write_model_dir
from supermerge.errors import CheckpointError
from supermerge.io import TensorInfo, open_checkpoint, tied_aliases

# --- every format round-trips ------------------------------------------------------------


def test_single_safetensors_file(tmp_path):
    state = sample_state_dict()
    save_file(state, tmp_path / "m.safetensors")
    with open_checkpoint(tmp_path / "m.safetensors") as ckpt:
        assert_matches(ckpt, state)
        assert ckpt.model_dir is None and ckpt.config is None
        assert ckpt.path == tmp_path / "m.safetensors"


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("shards", [1, 3])
def test_model_directory(tmp_path, fmt, shards):
    state = sample_state_dict()
    directory = write_model_dir(tmp_path / "model", state, shards=shards, fmt=fmt,
                                config={"model_type": "llama", "hidden_size": 8})
    with open_checkpoint(directory) as ckpt:
        assert_matches(ckpt, state)
        assert ckpt.model_dir == directory
        assert ckpt.config == {"model_type": "llama", "hidden_size": 8}
        if shards > 1:
            assert len({ckpt.info(n).file for n in ckpt.names()}) == shards


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_torch_state_dict_file(tmp_path, suffix):
    state = sample_state_dict()
    torch.save(state, tmp_path / f"m{suffix}")
    with open_checkpoint(tmp_path / f"m{suffix}") as ckpt:
        assert_matches(ckpt, state)
        assert ckpt.names() == list(state)  # stored order


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_nested_state_dict_is_unwrapped(tmp_path, wrapper):
    state = sample_state_dict()
    torch.save({wrapper: state, "epoch": 3, "lr": 0.1}, tmp_path / "train.ckpt")
    with open_checkpoint(tmp_path / "train.ckpt") as ckpt:
        assert_matches(ckpt, state)


def test_legacy_torch_format_loads(tmp_path):
    state = sample_state_dict()
    torch.save(state, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    with open_checkpoint(tmp_path / "old.bin") as ckpt:
        assert_matches(ckpt, state)


def test_names_are_in_data_order(tmp_path):
    state = {"z": torch.ones(3), "a": torch.zeros(2), "m": torch.ones(1)}
    save_file(state, tmp_path / "m.safetensors")
    with open_checkpoint(tmp_path / "m.safetensors") as ckpt:
        offsets = {n: ckpt._store._offsets[ckpt.info(n).file][n] for n in ckpt.names()}
        assert list(offsets.values()) == sorted(offsets.values())


def test_tensor_info():
    info = TensorInfo("w", (3, 4), torch.bfloat16, file=Path("m.safetensors"))
    assert info.nbytes == 24 and info.is_float
    assert TensorInfo("s", (), torch.int64, file=Path("m.safetensors")).nbytes == 8
    assert not TensorInfo("i", (2,), torch.int64, file=Path("m.safetensors")).is_float


# --- metadata comes from headers alone ---------------------------------------------------


def test_metadata_reads_no_tensor_data(tmp_path, monkeypatch):
    """A 1 GiB sparse file with a hand-written header: open/infos are instant and never
    call the data read; reading then goes through preadv."""
    header = {"__metadata__": {"format": "pt"},
              "big": {"dtype": "F32", "shape": [2**28], "data_offsets": [0, 2**30]},
              "small": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [2**30, 2**30 + 12]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file = tmp_path / "sparse.safetensors"
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + 2**30 + 12)

    def no_data_reads(*args):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(os, "preadv", no_data_reads)
    ckpt = open_checkpoint(file)
    infos = ckpt.infos()
    assert infos["big"].shape == (2**28,) and infos["big"].nbytes == 2**30
    assert infos["small"].dtype == torch.bfloat16 and "small" in ckpt
    with pytest.raises(AssertionError, match="tensor data was read"):
        ckpt.read("small")
    monkeypatch.undo()
    assert torch.equal(ckpt.read("small"), torch.zeros(2, 3, dtype=torch.bfloat16))


# --- reads are safe and independent --------------------------------------------------------


def test_read_returns_own_memory(tmp_path):
    state = sample_state_dict()
    torch.save(state, tmp_path / "m.pt")
    with open_checkpoint(tmp_path / "m.pt") as ckpt:
        first = ckpt.read("model.embed_tokens.weight")
        first += 1
        assert torch.equal(ckpt.read("model.embed_tokens.weight"),
                           state["model.embed_tokens.weight"])


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_read_converts_in_chunks_as_to_does(tmp_path, monkeypatch, fmt, dtype):
    from supermerge.io import checkpoint

    # a 96-byte staging buffer: every tensor crosses several chunks, one of them short
    monkeypatch.setattr(checkpoint, "_STAGING_BYTES", 96)
    monkeypatch.setattr(checkpoint, "_per_thread", threading.local())
    gen = torch.Generator().manual_seed(2)
    state = {"a": torch.randn(7, 13, generator=gen).to(dtype), "b": torch.randn(5).to(dtype),
             "c": torch.zeros(0, 3, dtype=dtype)}
    state["a"][0, :3] = torch.tensor([float("nan"), float("-inf"), -0.0])
    with open_checkpoint(write_model_dir(tmp_path / "m", state, shards=1, fmt=fmt)) as ckpt:
        for name, tensor in state.items():
            for target in (torch.float32, dtype):
                got = ckpt.read(name, dtype=target)
                assert got.dtype == target
                assert torch.equal(got.view(torch.uint8), tensor.to(target).view(torch.uint8))
                into = torch.full(tensor.shape, 7.0, dtype=target)
                assert ckpt.read(name, dtype=target, out=into) is into
                assert torch.equal(into.view(torch.uint8), got.view(torch.uint8))
        with pytest.raises(ValueError, match="out must be"):
            ckpt.read("a", dtype=torch.float32, out=torch.empty(13, 7))
        with pytest.raises(ValueError, match="out must be"):
            ckpt.read("a", out=torch.empty(7, 13, dtype=torch.float64 if dtype != torch.float64
                                           else torch.float32))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_concurrent_reads_from_four_threads(tmp_path, fmt):
    gen = torch.Generator().manual_seed(1)
    state = {f"layer.{i}.weight": torch.randn(64 + i, 256, generator=gen) for i in range(32)}
    with open_checkpoint(write_model_dir(tmp_path / "m", state, shards=4, fmt=fmt)) as ckpt:

        def read_all(seed: int) -> int:
            names = ckpt.names() * 3
            random.Random(seed).shuffle(names)
            return sum(not torch.equal(ckpt.read(n), state[n]) for n in names)

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(read_all, range(4))) == [0, 0, 0, 0]


def test_read_after_close_and_unknown_name(tmp_path):
    save_file({"model.norm.weight": torch.ones(2)}, tmp_path / "m.safetensors")
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="model.norm.weight") as err:
        ckpt.read("model.norm.weigth")
    assert "did you mean" in err.value.fix
    ckpt.close()
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.read("model.norm.weight")


def test_file_changed_after_open_is_reported(tmp_path):
    file = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(4)}, file)
    ckpt = open_checkpoint(file)
    save_file({"w": torch.zeros(8)}, file)
    with pytest.raises(CheckpointError, match="changed") as err:
        ckpt.read("w")
    assert err.value.file == str(file) and err.value.tensor == "w"


# --- bad input: a CheckpointError naming the file and the fix ---------------------------


def _error(path) -> CheckpointError:
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(path)
    assert err.value.fix, "every error gives a fix"
    return err.value


def test_missing_path(tmp_path):
    err = _error(tmp_path / "nope")
    assert err.file == str(tmp_path / "nope") and "not found" in str(err)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    err = _error(tmp_path)
    assert err.file == str(tmp_path)
    assert "model.safetensors" in err.message and "pytorch_model.bin" in err.message


def test_directory_hints(tmp_path):
    (tmp_path / "a").mkdir()
    save_file({"w": torch.ones(1)}, tmp_path / "a" / "weights.safetensors")
    assert "weights.safetensors" in _error(tmp_path / "a").fix
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text("{}")
    assert "adapter_model.safetensors" in _error(tmp_path / "b").message


def test_unsupported_suffix(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert "unsupported" in _error(tmp_path / "m.gguf").message


def test_truncated_safetensors(tmp_path):
    file = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(100), "b": torch.ones(100)}, file)
    os.truncate(file, file.stat().st_size - 10)
    err = _error(file)
    assert err.file == str(file) and "truncated" in err.message and err.tensor


@pytest.mark.parametrize("damage", ["garbage", "huge_length", "tiny", "bad_offsets"])
def test_corrupt_safetensors_header(tmp_path, damage):
    file = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(4)}, file)
    data = bytearray(file.read_bytes())
    if damage == "garbage":
        data[8:20] = b"\xff" * 12
    elif damage == "huge_length":
        data[:8] = struct.pack("<Q", 2**40)
    elif damage == "tiny":
        data = data[:5]
    else:
        data = data.replace(b'"data_offsets":[0,16]', b'"data_offsets":[0,12]')
    file.write_bytes(bytes(data))
    err = _error(file)
    assert err.file == str(file) and "corrupt" in err.message


def test_index_naming_missing_shard(tmp_path):
    directory = write_model_dir(tmp_path / "m", sample_state_dict(), shards=3)
    (directory / "model-00002-of-00003.safetensors").unlink()
    err = _error(directory)
    assert err.file == str(directory / "model-00002-of-00003.safetensors")
    assert "model.safetensors.index.json" in err.message


def test_index_naming_tensor_absent_from_shard(tmp_path):
    directory = write_model_dir(tmp_path / "m", sample_state_dict(), shards=2)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    err = _error(directory)
    assert err.tensor == "lm_head.weight"
    assert err.file == str(directory / "model-00001-of-00002.safetensors")


def test_corrupt_config_json(tmp_path):
    directory = write_model_dir(tmp_path / "m", sample_state_dict())
    (directory / "config.json").write_text("{not json")
    assert _error(directory).file == str(directory / "config.json")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"w": torch.ones(2), "step": 3}, "key 'step' holds a int"),
        ({"model": {"w": torch.ones(2), "name": "x"}}, "key 'name' holds a str"),
        ([torch.ones(2)], "found a list"),
        ({}, "found an empty dict"),
    ],
)
def test_torch_file_that_is_not_a_state_dict(tmp_path, content, expected):
    torch.save(content, tmp_path / "m.bin")
    err = _error(tmp_path / "m.bin")
    assert expected in err.message and "state_dict()" in err.fix


class _Custom:
    pass


def test_torch_file_with_python_objects_is_refused(tmp_path):
    torch.save({"w": torch.ones(1), "obj": _Custom()}, tmp_path / "m.pt")
    err = _error(tmp_path / "m.pt")
    assert "holds Python code" in err.message and "_Custom" in err.message


def test_garbage_torch_file(tmp_path):
    (tmp_path / "m.bin").write_bytes(b"definitely not a torch file")
    assert "cannot read the torch file" in _error(tmp_path / "m.bin").message


# --- tied tensors ---------------------------------------------------------------------------


def test_tied_aliases(tmp_path):
    state = sample_state_dict()
    tied = write_model_dir(tmp_path / "tied", state, config={"model_type": "llama"})
    assert tied_aliases(open_checkpoint(tied)) == {"lm_head.weight": "model.embed_tokens.weight"}

    untied = write_model_dir(tmp_path / "untied", state, config={"tie_word_embeddings": False})
    assert tied_aliases(open_checkpoint(untied)) == {}

    full = write_model_dir(tmp_path / "full", {**state, "lm_head.weight": torch.ones(16, 8)})
    assert tied_aliases(open_checkpoint(full)) == {}

    save_file({"bert.embeddings.word_embeddings.weight": torch.ones(4, 2)},
              tmp_path / "headless.safetensors")
    assert tied_aliases(open_checkpoint(tmp_path / "headless.safetensors")) == {}
