"""The command line as people expect it: fast --help, python -m, -h, -v/-q, plain progress
in log files, each warning once, --json, recipes from stdin, --shard-size 2GB, completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

import supermerge
from conftest import recipe
from supermerge.cli import screen
from supermerge.cli.main import cli

SRC = str(Path(supermerge.__file__).parents[1])
ENV = {**os.environ, "PYTHONPATH": SRC}


def run_python(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV,
                          input=stdin, timeout=120)


# --- start-up ---------------------------------------------------------------------------

_NO_TORCH = """
import sys
from supermerge.cli.main import main
for argv in {argvs!r}:
    sys.argv = ["supermerge", *argv]
    try:
        main()
    except SystemExit as stop:
        print("EXITED", argv, stop.code)
print("torch imported:", "torch" in sys.modules)
"""


def test_help_version_and_argument_errors_never_import_torch():
    """Importing torch is what made `supermerge --help` take 5-7 s on this machine."""
    argvs = [["--help"], ["-h"], ["--version"], ["merge"], ["merge", "r.yaml"],
             ["merge", "r.yaml", "-o", "o", "--shard-size", "2XB"], ["nosuchcommand"],
             *[[name, "-h"] for name in cli.commands]]
    done = run_python("-c", _NO_TORCH.format(argvs=argvs))
    assert "torch imported: False" in done.stdout, done.stdout + done.stderr
    assert done.stdout.count("EXITED") == len(argvs)


def test_python_dash_m_supermerge_is_the_cli():
    done = run_python("-m", "supermerge", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"supermerge, version {supermerge.__version__}"
    usage = run_python("-m", "supermerge", "-h")
    assert usage.returncode == 0 and "merge" in usage.stdout and "-q, --quiet" in usage.stdout


def test_the_package_api_is_still_there_lazily():
    assert callable(supermerge.merge) and callable(supermerge.merge_learned)
    assert callable(supermerge.load_task_model)
    with pytest.raises(AttributeError):
        supermerge.no_such_thing  # noqa: B018


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_dash_h_works_on_every_command(name):
    result = CliRunner().invoke(cli, [name, "-h"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: cli {name}") or "Usage:" in result.output
    assert "-q, --quiet" in result.output and "-v, --verbose" in result.output


# --- warnings, verbosity, progress ---------------------------------------------------------


@pytest.fixture
def warned(tmp_path):
    """A recipe whose merge warns twice: a tensor missing in one expert (on_missing: base),
    an extra tensor in the other."""
    import torch

    save_file({"w": torch.ones(2), "x": torch.ones(3)}, tmp_path / "base.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(2), "x": torch.ones(3), "y": torch.ones(1)},
              tmp_path / "b.safetensors")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": "base.safetensors",
        "on_missing": "base", "models": ["a.safetensors", "b.safetensors"]}))
    return path


def test_each_warning_is_printed_once(warned, tmp_path):
    """In a real process (the library logs each warning; the CLI used to echo it again)."""
    result = run_python("-m", "supermerge", "merge", str(warned), "-o", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("missing x, used the base's tensor") == 1, result.stderr
    assert result.stderr.count("not in the reference were ignored") == 1, result.stderr
    assert "warning: " in result.stderr and "WARNING" not in result.stderr
    assert "merged 2 tensors" in result.stdout


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_shows_only_errors_and_the_result(warned, tmp_path, where):
    args = ["merge", str(warned), "-o", str(tmp_path / "o")]
    args = ["-q", *args] if where == "before" else [*args, "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "merged 2 tensors" in result.stdout
    failed = CliRunner().invoke(cli, ["-q", "merge", str(tmp_path / "none.yaml"), "-o",
                                      str(tmp_path / "o2")])
    assert failed.exit_code == 1 and "recipe file not found" in failed.stderr


def test_verbose_shows_info_lines(family, tmp_path):
    _, _, base_path, paths = family
    rec = tmp_path / "r.yaml"
    # the base listed among the models: dropped, which the engine says at info level
    rec.write_text(yaml.safe_dump(recipe("task_arithmetic", base_path, [base_path, *paths])))
    quiet = CliRunner().invoke(cli, ["merge", str(rec), "-o", str(tmp_path / "a")])
    loud = CliRunner().invoke(cli, ["-v", "merge", str(rec), "-o", str(tmp_path / "b")])
    assert loud.exit_code == 0, loud.output
    assert "base model listed under models: dropped" in loud.stderr
    assert "base model listed under models" not in quiet.stderr


def test_logging_is_left_as_it_was_after_a_command(warned, tmp_path):
    import logging

    before = (list(logging.getLogger().handlers), logging.getLogger("supermerge").level)
    CliRunner().invoke(cli, ["-vv", "merge", str(warned), "-o", str(tmp_path / "o")])
    assert (list(logging.getLogger().handlers),
            logging.getLogger("supermerge").level) == before


def test_progress_in_a_log_file_is_plain_lines(warned, tmp_path, monkeypatch):
    result = CliRunner().invoke(cli, ["merge", str(warned), "-o", str(tmp_path / "o")])
    assert "merging: 2/2 tensor" in result.stderr  # one closing line per stage
    assert "\r" not in result.stderr and "%|" not in result.stderr and "it/s" not in \
        result.stderr
    monkeypatch.setattr(screen, "PLAIN_EVERY", 0.0)  # a line per update
    every = CliRunner().invoke(cli, ["merge", str(warned), "-o", str(tmp_path / "o2")])
    assert "merging: 1/2 tensor" in every.stderr and "\r" not in every.stderr


def test_progress_is_a_bar_on_a_terminal_and_nothing_when_quiet(monkeypatch):
    from tqdm import tqdm

    monkeypatch.setattr(screen, "stderr_is_terminal", lambda: True)
    bar = screen.progress_bar("x", total=3)
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setattr(screen, "stderr_is_terminal", lambda: False)
    assert type(screen.progress_bar("x", total=3)) is screen.PlainLinesBar
    assert type(screen.progress_bar("x", total=3, show=False)) is screen.SilentBar


# --- --json ------------------------------------------------------------------------------


def test_merge_json(warned, tmp_path):
    result = CliRunner().invoke(cli, ["merge", str(warned), "-o", str(tmp_path / "o"),
                                      "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert set(document) == {"out", "tensors", "merged", "copied", "seconds",
                             "largest_tensor_bytes", "memory_budget_bytes", "warnings"}
    assert document["merged"] == 2 and Path(document["out"]) == (tmp_path / "o").resolve()
    assert len(document["warnings"]) == 2


def test_inspect_json_one_and_two(family):
    _, _, base_path, paths = family
    one = json.loads(CliRunner().invoke(cli, ["inspect", str(base_path), "--json"]).stdout)
    assert set(one) == {"path", "tensors", "count", "parameters", "bytes", "dtypes"}
    assert one["count"] == 6 and one["parameters"] == 280 and one["dtypes"] == {"float32": 280}
    assert {"name": "model.layers.0.mlp.weight", "shape": [8, 8], "dtype": "float32"} in \
        one["tensors"]
    two = json.loads(CliRunner().invoke(cli, ["inspect", str(base_path), str(paths[0]),
                                              "--json"]).stdout)
    assert set(two) == {"reference", "other", "tensors", "counts"}
    assert two["counts"] == {"differs": 6}
    assert set(two["tensors"][0]) == {"name", "status", "delta_norm", "relative"}
    assert all(row["delta_norm"] > 0 for row in two["tensors"])


def test_methods_json():
    listing = json.loads(CliRunner().invoke(cli, ["methods", "--json"]).stdout)
    names = {m["name"]: m for m in listing["methods"]}
    assert {"ties", "task_arithmetic", "supermerge", "regmean"} <= set(names)
    assert names["ties"]["kind"] == "data_free" and names["supermerge"]["kind"] == "learned"
    ties = json.loads(CliRunner().invoke(cli, ["methods", "ties", "--json"]).stdout)
    assert set(ties) == {"name", "kind", "summary", "paper", "needs", "needs_base",
                         "min_models", "max_models", "parameters"}
    density = next(p for p in ties["parameters"] if p["name"] == "density")
    assert density["default"] == 0.2 and density["per_model"] is True
    bad = CliRunner().invoke(cli, ["methods", "tiez", "--json"])
    assert bad.exit_code == 1 and "ties" in bad.stderr


# --- recipes from stdin --------------------------------------------------------------------


def test_merge_recipe_from_stdin(family, tmp_path, monkeypatch):
    _, _, base_path, paths = family
    monkeypatch.chdir(paths[0].parent)  # relative paths: from the working directory
    text = yaml.safe_dump(recipe("ties", base_path.name, [p.name for p in paths]))
    result = CliRunner().invoke(cli, ["merge", "-", "-o", str(tmp_path / "o")], input=text)
    assert result.exit_code == 0, result.output
    assert "merged 6 tensors" in result.stdout
    assert "merge_method: ties" in (tmp_path / "o" / "supermerge_recipe.yaml").read_text()
    broken = CliRunner().invoke(cli, ["merge", "-", "-o", str(tmp_path / "p")],
                                input="models: [a\n")
    assert broken.exit_code == 1 and "not valid YAML" in broken.stderr
    assert "<stdin>" in broken.stderr
    empty = CliRunner().invoke(cli, ["merge", "-", "-o", str(tmp_path / "p")], input="")
    assert empty.exit_code == 1 and "standard input is empty" in empty.stderr


def test_learn_and_search_read_their_recipe_from_stdin(tmp_path):
    learn = CliRunner().invoke(cli, ["learn", "-", "-o", str(tmp_path / "o")],
                               input="merge_method: supermerge\nnot_a_key: 1\n")
    assert learn.exit_code == 1 and "invalid learn recipe" in learn.stderr
    assert "not_a_key" in learn.stderr
    search = CliRunner().invoke(cli, ["search", "-", "-o", str(tmp_path / "s")],
                                input="merge_method: ties\nmodels: [a, b]\n")
    assert search.exit_code == 1 and "<stdin> has no `search:` block" in search.stderr


# --- --shard-size ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "size"), [
    ("5368709120", 5368709120), ("2GB", 2 * 10**9), ("2gb", 2 * 10**9), ("500MB", 5 * 10**8),
    ("1.5GiB", 3 * 2**29), ("64KiB", 65536), ("100B", 100), ("1_000", 1000)])
def test_shard_size_takes_bytes_or_units(text, size):
    assert screen.ByteSize().convert(text, None, None) == size


def test_shard_size_with_a_unit_shards_the_output(family, tmp_path):
    _, _, base_path, paths = family
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump(recipe("ties", base_path, paths)))
    result = CliRunner().invoke(cli, ["merge", str(rec), "-o", str(tmp_path / "o"),
                                      "--shard-size", "1KB"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "model.safetensors.index.json").is_file()
    bad = CliRunner().invoke(cli, ["merge", str(rec), "-o", str(tmp_path / "p"),
                                   "--shard-size", "2XB"])
    assert bad.exit_code == 2 and "is not a size" in bad.stderr


# --- shell completion --------------------------------------------------------------------


def test_shell_completion_through_the_environment_variable():
    source = CliRunner().invoke(cli, [], prog_name="supermerge",
                                env={"_SUPERMERGE_COMPLETE": "bash_source"})
    assert "_SUPERMERGE_COMPLETE=bash_complete" in source.stdout
    words = CliRunner().invoke(cli, [], prog_name="supermerge",
                               env={"_SUPERMERGE_COMPLETE": "bash_complete",
                                    "COMP_WORDS": "supermerge me", "COMP_CWORD": "1"})
    assert "merge" in words.stdout.split() or "plain,merge" in words.stdout
    assert "methods" in words.stdout


def test_a_stdin_recipe_is_refused_with_data_parallel(tmp_path):
    result = CliRunner().invoke(cli, ["learn", "-", "-o", str(tmp_path / "o"),
                                      "--data-parallel"], input="merge_method: supermerge\n")
    assert result.exit_code == 2 and "needs the recipe as a file" in result.stderr
