"""Packaging: licence, changelog, typed marker, extras; charts degrade without matplotlib."""

from __future__ import annotations

import logging
import sys
import tomllib
from pathlib import Path

import pytest

import supermerge

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_the_apache_2_text_the_metadata_names():
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_changelog_has_an_unreleased_section_and_the_first_release():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "keepachangelog.com" in text
    assert "## [Unreleased]" in text and f"## [{supermerge.__version__}]" in text


def test_the_package_ships_its_typed_marker():
    assert (Path(supermerge.__file__).parent / "py.typed").is_file()
    assert "py.typed" in pyproject()["tool"]["setuptools"]["package-data"]["supermerge"]


def test_matplotlib_is_an_extra_and_dev_pulls_it_and_huggingface_hub_is_in_hf():
    project = pyproject()["project"]
    names = [d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]]
    assert "matplotlib" not in names and "huggingface_hub" not in names
    extras = project["optional-dependencies"]
    assert any(d.startswith("matplotlib") for d in extras["plot"])
    assert "plot" in extras["dev"][0] and "hf" in extras["dev"][0]
    # hub ids are opened from the local cache (supermerge.io.hub), imported only there
    assert any(d.startswith("huggingface_hub") for d in extras["hf"])
    root = Path(supermerge.__file__).parent
    importers = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                       if "from huggingface_hub" in p.read_text()
                       or "import huggingface_hub" in p.read_text())
    assert importers == ["io/hub.py"]


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib made unimportable, as in an install without the `plot` extra."""
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_can_plot_says_what_is_missing(no_matplotlib, caplog):
    from supermerge.plotting import can_plot

    with caplog.at_level(logging.WARNING, logger="supermerge"):
        assert can_plot("chart.png") is False
    assert "chart.png not drawn: matplotlib is not installed" in caplog.text
    assert "supermerge[plot]" in caplog.text


def test_benchmark_results_without_matplotlib_skip_only_the_chart(no_matplotlib, tmp_path,
                                                                  monkeypatch, caplog):
    from supermerge.eval import report

    monkeypatch.setattr(report, "benchmark_markdown", lambda results: "| table |\n")
    with caplog.at_level(logging.WARNING, logger="supermerge"):
        paths = report.write_results({"methods": {}}, tmp_path)
    assert "chart" not in paths and not (tmp_path / "accuracy.png").exists()
    assert (tmp_path / "results.json").is_file() and (tmp_path / "results.md").is_file()
    assert "accuracy.png not drawn" in caplog.text


def test_learned_export_without_matplotlib_skips_only_the_heatmap(no_matplotlib, tmp_path,
                                                                  caplog):
    import torch

    from supermerge.learn import export_learned
    from supermerge.learn import supermerge as learn_supermerge
    from test_learn_toys import two_task_toy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        toy = two_task_toy()
        learned = learn_supermerge(toy.module, toy.base_state, toy.experts, toy.tasks(),
                                   head_prefix="head.", granularity="task", steps=2)
    finally:
        torch.set_num_threads(threads)
    with caplog.at_level(logging.WARNING, logger="supermerge"):
        out = export_learned(tmp_path / "merged", learned, method="supermerge",
                             base_models=["base", "a", "b"], recipe_yaml="method: x\n")
    assert (out / "coefficients.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "coefficients.png").exists()
    assert "coefficients.png not drawn" in caplog.text
