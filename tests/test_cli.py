"""The command line: merge, inspect, methods; errors are one clear message and exit code 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import supermerge
from conftest import recipe
from supermerge.cli.main import cli


def write_recipe(tmp_path, data) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_merge_writes_a_model_and_refuses_to_overwrite(family, tmp_path):
    _, _, base_path, paths = family
    rec = write_recipe(tmp_path, recipe("ties", base_path, paths, parameters={"density": 0.5}))
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(cli, ["merge", rec, "-o", str(out), "--threads", "2"])
    assert result.exit_code == 0, result.output
    assert "merged 6 tensors" in result.output
    assert (out / "model.safetensors").exists()
    again = runner.invoke(cli, ["merge", rec, "-o", str(out)])
    assert again.exit_code == 1
    assert "already exists" in again.output and "--overwrite" in again.output
    forced = runner.invoke(cli, ["merge", rec, "-o", str(out), "--overwrite"])
    assert forced.exit_code == 0, forced.output


def test_merge_errors_name_the_problem_without_a_traceback(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(cli, ["merge", str(tmp_path / "none.yaml"), "-o", str(tmp_path / "o")])
    assert missing.exit_code == 1 and "recipe file not found" in missing.output
    assert "Traceback" not in missing.output
    rec = write_recipe(tmp_path, {"merge_method": "magic", "models": ["a"]})
    unknown = runner.invoke(cli, ["merge", rec, "-o", str(tmp_path / "o")])
    assert unknown.exit_code == 1 and "task_arithmetic" in unknown.output


def test_inspect_one_and_two_checkpoints(family):
    _, _, base_path, paths = family
    runner = CliRunner()
    one = runner.invoke(cli, ["inspect", str(base_path)])
    assert one.exit_code == 0, one.output
    assert "model.layers.0.mlp.weight" in one.output and "(8, 8)" in one.output
    assert "6 tensors, 280 parameters" in one.output
    two = runner.invoke(cli, ["inspect", str(base_path), str(paths[0])])
    assert two.exit_code == 0, two.output
    assert "6 differs" in two.output


def test_methods_lists_every_registered_method_and_describes_one():
    runner = CliRunner()
    listing = runner.invoke(cli, ["methods"])
    assert listing.exit_code == 0
    for name in ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp",
                 "nuslerp", "passthrough"]:
        assert f"\n{name} " in listing.output
    ties = runner.invoke(cli, ["methods", "ties"])
    assert "density" in ties.output and "2306.01708" in ties.output
    bad = runner.invoke(cli, ["methods", "tiez"])
    assert bad.exit_code == 1 and "ties" in bad.output


# A `supermerge merge` whose writer stalls after its first tensor, so that a signal lands
# while the temporary folder holds part of the model. SIGINT is restored to Python's
# handler first, as in a terminal: a job started in the background by a non-interactive
# shell (`.ci/run &`) inherits SIGINT ignored, and Python keeps it ignored. The stall is
# many short sleeps, so a signal the kernel hands to one of torch's threads is acted on
# within 0.1 s rather than after one long sleep.
_STALLED_MERGE = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from supermerge.io import writer
real_add = writer.CheckpointWriter.add
def add_then_stall(self, name, tensor):
    real_add(self, name, tensor)
    print("writing", flush=True)
    for _ in range(600):
        time.sleep(0.1)
writer.CheckpointWriter.add = add_then_stall
from supermerge.cli.main import main
sys.argv = ["supermerge", "merge", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize(("signum", "code", "said"), [
    (signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted (Ctrl-C)")])
def test_sigterm_and_ctrl_c_remove_the_partial_output_and_exit_128_plus_signal(
        family, tmp_path, signum, code, said):
    _, _, base_path, paths = family
    rec = write_recipe(tmp_path, recipe("ties", base_path, paths, parameters={"density": 0.5}))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(supermerge.__file__).parents[1])}
    child = subprocess.Popen([sys.executable, "-c", _STALLED_MERGE, rec, "-o", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline() == b"writing\n"
        assert any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir())
        child.send_signal(signum)
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == code, stderr.decode()
    assert said in stderr.decode() and "Traceback" not in stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "recipe.yaml"]
