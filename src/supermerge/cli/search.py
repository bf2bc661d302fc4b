"""`supermerge search` (CMA-ES over a recipe space) and `supermerge map` (MAP Pareto front).

:func:`register` adds both to the CLI group. The space file is a recipe with a ``search``
block (see :mod:`supermerge.search.space`); its models are experts in the layout the eval
layer builds (a Hugging Face encoder directory with ``heads/<task>.safetensors``), and its
``search.tasks`` are eval tasks (package task names or .jsonl/.csv files), scored on their
validation splits with each task's head. Candidates are scored on resident weights, in
this process, in worker processes (``--workers``) or on Ray actors (``--backend ray``).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import yaml

from supermerge.cli import screen
from supermerge.cli.common import friendly
from supermerge.cli.sources import STDIN_NAME, is_stdin, stdin_document
from supermerge.errors import RecipeError

if TYPE_CHECKING:  # the search layer imports torch: load it when a command runs
    from supermerge.search import Backend, Evaluator, MapResult, SearchSpace


@dataclass(frozen=True)
class TextTaskEvaluator:
    """A picklable factory of the Evaluator for text-classification experts.

    ``experts`` are encoder directories (in the space's model order); each task's head is
    read from the first of them that has ``heads/<task>.safetensors``. Validation texts
    are tokenised once with the base's tokenizer, padded to the longest of the split.
    """

    base: str
    experts: tuple[str, ...]
    tasks: tuple[str, ...]
    max_length: int = 64

    def __call__(self) -> Evaluator:
        """Return the Evaluator; costs one read of the base and of every expert."""
        import torch

        from supermerge.eval import load_encoder, load_head, resolve_tasks
        from supermerge.eval.model import collate, head_path, load_tokenizer, tokenize
        from supermerge.io import open_checkpoint
        from supermerge.learn import CheckpointState, TaskData
        from supermerge.search import Evaluator, SearchTask

        tasks, _ = resolve_tasks(list(self.tasks))
        tokenizer = load_tokenizer(self.base, *self.experts)
        heads, search_tasks = {}, []
        for task in tasks:
            found = [head_path(e, task.name) for e in self.experts
                     if head_path(e, task.name).is_file()]
            if not found:
                raise RecipeError(f"no head for task {task.name!r} in the space's models",
                                  fix=f"the expert for {task.name} must hold "
                                  f"heads/{task.name}.safetensors (built by the eval layer)")
            heads[task.name] = load_head(found[0])
            texts, labels = task.examples("validation")
            inputs = collate(tokenize(tokenizer, texts, self.max_length), tokenizer.pad_token_id)
            search_tasks.append(SearchTask(task.name, TaskData(inputs, torch.tensor(labels),
                                                               f"{task.name}:validation"),
                                           metric=task.score))
        module = load_encoder(self.base)
        with ExitStack() as stack:
            experts = {f"{i}:{Path(p).name}": CheckpointState(stack.enter_context(
                open_checkpoint(p))) for i, p in enumerate(self.experts)}
            return Evaluator(module, module.state_dict(), experts, search_tasks, heads=heads)


def _load(space_file: Path, tasks: tuple[str, ...],
          out: Path) -> tuple[SearchSpace, TextTaskEvaluator]:
    """Read the space and its evaluator factory; model and task paths that exist relative
    to the space file's folder are taken from there (``-``: the space from stdin, paths
    from the working directory). Raises OutputError (the output guard) if ``out`` is, lies
    inside or holds the space file, a model or a task file."""
    from supermerge.io.guard import check_apart
    from supermerge.recipes import parse_recipe
    from supermerge.search import SearchSpace, load_space

    if is_stdin(space_file):
        space, settings = SearchSpace.from_document(stdin_document("search space"),
                                                    STDIN_NAME)
        root = Path.cwd()
        read_from: list[Any] = []
    else:
        space, settings = load_space(space_file)
        root = space_file.resolve().parent
        read_from = [space_file]

    from supermerge.recipes.recipe import locate_path

    recipe = dict(space.recipe, base_model=locate_path(space.recipe["base_model"], root),
                  models=[dict(m, model=locate_path(m["model"], root)) for m in space.models])
    space = SearchSpace(recipe, space.bounds, space.layer_groups)
    parse_recipe(space.recipe_at(space.values([0.5] * len(space))),
                 STDIN_NAME if is_stdin(space_file) else str(space_file))
    names = [s.strip() for value in tasks for s in value.split(",") if s.strip()]
    names = [locate_path(n, root) for n in names or settings.get("tasks") or []]
    if not names:
        raise RecipeError("no tasks to score on", file=str(space_file),
                          fix="list them under search.tasks, or pass --tasks")
    factory = TextTaskEvaluator(recipe["base_model"], tuple(m["model"] for m in space.models),
                                tuple(names), int(settings.get("max_length", 64)))
    check_apart(out, [*read_from, factory.base, *factory.experts, *factory.tasks])
    return space, factory


def _backend(kind: str, factory: TextTaskEvaluator, workers: int, address: str | None,
             threads: int) -> closing[Backend]:
    """The backend, closed when the ``with`` block ends."""
    import torch

    from supermerge.search import make_backend

    torch.set_num_threads(threads)
    return closing(make_backend(kind, factory, workers=workers, address=address,
                                cpus_per_actor=threads))


def _shared(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options of both commands: output, tasks, backend, workers, seed."""
    options = [
        click.argument("space", type=click.Path(exists=True, dir_okay=False, allow_dash=True,
                                                path_type=Path)),
        click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
                     help="Output folder."),
        click.option("--tasks", multiple=True,
                     help="Comma-separated task names or files [default: search.tasks]."),
        click.option("--backend", type=click.Choice(["local", "ray"]), default="local",
                     show_default=True, help="Where candidates are scored."),
        click.option("--workers", default=0, show_default=True,
                     help="local: worker processes (0: this process); ray: actors."),
        click.option("--ray-address", default=None,
                     help="Ray cluster to join ('auto', ray://host:10001) [default: a new "
                     "local Ray]."),
        click.option("--threads", default=1, show_default=True,
                     help="Torch threads per worker (per actor: CPUs reserved)."),
        click.option("--seed", default=0, show_default=True, help="Seed of the search."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command()
@_shared
@click.option("--generations", default=20, show_default=True, help="CMA-ES generations.")
@click.option("--popsize", default=None, type=int,
              help="Candidates per generation [default: 4 + 3 ln D].")
@click.option("--sigma", default=0.25, show_default=True,
              help="Initial step, as a fraction of each parameter's range.")
@click.option("--export/--no-export", default=True, show_default=True,
              help="Merge the best recipe into OUT/model.")
@friendly
def search(space, out, tasks, backend, workers, ray_address, threads, seed, generations,
           popsize, sigma, export):
    """Search SPACE's parameters with CMA-ES on the tasks' validation splits.

    Writes OUT/best_recipe.yaml, OUT/history.csv, OUT/search.json and (with --export)
    the merged model OUT/model. The state is saved to OUT/search_state.pkl after every
    generation: the same command run again resumes the search (raise --generations to go
    further).
    """
    from supermerge.api import merge
    from supermerge.search import cma_search, history_csv

    space_obj, factory = _load(space, tasks, out)
    out.mkdir(parents=True, exist_ok=True)
    bar = screen.progress_bar("searching", total=generations, unit="generation")

    def progress(stage: str, generation: int, planned: int, best: float, /) -> None:
        bar.set_postfix(best=f"{best:.4f}", refresh=False)
        bar.update(generation - bar.n)

    with _backend(backend, factory, workers, ray_address, threads) as scorer:
        try:
            result = cma_search(space_obj, scorer, generations=generations, popsize=popsize,
                                sigma0=sigma, seed=seed, state=out / "search_state.pkl",
                                progress=progress)
        finally:
            bar.close()
    best = result.best
    (out / "best_recipe.yaml").write_text(yaml.safe_dump(result.best_recipe, sort_keys=False))
    (out / "history.csv").write_text(history_csv(space_obj, result.history))
    summary = {"evaluations": result.evaluations, "stopped": result.stopped,
               "settings": result.settings, "best": {
                   "values": dict(zip(space_obj.labels, best.values, strict=True)),
                   "validation": best.scores.per_task, "fitness": best.fitness,
                   "generation": best.generation}}
    (out / "search.json").write_text(json.dumps(summary, indent=2) + "\n")
    click.echo(f"{result.evaluations} candidates scored ({result.stopped}); best fitness "
               f"{best.fitness:.4f} at generation {best.generation}")
    for task, score in best.scores.per_task.items():
        click.echo(f"  {task}: {score:.4f} (validation)")
    click.echo(f"wrote {out / 'best_recipe.yaml'}, {out / 'history.csv'}, "
               f"{out / 'search.json'}")
    if export:
        merged = merge(result.best_recipe, out / "model", overwrite=True)
        click.echo(f"merged the best recipe -> {merged.out}")


@click.command(name="map")
@_shared
@click.option("--checks", default=5, show_default=True,
              help="Front points re-measured to compare with their prediction.")
@click.option("--resolution", default=None, type=int,
              help="Grid points per dimension for the front [default: 101, 21 for 3-D].")
@click.option("--points", default=None, type=int,
              help="Design points [default: 3-level factorial up to 3-D, else 2 x terms].")
@friendly
def map_command(space, out, tasks, backend, workers, ray_address, threads, seed, checks,
                resolution, points):
    """Fit MAP's quadratic surrogates over SPACE and write the predicted Pareto front.

    Writes OUT/map.json (surrogates, front, checks with their recipes), OUT/front.csv,
    OUT/design.csv and, for 2 tasks, OUT/front.png.
    """
    from supermerge.plotting import can_plot
    from supermerge.search import history_csv, map_front, plot_front

    space_obj, factory = _load(space, tasks, out)
    out.mkdir(parents=True, exist_ok=True)
    with _backend(backend, factory, workers, ray_address, threads) as scorer:
        result = map_front(space_obj, scorer, points=points, resolution=resolution,
                           checks=checks, seed=seed)
    (out / "map.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (out / "design.csv").write_text(history_csv(space_obj, result.measured))
    (out / "front.csv").write_text(_front_csv(result))
    written = ["map.json", "design.csv", "front.csv"]
    if len(result.tasks) == 2 and can_plot(str(out / "front.png")):
        plot_front(result, out / "front.png")
        written.append("front.png")
    click.echo(f"{result.evaluations} candidates scored; {len(result.front_units)} front "
               "points predicted")
    for task, surrogate in result.surrogates.items():
        click.echo(f"  surrogate {task}: R² {surrogate.r2:.3f}")
    click.echo("re-measured front points (predicted -> measured):")
    for check, predicted in zip(result.checks, result.check_predicted, strict=True):
        cells = ", ".join(f"{t} {p:.3f} -> {check.scores.per_task[t]:.3f}"
                          for t, p in zip(result.tasks, predicted, strict=True))
        click.echo(f"  {cells}")
    click.echo("wrote " + ", ".join(str(out / name) for name in written))


def _front_csv(result: MapResult) -> str:
    """The predicted front: one row per point, its parameter values and predictions."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*result.space.labels, *(f"predicted {t}" for t in result.tasks)])
    for unit, predicted in zip(result.front_units, result.front_predicted, strict=True):
        writer.writerow([*result.space.values(unit), *predicted])
    return out.getvalue()


def register(cli_group: click.Group) -> None:
    """Add `search` and `map` to the CLI group."""
    for command in (search, map_command):
        cli_group.add_command(command)
