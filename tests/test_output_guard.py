"""The output guard (issue 10, items 1-5): what --overwrite may replace, outputs apart from
inputs, leftovers of dead writers, free disk space, side files that link out of the folder."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import supermerge
from conftest import recipe
from helpers_io import layout_of, sample_state_dict, write_model_dir
from supermerge.errors import OutputError, SupermergeError
from supermerge.io import CheckpointWriter, guard, open_checkpoint, partial
from supermerge.io.guard import check_apart, check_output, format_bytes
from supermerge.io.partial import OWNER_FILE


def _write(out: Path, state: dict | None = None, *, card: bool = True, **kwargs) -> Path:
    state = state if state is not None else {"w": torch.ones(4)}
    with CheckpointWriter(out, **kwargs) as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
        if card:
            writer.write_model_card(base_models=["a"], method="ties", recipe_yaml="")
        return writer.commit()


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


_Usage = namedtuple("_Usage", "total used free")


def _disk_with_free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(guard.shutil, "disk_usage", lambda path: _Usage(10**12, 0, free))


# --- 1. --overwrite replaces only what supermerge wrote ------------------------------------


@pytest.mark.parametrize(("files", "named"), [
    ({"notes.txt": "mine", "config.json": "{}", "docs/thesis.tex": "years"}, "docs/thesis.tex"),
    ({"notes.txt": "mine", "firmware.bin": "\x7fELF", "photos/cat.jpg": "jpg"}, "firmware.bin"),
    ({"presentation.pt": "slides", "taxes/2025.pdf": "pdf"}, "taxes/2025.pdf"),
    ({"config.json": "{}", "model.safetensors": "not ours"}, "model.safetensors"),
])
def test_overwrite_refuses_folders_supermerge_did_not_write(tmp_path, files, named):
    home = tmp_path / "home"
    for name, text in files.items():
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_text(text)
    before = _tree(home)
    with pytest.raises(OutputError, match="supermerge did not write") as err:
        _write(home, overwrite=True)
    assert named in err.value.message and err.value.file == str(home)
    assert _tree(home) == before and _siblings(home) == ["home"]


def test_overwrite_refuses_a_supermerge_output_holding_other_files(tmp_path):
    out = _write(tmp_path / "out")
    (out / "docs").mkdir()
    (out / "docs" / "thesis.tex").write_text("years of work")
    for i in range(6):
        (out / f"note{i}.txt").write_text("mine")
    with pytest.raises(OutputError, match="would be lost") as err:
        _write(out, {"new": torch.zeros(1)}, overwrite=True)
    assert "docs/thesis.tex, note0.txt, note1.txt, note2.txt, note3.txt, ..." in err.value.message
    assert "move those files" in err.value.fix
    assert (out / "docs" / "thesis.tex").exists() and open_checkpoint(out).names() == ["w"]


def test_every_file_a_learned_export_writes_may_be_overwritten(tmp_path):
    from supermerge.learn.export import export_model

    base = write_model_dir(tmp_path / "base", sample_state_dict())
    (base / "tokenizer.json").write_text("{}")
    (base / "modeling_x.py").write_text("# remote code")
    state = {"w": torch.ones(3)}
    heads = {"spam": {"weight": torch.ones(2, 3)}}
    files = {"coefficients.json": "{}", "coefficients.csv": "a,b\n",
             "coefficients.safetensors": b"", "coefficients.png": b"png"}
    written = {"method": "supermerge", "base_models": [str(base)], "recipe_yaml": "x: 1\n",
               "model_dir": base, "files": files}
    out = export_model(tmp_path / "out", state, heads, **written)
    assert (out / "heads" / "spam.safetensors").is_file()
    export_model(out, {"w": torch.zeros(3)}, heads, overwrite=True, **written)
    assert torch.equal(open_checkpoint(out).read("w"), torch.zeros(3))


def test_files_put_into_the_output_during_a_merge_stop_the_swap(tmp_path):
    out = _write(tmp_path / "out")
    with (pytest.raises(OutputError, match="would be lost: notes.txt"),
          CheckpointWriter(out, overwrite=True) as writer):
        writer.add("new", torch.zeros(2))
        (out / "notes.txt").write_text("written while the merge ran")
        writer.commit()
    assert (out / "notes.txt").exists() and open_checkpoint(out).names() == ["w"]
    assert _siblings(out) == ["out"]


# --- 2. one guard: outputs apart from inputs ----------------------------------------------


def test_check_apart_refuses_every_overlap_however_spelled(tmp_path):
    model = write_model_dir(tmp_path / "models" / "expert", sample_state_dict())
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    (tmp_path / "link").symlink_to(tmp_path / "models")
    cases = {
        model: "also an input",
        tmp_path / "link" / "expert": "also an input",  # the same folder through a link
        tmp_path / "models" / "." / "expert": "also an input",
        model / "merged": "inside the input folder",
        model / "sub" / "merged": "inside the input folder",
        tmp_path / "models": "inside the output folder",  # the output would hold the input
        tmp_path: "inside the output folder",
        data: "also an input",
    }
    for out, message in cases.items():
        with pytest.raises(OutputError, match=message) as err:
            check_apart(out, [data, model])
        assert err.value.fix
    check_apart(tmp_path / "merged", [model, data, tmp_path / "missing", None])
    check_apart(tmp_path / "models" / "other", [model])  # a sibling of an input is fine


def test_writer_refuses_an_output_among_its_inputs_before_writing(tmp_path):
    model = write_model_dir(tmp_path / "expert", sample_state_dict())
    before = _tree(model)
    for out in (model, model / "merged"):
        with pytest.raises(OutputError, match="input"):
            CheckpointWriter(out, overwrite=True, inputs=[model])
    assert _tree(model) == before and _siblings(model) == ["expert"]


def test_merge_refuses_an_output_inside_an_input_folder(tmp_path):
    base = write_model_dir(tmp_path / "base", sample_state_dict(0))
    expert = write_model_dir(tmp_path / "expert", sample_state_dict(1))
    with pytest.raises(SupermergeError, match="inside the input folder"):
        supermerge.merge(recipe("linear", base, [base, expert]), expert / "merged")
    assert not (expert / "merged").exists()


def _learn_recipe(root: Path) -> dict:
    """A learn recipe over tiny model folders (enough for every check before training)."""
    write_model_dir(root / "base", sample_state_dict(0))
    experts = []
    for i, task in enumerate(["spam", "topic"]):
        write_model_dir(root / task, sample_state_dict(i + 1))
        (root / f"{task}.jsonl").write_text('{"input": "a", "label": "x"}\n')
        experts.append({"model": str(root / task), "data": str(root / f"{task}.jsonl"),
                        "labels": ["x", "y"]})
    return {"merge_method": "supermerge", "base_model": str(root / "base"), "experts": experts}


@pytest.mark.parametrize(("out", "message"), [
    ("spam", "also an input"), ("spam/merged", "inside the input folder"),
    (".", "inside the output folder"), ("spam.jsonl", "also an input")])
def test_learn_refuses_an_output_among_its_inputs_before_training(tmp_path, out, message):
    pytest.importorskip("transformers")
    from supermerge.recipes.learn import run_learn_recipe

    spec = _learn_recipe(tmp_path)
    before = _tree(tmp_path)
    with pytest.raises(OutputError, match=message):
        run_learn_recipe(spec, tmp_path / out, overwrite=True)
    assert _tree(tmp_path) == before


def test_learn_checks_free_space_before_training(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from supermerge.recipes.learn import run_learn_recipe

    _disk_with_free(monkeypatch, 100)
    with pytest.raises(OutputError, match="not enough disk space"):
        run_learn_recipe(_learn_recipe(tmp_path / "in"), tmp_path / "out")


@pytest.mark.parametrize("command", ["search", "map"])
@pytest.mark.parametrize(("out", "message"), [
    ("expert-a", "also an input"), ("base/results", "inside the input folder"),
    (".", "inside the output folder"), ("spam.jsonl", "also an input")])
def test_search_and_map_refuse_an_output_among_their_inputs(tmp_path, command, out, message):
    from click.testing import CliRunner

    from supermerge.cli.main import cli

    for name in ("base", "expert-a", "expert-b"):
        write_model_dir(tmp_path / name, sample_state_dict())
    (tmp_path / "spam.jsonl").write_text('{"text": "a", "label": "x"}\n')
    space = {"merge_method": "task_arithmetic", "base_model": "base",
             "models": ["expert-a", "expert-b"],
             "search": {"parameters": {"weight": [0.0, 1.0]}, "tasks": ["spam.jsonl"]}}
    (tmp_path / "space.yaml").write_text(json.dumps(space))
    before = _tree(tmp_path)
    result = CliRunner().invoke(cli, [command, str(tmp_path / "space.yaml"), "-o",
                                      str(tmp_path / out)])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and _tree(tmp_path) == before


def test_bench_refuses_an_output_inside_its_base_model(tmp_path):
    from supermerge.run import run_benchmark

    base = write_model_dir(tmp_path / "base", sample_state_dict())
    with pytest.raises(OutputError, match="inside the input folder"):
        run_benchmark([], base / "results", base=base)
    assert sorted(p.name for p in base.iterdir()) == ["config.json", "model.safetensors"]


def test_evaluate_refuses_to_write_its_report_over_an_input(tmp_path):
    from click.testing import CliRunner

    from supermerge.cli.main import cli

    model = write_model_dir(tmp_path / "model", sample_state_dict())
    data = tmp_path / "spam.jsonl"
    data.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n"
                            for i in range(40)))
    before = _tree(tmp_path)
    for option, target in (("--json", data), ("--markdown", model / "report.md")):
        result = CliRunner().invoke(cli, ["evaluate", str(model), "--tasks", str(data),
                                          "--base", str(model), option, str(target)])
        assert result.exit_code == 1, result.output
        assert "also an input" in result.output or "inside the input folder" in result.output
    assert _tree(tmp_path) == before


# --- 3. leftovers of interrupted writers ---------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _fake_partial(out: Path, suffix: str, owner: dict | None) -> Path:
    folder = out.parent / f".{out.name}.partial-{suffix}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    if owner is not None:
        (folder / OWNER_FILE).write_text(json.dumps(owner))
    return folder


def test_leftovers_of_dead_writers_are_removed_live_ones_kept(tmp_path, caplog):
    out = tmp_path / "out"
    me = partial._this_process()
    dead = _fake_partial(out, "00000001", {**me, "pid": _dead_pid(), "start": None})
    reused = _fake_partial(out, "00000002", {**me, "start": -1})  # our pid, another process
    rebooted = _fake_partial(out, "00000003", {**me, "boot": "another-boot"})
    live = _fake_partial(out, "00000004", me)
    remote = _fake_partial(out, "00000005", {**me, "host": socket.gethostname() + "-other"})
    unknown = _fake_partial(out, "00000006", None)
    other_output = _fake_partial(tmp_path / "out2", "00000007", {**me, "pid": _dead_pid()})
    not_ours = tmp_path / ".out.partial-keepme"  # not the writer's name pattern
    not_ours.mkdir()
    with caplog.at_level(logging.INFO, logger="supermerge.io"):
        _write(out)
    for gone in (dead, reused, rebooted):
        assert not gone.exists()
    for kept in (live, remote, unknown, other_output, not_ours):
        assert kept.exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(live.name in w and f"pid {os.getpid()}" in w for w in warnings)
    assert any(remote.name in w and "-other" in w for w in warnings)
    assert any(unknown.name in w and "no record" in w for w in warnings)


def test_a_concurrent_writer_keeps_its_temporary_folder(tmp_path):
    out = _write(tmp_path / "out")
    with CheckpointWriter(out, overwrite=True) as first:
        first.add("first", torch.zeros(1))
        first.write_model_card(base_models=["a"], method="ties", recipe_yaml="")
        _write(out, {"second": torch.zeros(1)}, overwrite=True)  # starts and ends meanwhile
        first.commit()
    assert open_checkpoint(out).names() == ["first"] and _siblings(out) == ["out"]


def test_the_owner_record_is_not_published(tmp_path):
    out = _write(tmp_path / "out")
    assert not (out / OWNER_FILE).exists()


# --- 4. free disk space, checked up front --------------------------------------------------

def test_too_little_free_space_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    state = {f"w{i}": torch.ones(1000) for i in range(4)}  # 4 x 4000 bytes + headers
    _disk_with_free(monkeypatch, 16_000)
    with pytest.raises(OutputError, match="not enough disk space") as err:
        CheckpointWriter(tmp_path / "out", layout=layout_of(state), shard_size=8000)
    message = err.value.message
    assert "it needs 16 KiB" in message and "15.6 KiB are free" in message  # 16,336 B
    assert str(tmp_path) in message and "another disk" in err.value.fix
    assert list(tmp_path.iterdir()) == []
    _disk_with_free(monkeypatch, 17_000)
    _write(tmp_path / "out", state, layout=layout_of(state), shard_size=8000)


def test_without_a_layout_each_shard_is_checked_before_it_is_written(tmp_path, monkeypatch):
    _disk_with_free(monkeypatch, 5000)
    with pytest.raises(OutputError, match="not enough disk space"):
        _write(tmp_path / "out", {"a": torch.ones(1000), "b": torch.ones(2000)}, shard_size=4000)
    assert list(tmp_path.iterdir()) == []


def test_merge_checks_free_space_before_reading_a_weight(tmp_path, monkeypatch, family):
    _, _, base, paths = family
    _disk_with_free(monkeypatch, 100)

    def no_read(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(supermerge.io.Checkpoint, "read", no_read)
    with pytest.raises(OutputError, match="not enough disk space"):  # emr: a statistic pass
        supermerge.merge(recipe("emr", base, paths), tmp_path / "out")
    assert _siblings(tmp_path / "out") == ["in"]


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 1023, 1024, 1536, 5 * 2**30, 300 * 2**20)] == [
        "0 B", "1023 B", "1 KiB", "1.5 KiB", "5 GiB", "300 MiB"]


def test_check_output_passes_where_the_filesystem_reports_no_size(tmp_path, monkeypatch):
    monkeypatch.setattr(guard.shutil, "disk_usage", lambda path: _Usage(0, 0, 0))
    check_output(tmp_path / "out", nbytes=10**15)


# --- 5. side files never follow a link out of the model folder ----------------------------


def test_side_files_linking_out_of_the_model_folder_are_not_copied(tmp_path, caplog):
    base = write_model_dir(tmp_path / "base", sample_state_dict())
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0")
    (base / "tokenizer.json").symlink_to(secret)
    (base / "special_tokens_map.json").symlink_to(tmp_path / "missing.json")  # dangling
    (base / "real_vocab.txt").write_text("a b c")
    (base / "vocab.txt").symlink_to("real_vocab.txt")  # a link inside the folder: copied
    (base / "package.py").mkdir()  # a folder matching *.py: skipped
    (base / "merges.txt").symlink_to(tmp_path)  # a link to a folder out of it
    with (caplog.at_level(logging.WARNING, logger="supermerge.io"),
          CheckpointWriter(tmp_path / "out") as writer):
        writer.add("w", torch.ones(1))
        writer.copy_model_files(base)
        out = writer.commit()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                     "vocab.txt"]
    assert not (out / "vocab.txt").is_symlink() and (out / "vocab.txt").read_text() == "a b c"
    assert not any("root:x" in p.read_text(errors="ignore") for p in out.iterdir())
    text = caplog.text
    assert "tokenizer.json is a link to" in text and str(secret) in text
    assert "merges.txt is a link to" in text


def test_hugging_face_cache_snapshots_link_into_their_blobs(tmp_path):
    repo = tmp_path / "models--org--tiny"
    snapshot = write_model_dir(repo / "snapshots" / "abc123", sample_state_dict())
    (repo / "blobs").mkdir()
    shutil.move(snapshot / "config.json", repo / "blobs" / "f00d")
    (snapshot / "config.json").symlink_to(Path("..", "..", "blobs", "f00d"))
    with CheckpointWriter(tmp_path / "out") as writer:
        writer.add("w", torch.ones(1))
        writer.copy_model_files(snapshot)
        out = writer.commit()
    assert json.loads((out / "config.json").read_text()) == {"model_type": "llama"}
