"""Writing merged models: sharding, index, model files, model card, atomic publication."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError, safe_open

import supermerge
from helpers_io import assert_matches, sample_state_dict, write_model_dir
from supermerge.errors import OutputError
from supermerge.io import CheckpointWriter, open_checkpoint
from supermerge.io import writer as writer_module


def _write(out: Path, state: dict[str, torch.Tensor], **kwargs) -> Path:
    with CheckpointWriter(out, **kwargs) as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
        return writer.commit()


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


# --- layout -----------------------------------------------------------------------------


def test_single_shard_is_model_safetensors(tmp_path):
    state = sample_state_dict()
    out = _write(tmp_path / "out", state)
    assert out == tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    with open_checkpoint(out) as ckpt:
        assert_matches(ckpt, state)
    assert _siblings(out) == ["out"]  # no temporary left behind


def test_shard_size_limit_and_index(tmp_path):
    state = {f"w{i}": torch.full((100,), float(i)) for i in range(7)}  # 400 bytes each
    state["big"] = torch.ones(400)  # 1600 bytes: larger than a shard, goes alone
    state["tail"] = torch.ones(10)
    out = _write(tmp_path / "out", state, shard_size=1000)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = [f"model-{i:05d}-of-00006.safetensors" for i in range(1, 7)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    assert index["metadata"]["total_size"] == 7 * 400 + 1600 + 40
    assert index["weight_map"] == {
        "w0": files[0], "w1": files[0], "w2": files[1], "w3": files[1],
        "w4": files[2], "w5": files[2], "w6": files[3], "big": files[4], "tail": files[5],
    }
    with open_checkpoint(out) as ckpt:
        assert_matches(ckpt, state)
        for file in files:
            sizes = [i.nbytes for i in ckpt.infos().values() if i.file.name == file]
            assert sum(sizes) <= 1000 or len(sizes) == 1


def test_views_and_shared_tensors_are_saved_contiguous(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    state = {"t": base.T, "row": base[1], "same": base, "again": base}
    out = _write(tmp_path / "out", state)
    with open_checkpoint(out) as ckpt:
        assert_matches(ckpt, {n: t.contiguous() for n, t in state.items()})


def test_output_permissions_follow_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        out = _write(tmp_path / "out", {"w": torch.ones(1)})
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o755


# --- model files, text, model card --------------------------------------------------------


def test_copy_model_files_takes_config_and_tokenizer_not_weights(tmp_path):
    source = write_model_dir(tmp_path / "base", sample_state_dict(), shards=2)
    names = ["generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "vocab.txt", "merges.txt", "tokenizer.model",
             "chat_template.jinja", "modeling_custom.py", "README.md", "training_args.bin"]
    for name in names:
        (source / name).write_text(f"content of {name}")
    with CheckpointWriter(tmp_path / "out") as writer:
        writer.add("w", torch.ones(1))
        writer.copy_model_files(source)
        writer.copy_model_files(None)
        writer.write_text("recipe.yaml", "merge_method: ties\n")
        out = writer.commit()
    expected = {"config.json", "model.safetensors", "recipe.yaml", *names[:-2]}
    assert {p.name for p in out.iterdir()} == expected
    assert (out / "config.json").read_text() == (source / "config.json").read_text()
    assert (out / "recipe.yaml").read_text() == "merge_method: ties\n"


def test_write_text_refuses_paths_outside_and_weight_names(tmp_path):
    with CheckpointWriter(tmp_path / "out") as writer:
        for bad in ("../escape.txt", "/etc/passwd", "model.safetensors"):
            with pytest.raises(OutputError):
                writer.write_text(bad, "x")
    assert _siblings(tmp_path / "out") == []


def test_model_card(tmp_path):
    recipe = "merge_method: ties\nparameters:\n  density: 0.5\n"
    with CheckpointWriter(tmp_path / "out") as writer:
        writer.add("w", torch.ones(1))
        writer.write_model_card(base_models=["org/math", "org/code"], method="ties",
                                recipe_yaml=recipe, extra_markdown="## Results\n\nGood.")
        out = writer.commit()
    card = (out / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == ["org/math", "org/code"]
    assert meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers"
    assert {"merge", "supermerge"} <= set(meta["tags"])
    assert "**ties**" in body and "`org/code`" in body and "## Results" in body
    block = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == yaml.safe_load(recipe)


# --- refusing, replacing, aborting -------------------------------------------------------


def test_existing_output_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="already exists") as err:
        CheckpointWriter(tmp_path / "out")
    assert "--overwrite" in err.value.fix
    assert _siblings(tmp_path / "out") == ["out"]


def test_overwrite_replaces_a_model(tmp_path):
    out = _write(tmp_path / "out", {"old": torch.zeros(2)})
    (out / "stale.txt").write_text("from the old model")
    state = {"new": torch.ones(3)}
    _write(out, state, overwrite=True)
    with open_checkpoint(out) as ckpt:
        assert_matches(ckpt, state)
    assert not (out / "stale.txt").exists()
    assert _siblings(out) == ["out"]  # old model and temporary both gone


def test_overwrite_refuses_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")
    with pytest.raises(OutputError, match="does not hold a model"):
        CheckpointWriter(tmp_path / "home", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        CheckpointWriter(tmp_path / "file", overwrite=True)


def test_parent_directories_are_created(tmp_path):
    out = _write(tmp_path / "a" / "b" / "out", {"w": torch.ones(1)})
    assert (out / "model.safetensors").is_file()


def test_unusable_parent_is_an_output_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError) as err:
        CheckpointWriter(tmp_path / "file" / "out")
    assert err.value.fix


def test_exception_in_block_aborts(tmp_path):
    with pytest.raises(RuntimeError), CheckpointWriter(tmp_path / "out") as writer:
        writer.add("w", torch.ones(1))
        raise RuntimeError("merge failed")
    assert _siblings(tmp_path / "out") == []


def test_leaving_block_without_commit_aborts(tmp_path):
    with CheckpointWriter(tmp_path / "out") as writer:
        writer.add("w", torch.ones(1))
    assert _siblings(tmp_path / "out") == []
    with pytest.raises(OutputError, match="aborted"):
        writer.add("v", torch.ones(1))


def test_misuse_is_reported(tmp_path):
    with CheckpointWriter(tmp_path / "out") as writer:
        writer.add("w", torch.ones(1))
        with pytest.raises(OutputError, match="added twice") as err:
            writer.add("w", torch.ones(1))
        assert err.value.tensor == "w"
        writer.commit()
        with pytest.raises(OutputError, match="committed"):
            writer.add("v", torch.ones(1))
    with pytest.raises(OutputError, match="no tensor"), CheckpointWriter(tmp_path / "o2") as w:
        w.commit()
    with pytest.raises(OutputError, match="shard_size"):
        CheckpointWriter(tmp_path / "o3", shard_size=0)


# safetensors reports a failed write as SafetensorError with the errno in its text
_DISK_FULL = {
    "oserror": OSError(errno.ENOSPC, "No space left on device"),
    "safetensors": SafetensorError("Error while serializing: I/O error: No space left on "
                                   "device (os error 28)"),
}


@pytest.mark.parametrize(("existing", "error"), [(False, "oserror"), (True, "safetensors")])
def test_disk_full_mid_write(tmp_path, monkeypatch, existing, error):
    out = tmp_path / "out"
    if existing:
        _write(out, {"old": torch.zeros(2)})
    calls = []

    def save_file_then_disk_full(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"half a shard")
            raise _DISK_FULL[error]
        real_save_file(tensors, filename, metadata=metadata)

    real_save_file = writer_module.save_file
    monkeypatch.setattr(writer_module, "save_file", save_file_then_disk_full)
    with pytest.raises(OutputError) as err, CheckpointWriter(out, shard_size=8,
                                                             overwrite=existing) as writer:
        for i in range(4):
            writer.add(f"w{i}", torch.ones(2))
        writer.commit()
    assert "No space left on device" in err.value.message and str(out) in err.value.message
    assert err.value.file == str(out / "shard-00002.safetensors")
    assert "free disk space" in err.value.fix
    if existing:
        assert _siblings(out) == ["out"]
        assert open_checkpoint(out).names() == ["old"]  # the old model is untouched
    else:
        assert _siblings(out) == []


_KILLED_WRITER = """
import sys, torch
from supermerge.io import CheckpointWriter
writer = CheckpointWriter(sys.argv[1], shard_size=4096, overwrite=True)
for i in range(10**9):
    writer.add(f"w{i}", torch.ones(1024))
    if i == 20:
        print("writing", flush=True)
"""


@pytest.mark.parametrize("existing", [False, True])
def test_killed_mid_write_leaves_no_half_model(tmp_path, existing):
    out = tmp_path / "out"
    if existing:
        _write(out, {"old": torch.zeros(2)})
    env = {**os.environ, "PYTHONPATH": str(Path(supermerge.__file__).parents[1])}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(out)],
                             stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline() == b"writing\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    partial = [n for n in _siblings(out) if n.startswith(".out.partial-")]
    assert len(partial) == 1 and any((tmp_path / partial[0]).iterdir())
    if existing:
        assert open_checkpoint(out).names() == ["old"]
    else:
        assert not out.exists()
