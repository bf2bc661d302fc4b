"""Writing merged models: sharding, index, model files, model card, atomic publication."""

from __future__ import annotations

import errno
import gc
import json
import os
import signal
import struct
import subprocess
import sys
import types
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save

import supermerge
from helpers_io import assert_matches, layout_of, sample_state_dict, write_model_dir
from supermerge.errors import OutputError
from supermerge.io import CheckpointWriter, open_checkpoint
from supermerge.io.partial import OWNER_FILE

# Every test of the files written runs in both modes: tensors buffered into shards, and
# streamed to shards planned from a layout given up front.
MODES = ["buffered", "layout"]


def _write(out: Path, state: dict[str, torch.Tensor], mode: str = "buffered", *,
           card: bool = False, **kwargs) -> Path:
    """Write ``state`` to ``out``; with ``card``, a model card too (marks supermerge output,
    which ``overwrite`` may replace)."""
    layout = layout_of(state) if mode == "layout" else None
    with CheckpointWriter(out, layout=layout, **kwargs) as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
        if card:
            writer.write_model_card(base_models=["a", "b"], method="ties", recipe_yaml="")
        return writer.commit()


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def _header_and_data(blob: bytes) -> tuple[dict, bytes]:
    """A safetensors file's parsed header (its key order dropped) and data section."""
    (length,) = struct.unpack("<Q", blob[:8])
    assert length % 8 == 0
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


# --- files and shards ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_single_shard_is_model_safetensors(tmp_path, mode):
    state = sample_state_dict()
    out = _write(tmp_path / "out", state, mode)
    assert out == tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    with open_checkpoint(out) as ckpt:
        assert_matches(ckpt, state)
    assert _siblings(out) == ["out"]  # no temporary left behind


@pytest.mark.parametrize("mode", MODES)
def test_shard_size_limit_and_index(tmp_path, mode):
    state = {f"w{i}": torch.full((100,), float(i)) for i in range(7)}  # 400 bytes each
    state["big"] = torch.ones(400)  # 1600 bytes: larger than a shard, goes alone
    state["tail"] = torch.ones(10)
    out = _write(tmp_path / "out", state, mode, shard_size=1000)

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


@pytest.mark.parametrize("mode", MODES)
def test_files_are_what_safetensors_writes(tmp_path, mode):
    """Each shard holds the bytes safetensors' own writer produces for its tensors (up to
    the header's key order), and safetensors reads every dtype back, 0-d and empty too."""
    state = sample_state_dict()
    state["model.layers.1.mlp.down_proj.weight"] = torch.randn(8, 4).bfloat16()
    out = _write(tmp_path / "out", state, mode, shard_size=256)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    loaded = {}
    for shard in shards:
        names = [n for n, f in index["weight_map"].items() if f == shard]
        expected = save({n: state[n] for n in names}, metadata={"format": "pt"})
        blob = (out / shard).read_bytes()
        assert len(blob) == len(expected)
        assert _header_and_data(blob) == _header_and_data(expected)
        loaded.update(load_file(out / shard))
        with safe_open(out / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"} and sorted(f.keys()) == sorted(names)
            for name in names:
                assert torch.equal(f.get_tensor(name), state[name]), name
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("mode", MODES)
def test_views_and_shared_tensors_are_saved_contiguous(tmp_path, mode):
    base = torch.arange(12.0).reshape(3, 4)
    state = {"t": base.T, "row": base[1], "same": base, "again": base}
    out = _write(tmp_path / "out", state, mode)
    with open_checkpoint(out) as ckpt:
        assert_matches(ckpt, {n: t.contiguous() for n, t in state.items()})


def test_layout_plans_shards_and_writes_headers_up_front(tmp_path):
    state = {f"w{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    files = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    with CheckpointWriter(tmp_path / "out", shard_size=800, layout=layout_of(state)) as writer:
        (partial,) = (tmp_path / n for n in _siblings(tmp_path / "out"))
        assert sorted(p.name for p in partial.iterdir()) == [OWNER_FILE, *files]
        for file in files:  # each shard already starts with its full header
            header, data = _header_and_data((partial / file).read_bytes())
            assert header["__metadata__"] == {"format": "pt"} and data == b""
        for name in reversed(state):  # any arrival order
            writer.add(name, state[name])
        out = writer.commit()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"w0": files[0], "w1": files[0], "w2": files[1],
                                   "w3": files[1], "w4": files[2]}
    with open_checkpoint(out) as ckpt:
        assert_matches(ckpt, state)


def _held_tensors(root: object) -> list[object]:
    """Tensors, storages and arrays reachable from ``root`` (not through classes or modules)."""
    found, seen, todo = [], set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, type | types.ModuleType | types.FunctionType):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor | torch.UntypedStorage | np.ndarray | memoryview):
            found.append(obj)
        todo.extend(gc.get_referents(obj))
    return found


@pytest.mark.parametrize("mode", MODES)
def test_layout_writer_keeps_no_tensor(tmp_path, mode):
    """With a layout nothing added stays alive, however large the shard; buffered, the
    whole shard does (which shows the checks can see a kept tensor). Each tensor's memory
    is a numpy array, which lives as long as any tensor viewing it."""
    layout = [(f"w{i}", (256,), torch.float32) for i in range(8)]
    refs = []
    with CheckpointWriter(tmp_path / "out", shard_size=2**40,
                          layout=layout if mode == "layout" else None) as writer:
        for name, shape, _ in layout:
            memory = np.ones(shape, dtype=np.float32)
            refs.append(weakref.ref(memory))
            writer.add(name, torch.from_numpy(memory))
            del memory
        alive, held = sum(r() is not None for r in refs), _held_tensors(writer)
        writer.commit()
    if mode == "layout":
        assert alive == 0 and held == []
    else:
        assert alive == len(layout) and len(held) >= len(layout)


_PEAK_MEMORY = r"""
import re, sys, torch
from supermerge.io import CheckpointWriter

def status_bytes(field):  # VmRSS: resident now; VmHWM: its peak since the last reset
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read())[1]) * 1024

def peak_growth(out, layout):  # how much the peak grows while 128 MiB go into one shard
    torch.ones(2**19).sum()  # warm up the allocator
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the resident size now
    before = status_bytes("VmRSS")
    with CheckpointWriter(out, shard_size=2**40, layout=layout) as writer:
        for name, shape, dtype in names:
            writer.add(name, torch.full(shape, 1.5, dtype=dtype))
        writer.commit()
    return status_bytes("VmHWM") - before

names = [(f"w{i}", (2**19,), torch.float32) for i in range(64)]  # 64 x 2 MiB
print(peak_growth(sys.argv[1] + "/streamed", names), peak_growth(sys.argv[1] + "/buffered", None))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_with_a_layout_does_not_grow_with_the_shard(tmp_path):
    """128 MiB written into one shard: streamed, peak resident memory grows by a few
    tensors at most; buffered (which shows the measure works), by the whole shard."""
    env = {**os.environ, "PYTHONPATH": str(Path(supermerge.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", _PEAK_MEMORY, str(tmp_path)], env=env,
                            capture_output=True, text=True, check=True, timeout=120)
    streamed, buffered = map(int, result.stdout.split())
    assert streamed < 24 * 2**20, streamed
    assert buffered > 100 * 2**20, buffered


@pytest.mark.parametrize("mode", MODES)
def test_short_writes_are_resumed(tmp_path, monkeypatch, mode):
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real_pwrite(fd, data[:5], offset))
    state = sample_state_dict()
    out = _write(tmp_path / "out", state, mode)
    monkeypatch.undo()
    with open_checkpoint(out) as ckpt:
        assert_matches(ckpt, state)


def test_layout_misuse_is_reported(tmp_path):
    layout = [("w", (2, 3), torch.float32), ("b", (3,), torch.bfloat16)]
    with pytest.raises(OutputError, match="twice"):
        CheckpointWriter(tmp_path / "o1", layout=[*layout, ("w", (1,), torch.float32)])
    with pytest.raises(OutputError, match="cannot store"):
        CheckpointWriter(tmp_path / "o1", layout=[("q", (1,), torch.qint8)])
    assert not (tmp_path / "o1").exists() and _siblings(tmp_path / "o1") == []

    with CheckpointWriter(tmp_path / "o2", layout=layout) as writer:
        for tensor, problem in [(torch.ones(3, 2), r"float32\[3, 2\] but the layout says "
                                 r"float32\[2, 3\]"), (torch.ones(2, 3).half(), "float16")]:
            with pytest.raises(OutputError, match=problem) as err:
                writer.add("w", tensor)
            assert err.value.tensor == "w"
        with pytest.raises(OutputError, match="not in the writer's layout"):
            writer.add("extra", torch.ones(1))
        writer.add("w", torch.ones(2, 3))
        with pytest.raises(OutputError, match="added twice"):
            writer.add("w", torch.ones(2, 3))
        with pytest.raises(OutputError, match="1 tensor.* never added") as err:
            writer.commit()
        assert err.value.tensor == "b"
    assert _siblings(tmp_path / "o2") == []
    with pytest.raises(OutputError, match="no tensor"), \
            CheckpointWriter(tmp_path / "o3", layout=[]) as writer:
        writer.commit()


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
    assert "**ties**" in body and "[org/code](https://huggingface.co/org/code)" in body
    assert "## Results" in body
    block = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == yaml.safe_load(recipe)


# --- refusing, replacing, aborting -------------------------------------------------------


def test_existing_output_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="already exists") as err:
        CheckpointWriter(tmp_path / "out")
    assert "--overwrite" in err.value.fix
    assert _siblings(tmp_path / "out") == ["out"]


def test_overwrite_replaces_a_supermerge_output(tmp_path):
    out = _write(tmp_path / "out", {"old": torch.zeros(2)}, card=True)
    (out / "config.json").write_text("{}")
    state = {"new": torch.ones(3)}
    _write(out, state, overwrite=True)
    with open_checkpoint(out) as ckpt:
        assert_matches(ckpt, state)
    assert not (out / "config.json").exists() and not (out / "README.md").exists()
    assert _siblings(out) == ["out"]  # old model and temporary both gone
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty", state, overwrite=True)  # an empty folder loses nothing


def test_overwrite_refuses_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")
    with pytest.raises(OutputError, match="supermerge did not write.*notes.txt"):
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


@pytest.mark.parametrize(("existing", "mode", "file"), [
    (False, "buffered", "shard-00002.safetensors"),
    (True, "buffered", "shard-00002.safetensors"),
    (True, "layout", "model-00002-of-00004.safetensors"),
])
def test_disk_full_mid_write(tmp_path, monkeypatch, existing, mode, file):
    out = tmp_path / "out"
    if existing:
        _write(out, {"old": torch.zeros(2)}, card=True)
    data_writes = []

    def pwrite_then_disk_full(fd, data, offset):
        if offset > 0:  # tensor data (headers go at offset 0); the second lands in shard 2
            data_writes.append(offset)
        if len(data_writes) == 2:
            real_pwrite(fd, data[: len(data) // 2], offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", pwrite_then_disk_full)
    state = {f"w{i}": torch.ones(2) for i in range(4)}  # 8 bytes each: a shard each
    with pytest.raises(OutputError) as err:
        _write(out, state, mode, shard_size=8, overwrite=existing)
    monkeypatch.undo()
    assert "No space left on device" in err.value.message and str(out) in err.value.message
    assert err.value.file == str(out / file)
    assert "free disk space" in err.value.fix
    if existing:
        assert _siblings(out) == ["out"]
        assert open_checkpoint(out).names() == ["old"]  # the old model is untouched
    else:
        assert _siblings(out) == []


_KILLED_WRITER = """
import sys, time, torch
from supermerge.io import CheckpointWriter
names = [f"w{i}" for i in range(100)]
layout = [(n, (1024,), torch.float32) for n in names] if sys.argv[2] == "layout" else None
writer = CheckpointWriter(sys.argv[1], shard_size=8192, overwrite=True, layout=layout)
for i, name in enumerate(names):
    writer.add(name, torch.ones(1024))
    if i == 20:
        print("writing", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize(("existing", "mode"), [(False, "buffered"), (True, "buffered"),
                                                (True, "layout")])
def test_killed_mid_write_leaves_no_half_model(tmp_path, existing, mode):
    out = tmp_path / "out"
    if existing:
        _write(out, {"old": torch.zeros(2)}, card=True)
    env = {**os.environ, "PYTHONPATH": str(Path(supermerge.__file__).parents[1])}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(out), mode],
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
    _write(tmp_path / "other", {"w": torch.ones(1)})  # a write elsewhere leaves it alone
    assert (tmp_path / partial[0]).exists()
    _write(out, {"new": torch.ones(1)}, overwrite=existing)  # the next write to out removes it
    assert _siblings(out) == ["other", "out"]
