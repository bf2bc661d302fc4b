"""The user's own labelled files on the command line: `--data TASK=FILE` for `evaluate`,
and `supermerge sweep` (a data-free method's parameters picked on those files)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from supermerge.cli import screen
from supermerge.cli.common import friendly
from supermerge.errors import RecipeError


def pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    """``("spam=a.jsonl", ...)`` -> ``{"spam": "a.jsonl"}``; RecipeError for a value
    without ``=`` or a task given twice."""
    found: dict[str, str] = {}
    for value in values:
        task, sep, path = value.partition("=")
        if not sep or not task or not path:
            raise RecipeError(f"{option} {value!r} is not TASK=PATH",
                              fix=f"write {option} spam=spam-validation.jsonl")
        if task in found:
            raise RecipeError(f"{option} names task {task!r} twice", fix="give each task once")
        found[task] = path
    return found


def data_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--data, --expert, --input-key, --label-key, --max-length."""
    options = [
        click.option("--data", "data", multiple=True, metavar="TASK=FILE",
                     help="A task's labelled JSONL or CSV file (repeat per task); each task "
                     "is answered by its own model (supermerge.load_task_model)."),
        click.option("--expert", "experts", multiple=True, metavar="TASK=PATH",
                     help="The task's expert, to normalise by [default: the one the merge "
                     "recorded in heads/<task>.json]."),
        click.option("--input-key", default="input", show_default=True,
                     help="The field of the text."),
        click.option("--label-key", default="label", show_default=True,
                     help="The field of the label (a class index or a label name)."),
        click.option("--max-length", default=128, show_default=True,
                     help="Tokens kept per example."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def grid(values: tuple[str, ...]) -> dict[str, list[Any]]:
    """``("lambda=0.3,0.5",)`` -> ``{"lambda": [0.3, 0.5]}`` (each value read as YAML)."""
    import yaml

    found: dict[str, list[Any]] = {}
    for value in values:
        name, sep, listed = value.partition("=")
        if not sep or not name or not listed.strip():
            raise RecipeError(f"--param {value!r} is not NAME=V1,V2,...",
                              fix="write --param lambda=0.3,0.5,0.7,1.0")
        found[name] = [yaml.safe_load(v) for v in listed.split(",")]
    return found


def show_report(report: Any, json_path: Path | None, markdown_path: Path | None) -> None:
    """Print a report's table; write it as JSON and Markdown where asked."""
    from supermerge.eval import report_rows, text_table
    from supermerge.eval.report import markdown_table

    rows = report_rows(report)
    click.echo(text_table(rows))
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        click.echo(f"wrote {json_path}")
    if markdown_path is not None:
        markdown_path.write_text(markdown_table(rows))
        click.echo(f"wrote {markdown_path}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Where the best merge is published.")
@click.option("--param", "params", multiple=True, required=True, metavar="NAME=V1,V2,...",
              help="Values of a recipe parameter to try (repeat for a grid).")
@data_options
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--threads", default=2, show_default=True, help="Reader threads of each merge.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write every point's scores as JSON here.")
@friendly
def sweep(recipe, out, params, data, experts, input_key, label_key, max_length, overwrite,
          threads, json_path):
    """Merge RECIPE at each point of a --param grid, score each task's model on its --data
    file, keep the best merge at OUT (mean accuracy normalised by the experts)."""
    from supermerge.cli.bench import _screen
    from supermerge.io.guard import check_apart
    from supermerge.run.sweep import sweep as run_sweep

    files = pairs(data, "--data")
    if not files:
        raise RecipeError("no --data file to score on", fix="add --data TASK=FILE per task")
    if json_path is not None:
        check_apart(json_path, [recipe, out, *files.values()])
    with _screen(1) as bars:
        result = run_sweep(recipe, grid(params), files, out, experts=pairs(experts, "--expert"),
                           input_key=input_key, label_key=label_key, max_length=max_length,
                           overwrite=overwrite, threads=threads, progress=bars)
    tasks = list(files)
    click.echo(" | ".join(["parameters", *tasks, "score"]))
    for point in result.points:
        mark = "  <- kept" if point is result.best else ""
        click.echo(" | ".join([", ".join(f"{k}={v}" for k, v in point.parameters.items()),
                               *(f"{point.report.scores[t].score:.3f}" for t in tasks),
                               f"{point.score:.3f}{mark}"]))
    if json_path is not None:
        json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        click.echo(f"wrote {json_path}")
    click.echo(f"wrote {result.out}")


def register(cli_group: click.Group) -> None:
    """Add `sweep` to the CLI group."""
    cli_group.add_command(sweep)
    screen.verbosity_options(sweep)
