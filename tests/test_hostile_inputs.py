"""Hostile and malformed inputs (issue 10, the input side): every one ends as a clear
SupermergeError naming the file (and tensor) with a fix, before any weight is merged, and
never as a traceback, a file read from outside the model folder or a silently wrong tensor.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import supermerge
from helpers_io import RunsCode, sample_state_dict, write_model_dir
from supermerge.cli.main import cli
from supermerge.errors import CheckpointError, RecipeError, SupermergeError
from supermerge.io import open_checkpoint
from supermerge.recipes import parse_recipe


def _refused(path) -> CheckpointError:
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(path)
    assert err.value.fix, "every refusal says how to fix it"
    return err.value


def _write_safetensors(file: Path, header: object, data: bytes) -> Path:
    """A safetensors file with a hand-written header (any JSON, or raw bytes) and data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return file


def _entry(dtype: object = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


# --- 6: shard paths stay inside the model folder ----------------------------------------


def _sharded_with_foreign_shard(tmp_path: Path, shard_name: str) -> Path:
    """A two-shard model whose index points its second shard at ``shard_name``; a valid
    shard holding exactly the listed tensors lies there, so only the path check refuses."""
    state = sample_state_dict()
    directory = write_model_dir(tmp_path / "models" / "m", state, shards=2)
    index_file = directory / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    second = directory / "model-00002-of-00002.safetensors"
    secret = tmp_path / "secret.safetensors"
    second.rename(secret)
    index["weight_map"] = {n: shard_name if f == second.name else f
                           for n, f in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    return directory


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_index_naming_a_shard_outside_the_folder_is_refused(tmp_path, kind, monkeypatch):
    name = "../../secret.safetensors" if kind == "dotdot" else str(tmp_path / "secret.safetensors")
    directory = _sharded_with_foreign_shard(tmp_path, name)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: (opened.append(Path(f)),
                                                             real_open(f, *a, **k))[1])
    err = _refused(directory)
    assert err.file == str(directory / "model.safetensors.index.json")
    assert "outside the model folder" in err.message and "secret.safetensors" in err.message
    assert tmp_path / "secret.safetensors" not in opened  # refused before opening


def test_shard_that_is_a_symlink_out_of_the_folder_is_refused(tmp_path):
    directory = _sharded_with_foreign_shard(tmp_path, "model-00002-of-00002.safetensors")
    (directory / "model-00002-of-00002.safetensors").symlink_to(tmp_path / "secret.safetensors")
    err = _refused(directory)
    assert "symbolic link" in err.message and "outside the model folder" in err.message
    assert err.file == str(directory / "model-00002-of-00002.safetensors")


def test_single_weights_file_symlinked_out_of_the_folder_is_refused(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "elsewhere.safetensors")
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    assert "symbolic link" in _refused(directory).message


def test_hub_cache_snapshot_links_into_its_blobs_are_read(tmp_path):
    """The Hugging Face hub cache links snapshots/REV/<file> to ../../blobs/<hash>: those
    links leave the snapshot folder but stay in the repository's cache, and are read."""
    state = sample_state_dict()
    repo = tmp_path / "models--org--tiny"
    source = write_model_dir(tmp_path / "plain", state, shards=2)
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(source.iterdir())):
        blob = repo / "blobs" / f"hash{i}"
        file.rename(blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    with open_checkpoint(snapshot) as ckpt:
        assert sorted(ckpt.names()) == sorted(state)
        assert torch.equal(ckpt.read("model.embed_tokens.weight"),
                           state["model.embed_tokens.weight"])


def test_a_folder_that_is_itself_a_link_and_subfolder_shards_are_fine(tmp_path):
    state = sample_state_dict()
    real = write_model_dir(tmp_path / "real", state, shards=2)
    index_file = real / "model.safetensors.index.json"
    (real / "weights").mkdir()
    (real / "model-00001-of-00002.safetensors").rename(
        real / "weights" / "model-00001-of-00002.safetensors")
    index = json.loads(index_file.read_text())
    index["weight_map"] = {n: f"weights/{f}" if f.startswith("model-00001") else f
                           for n, f in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    (tmp_path / "link").symlink_to(real)
    with open_checkpoint(tmp_path / "link") as ckpt:
        assert sorted(ckpt.names()) == sorted(state)


# --- 7: offsets validated as the safetensors library does ------------------------------


_BAD_LAYOUTS = {
    "overlap": ({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}, 12, "overlaps"),
    "same_bytes": ({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(0, 8))}, 8, "overlaps"),
    "gap": ({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(12, 20))}, 20, "belong to no"),
    "hole_at_start": ({"a": _entry(offsets=(4, 12))}, 12, "belong to no"),
    "trailing_bytes": ({"a": _entry(offsets=(0, 8))}, 12, "belong to no tensor"),
    "wrong_length": ({"a": _entry(offsets=(0, 12))}, 12, "do not match"),
    "end_before_begin": ({"a": _entry(shape=(0,), offsets=(8, 0))}, 8, "do not match"),
    "truncated": ({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(8, 16))}, 12, "truncated"),
}


@pytest.mark.parametrize("case", sorted(_BAD_LAYOUTS))
def test_offsets_that_safetensors_refuses_are_refused(tmp_path, case):
    header, data_len, expected = _BAD_LAYOUTS[case]
    file = _write_safetensors(tmp_path / "m.safetensors", header, bytes(data_len))
    with pytest.raises(SafetensorError):  # the oracle: the library itself refuses it
        load_file(file)
    err = _refused(file)
    assert "corrupt" in err.message and expected in err.message and err.file == str(file)


def test_layouts_that_safetensors_accepts_are_read(tmp_path):
    """Out-of-order header keys, empty tensors sharing an offset, 0-d tensors."""
    header = {"z": _entry(shape=(), offsets=(8, 12)), "e1": _entry(shape=(0, 3), offsets=(8, 8)),
              "a": _entry(offsets=(0, 8)), "e2": _entry(shape=(0,), offsets=(12, 12))}
    values = torch.tensor([1.0, 2.0, 3.0])
    file = _write_safetensors(tmp_path / "m.safetensors", header, values.numpy().tobytes())
    expected = load_file(file)
    with open_checkpoint(file) as ckpt:
        assert ckpt.names()[0] == "a"
        for name, tensor in expected.items():
            assert torch.equal(ckpt.read(name), tensor), name


# --- 8: offsets are per file ---------------------------------------------------------------


def test_unlisted_tensor_in_another_shard_does_not_move_a_listed_one(tmp_path):
    """Shard 2 also holds a stale copy of shard 1's `layer.1` (unlisted), at another offset
    than shard 1's: `layer.1` is still read from shard 1 at shard 1's offset."""
    directory = tmp_path / "m"
    directory.mkdir()
    state = {"layer.0": torch.arange(4.0), "layer.1": torch.arange(4.0) + 10,
             "layer.2": torch.arange(8.0) + 20}
    save_file({n: state[n] for n in ("layer.0", "layer.1")}, directory / "s1.safetensors")
    save_file({"layer.1": torch.full((2,), -1.0), "layer.2": state["layer.2"]},
              directory / "s2.safetensors")
    weight_map = {"layer.0": "s1.safetensors", "layer.1": "s1.safetensors",
                  "layer.2": "s2.safetensors"}
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map}))
    with open_checkpoint(directory) as ckpt:
        assert ckpt.info("layer.1").file == directory / "s1.safetensors"
        for name, tensor in state.items():
            assert torch.equal(ckpt.read(name), tensor), name


# --- 10: malformed headers are errors, never tracebacks --------------------------------


_MALFORMED = {
    "dtype_list": ({"w": _entry(dtype=["F32"])}, '"dtype" is a list'),
    "dtype_unknown": ({"w": _entry(dtype="F31")}, "unsupported safetensors dtype"),
    "shape_string": ({"w": _entry(shape="2")}, '"shape"'),
    "shape_bool": ({"w": _entry(shape=[True, True])}, '"shape"'),
    "shape_negative": ({"w": _entry(shape=[-2])}, '"shape"'),
    "offsets_three": ({"w": _entry(offsets=[0, 8, 8])}, '"data_offsets"'),
    "offsets_float": ({"w": _entry(offsets=[0, 8.0])}, '"data_offsets"'),
    "entry_list": ({"w": [1, 2]}, "a list, not an object"),
    "entry_no_dtype": ({"w": {"shape": [2], "data_offsets": [0, 8]}}, "no 'dtype'"),
    "metadata_numbers": ({"__metadata__": {"format": 1}, "w": _entry()}, "__metadata__"),
    "deep_nesting": (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    "huge_integer": (b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], '
                     b'"data_offsets": [0, 8]}}', "not valid JSON"),
    "not_an_object": (b"[1, 2]", "not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(_MALFORMED))
def test_malformed_header_is_a_clear_error(tmp_path, case):
    header, expected = _MALFORMED[case]
    file = _write_safetensors(tmp_path / "m.safetensors", header, bytes(8))
    err = _refused(file)
    assert expected in err.message and err.file == str(file)
    if isinstance(header, dict) and "__metadata__" not in header:
        assert err.tensor == "w"


def test_deeply_nested_index_is_a_clear_error(tmp_path):
    directory = write_model_dir(tmp_path / "m", sample_state_dict(), shards=2)
    (directory / "model.safetensors.index.json").write_text("[" * 200_000 + "]" * 200_000)
    err = _refused(directory)
    assert "nested too deeply" in err.message
    assert err.file == str(directory / "model.safetensors.index.json")


@pytest.mark.parametrize("case", ["dtype_list", "deep_nesting"])
def test_malformed_header_in_inspect_merge_and_the_api(tmp_path, case):
    header, expected = _MALFORMED[case]
    bad = _write_safetensors(tmp_path / "bad.safetensors", header, bytes(8))
    save_file({"w": torch.ones(2)}, tmp_path / "good.safetensors")
    recipe = {"merge_method": "linear", "models": [str(bad), str(tmp_path / "good.safetensors")]}
    with pytest.raises(SupermergeError, match=expected) as err:  # the plan lists it
        supermerge.merge(recipe, tmp_path / "out")
    assert str(bad) in str(err.value)
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    runner = CliRunner()
    for args in (["inspect", str(bad)], ["merge", str(tmp_path / "r.yaml"), "-o",
                                         str(tmp_path / "out")]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 1, result.output
        assert expected in result.output and "Traceback" not in result.output
        assert not isinstance(result.exception, RecursionError | TypeError)
    assert not (tmp_path / "out").exists()


# --- 12: pickles that hold code ------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("layout", ["zip", "legacy", "bare_pickle"])
def test_pickle_with_code_is_refused_and_never_run(tmp_path, layout):
    marker = tmp_path / "ran"
    file = tmp_path / "m.bin"
    payload = {"w": torch.ones(2), "x": RunsCode(marker)}
    if layout == "bare_pickle":
        file.write_bytes(pickle.dumps(RunsCode(marker)))
    else:
        torch.save(payload, file, _use_new_zipfile_serialization=layout == "zip")
    err = _refused(file)
    assert not marker.exists()
    assert "holds Python code" in err.message and "system" in err.message
    assert "would run" in err.message
    assert "safetensors" in err.fix and "weights_only=False" in err.fix and str(file) in err.fix


def test_pickle_refusal_does_not_depend_on_torchs_wording(tmp_path, monkeypatch):
    file = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2), "x": RunsCode(tmp_path / "ran")}, file)

    def refuse(*args, **kwargs):
        raise pickle.UnpicklingError("some future torch's words")

    monkeypatch.setattr(torch, "load", refuse)
    assert "holds Python code" in _refused(file).message


def test_damaged_torch_file_is_not_called_code(tmp_path):
    (tmp_path / "m.bin").write_bytes(os.urandom(64) + b"definitely not a torch file")
    err = _refused(tmp_path / "m.bin")
    assert "cannot read the torch file" in err.message and "code" not in err.message
    assert "weights_only" not in str(err)  # torch's advice to disable the check is not relayed


# --- 13: the API refuses what is not a recipe ------------------------------------------------


@pytest.mark.parametrize("recipe", [None, ["a", "b"], 3])
def test_api_merge_of_something_not_a_recipe(tmp_path, recipe):
    with pytest.raises(RecipeError, match=type(recipe).__name__):
        supermerge.merge(recipe, tmp_path / "out")
    with pytest.raises(RecipeError, match=type(recipe).__name__):
        supermerge.merge_learned(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_api_merge_with_an_output_that_is_not_a_path(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    with pytest.raises(RecipeError, match="not a folder path"):
        supermerge.merge({"merge_method": "linear", "models": [str(tmp_path / "a.safetensors")]},
                         None)


# --- 14: the same model listed twice ----------------------------------------------------


def test_the_same_model_listed_twice_in_a_merge_recipe_is_warned(tmp_path, caplog):
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "b.safetensors")
    recipe = {"merge_method": "linear",
              "models": ["a.safetensors", "b.safetensors", "./a.safetensors"]}
    with caplog.at_level(logging.WARNING, logger="supermerge"):
        parse_recipe(recipe).to_spec(tmp_path)
    assert "a.safetensors is listed 2 times under `models`" in caplog.text
    assert "b.safetensors" not in caplog.text
