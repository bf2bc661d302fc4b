"""benchmarks/vs_mergekit.py without mergekit: its configs, supermerge's side and the table,
on a tiny Llama, so the benchmark cannot rot (mergekit itself is never installed here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vs_mergekit", ROOT / "benchmarks" /
                                                  "vs_mergekit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["vs_mergekit"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("vs_mergekit", None)


@pytest.fixture(scope="module")
def tiny(bench, tmp_path_factory):
    root = tmp_path_factory.mktemp("vs")
    config = bench.llama_config(3e4, hidden=32, intermediate=64, vocab=128)
    return root, bench.build_models(root, config)


def test_tiny_llama_checkpoints(bench, tiny):
    _, dirs = tiny
    assert [d.name for d in dirs] == ["base", "expert1", "expert2", "expert3"]
    base, expert = (load_file(str(bench.files(d)[0])) for d in dirs[:2])
    assert base["lm_head.weight"].shape == (128, 32)
    assert base["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert not torch.equal(base["model.norm.weight"], expert["model.norm.weight"])
    assert '"LlamaForCausalLM"' in (dirs[0] / "config.json").read_text()


def test_configs_match_semantics(bench, tiny):
    _, dirs = tiny
    theirs, ours = bench.configs("ties", dirs)
    assert theirs["dtype"] == "float32" and theirs["out_dtype"] == "bfloat16"
    assert ours["dtype"] == "bfloat16" and "out_dtype" not in ours
    assert theirs["parameters"] == {"density": 0.2, "normalize": True}
    assert ours["parameters"] == {"density": 0.2, "normalize": True, "sign_on_weighted": True}
    assert [m["parameters"]["weight"] for m in ours["models"]] == [1.0, 0.7, 0.4]
    assert ours["base_model"] == str(dirs[0]) and len(ours["models"]) == 3
    theirs, ours = bench.configs("slerp", dirs)  # the base listed first: t = 0 is the base
    assert [m["model"] for m in theirs["models"]] == [str(dirs[0]), str(dirs[1])]
    assert "parameters" not in theirs["models"][0] and theirs["parameters"] == {"t": 0.5}
    _, ours = bench.configs("linear", dirs)
    assert "base_model" not in ours
    assert bench.read_bytes(dirs, "linear") == 3 * bench.read_bytes(dirs, "passthrough")
    assert bench.read_bytes(dirs, "slerp") == 2 * bench.read_bytes(dirs, "passthrough")


def test_supermerge_side_and_table_without_mergekit(bench, tiny):
    root, dirs = tiny
    rows = [bench.compare(root, dirs, name, None, throughput=1e9)
            for name in ("ties", "slerp", "dare_ties")]
    for row in rows:
        assert row.note == "" and row.ours is not None and row.theirs is None
        assert row.ours.cpu > 0 and row.bound > 0
    assert not list(root.glob("out-*"))  # outputs removed
    lines = bench.table(rows).splitlines()
    assert lines[0].startswith("| method | mergekit CPU s | supermerge CPU s | CPU ratio |")
    assert len(lines) == 2 + len(rows)
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert cells[0] == "ties" and cells[1] == "-" and float(cells[2]) > 0 and cells[3] == "-"
    assert cells[4].startswith("- / ") and cells[5] == "-"


def test_max_abs_diff_of_two_outputs(bench, tiny, tmp_path):
    _, dirs = tiny
    assert bench.max_abs_diff(dirs[0], dirs[0]) == 0.0
    expected = max((load_file(str(bench.files(dirs[0])[0]))[n].float()
                    - t.float()).abs().max().item()
                   for n, t in load_file(str(bench.files(dirs[1])[0])).items())
    assert bench.max_abs_diff(dirs[0], dirs[1]) == pytest.approx(expected)
    assert expected > 0


def test_failed_side_is_a_note_not_a_crash(bench, tiny, tmp_path):
    root, dirs = tiny
    broken = tmp_path / "mergekit-yaml"
    broken.write_text("#!/bin/sh\necho 'no such option' >&2\nexit 2\n")
    broken.chmod(0o755)
    row = bench.compare(root, dirs, "linear", broken, throughput=1e9)
    assert row.theirs is None and row.ours is not None
    assert "mergekit failed: no such option" in row.note and row.diff == ""


def test_bench_extra_pins_the_mergekit_the_script_installs(bench):
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras["bench"] == [bench.MERGEKIT]
    assert not any("mergekit" in d for d in extras["dev"])  # never a dependency of ours
