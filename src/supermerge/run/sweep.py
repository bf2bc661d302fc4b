"""``supermerge sweep``: pick a data-free method's parameters on the user's own labelled
files: merge at each point of a grid, score every task's model, keep the best merge."""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supermerge.errors import RecipeError
from supermerge.eval.evaluate import EvalReport
from supermerge.eval.task_model import evaluate_task_models
from supermerge.io.guard import check_output
from supermerge.progress import Progress
from supermerge.recipes import Recipe, load_recipe, parse_recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepPoint:
    """One merge of the grid: its parameter values and its scores."""

    parameters: dict[str, Any]
    report: EvalReport

    @property
    def score(self) -> float:
        """What the sweep maximises: the mean normalised accuracy when every task has an
        expert score, else the mean accuracy."""
        normalized = self.report.normalized
        return normalized if normalized is not None else self.report.average


@dataclass(frozen=True)
class SweepResult:
    """Every point in grid order, and the best one (kept at ``out``)."""

    out: Path
    points: list[SweepPoint]
    best: SweepPoint

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: each point's parameters, per-task accuracy and score; the best."""
        return {"out": str(self.out), "best": self.best.parameters,
                "points": [{"parameters": p.parameters, "score": p.score,
                            **p.report.to_dict()} for p in self.points]}


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Return every combination of the grid's values (the last key varying fastest)."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True))
            for values in itertools.product(*(grid[k] for k in keys))]


def sweep(
    recipe: str | Path | dict[str, Any] | Recipe,
    grid: Mapping[str, Sequence[Any]],
    data: Mapping[str, str | Path],
    out: str | Path,
    *,
    experts: Mapping[str, str | Path] | None = None,
    input_key: str = "input",
    label_key: str = "label",
    max_length: int = 128,
    overwrite: bool = False,
    threads: int = 2,
    progress: Progress | None = None,
) -> SweepResult:
    """Merge ``recipe`` once per point of ``grid`` (recipe parameter -> values, set in its
    top-level ``parameters``), score each task's model on its file in ``data``, and
    publish the best merge at ``out``; returns a :class:`SweepResult`.

    Each candidate is written to a temporary folder beside ``out`` and deleted once scored;
    experts are scored once. Costs one merge and one evaluation per point, then one more
    merge of the best point. RecipeError for an empty grid; the output is checked before
    the first merge.
    """
    from supermerge.api import merge

    if not grid or not all(grid.values()):
        raise RecipeError("the sweep has no grid", fix="give --param NAME=V1,V2,...")
    base_recipe, root = _recipe(recipe)
    out = Path(out)
    located = base_recipe.located(root)
    check_output(out, inputs=[located.base_model, *(m.model for m in located.models),
                              *data.values()], overwrite=overwrite)
    points, expert_scores = [], None
    options = dict(experts=experts, input_key=input_key, label_key=label_key,
                   max_length=max_length)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.sweep-",
                                     dir=out.resolve().parent) as scratch:
        for index, values in enumerate(grid_points(grid)):
            candidate = Path(scratch) / str(index)
            merge(_with(base_recipe, values, root), candidate, threads=threads)
            label = ", ".join(f"{k}={v}" for k, v in values.items())
            report = evaluate_task_models(candidate, data, expert_scores=expert_scores,
                                          label=label, progress=progress, **options)
            expert_scores = {t: s.expert for t, s in report.scores.items()
                             if s.expert is not None}
            points.append(SweepPoint(values, report))
            log.info("sweep %s: score %.4f", label, points[-1].score)
            shutil.rmtree(candidate)
    best = max(points, key=lambda point: point.score)  # the first of equal scores
    merge(_with(base_recipe, best.parameters, root), out, overwrite=overwrite, threads=threads)
    return SweepResult(out, points, best)


def _recipe(recipe: str | Path | dict[str, Any] | Recipe) -> tuple[Recipe, Path | None]:
    if isinstance(recipe, Recipe):
        return recipe, None
    if isinstance(recipe, dict):
        return parse_recipe(recipe), None
    return load_recipe(recipe), Path(recipe).resolve().parent


def _with(recipe: Recipe, values: Mapping[str, Any], root: Path | None) -> Recipe:
    """The recipe with ``values`` in its top-level parameters and its paths resolved
    against its folder."""
    return recipe.located(root).model_copy(
        update={"parameters": {**recipe.parameters, **values}})
