"""The Python entry point: ``supermerge.merge(recipe_or_path, out)``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from supermerge.engine import MergeResult, MergeSpec, Progress, execute, plan_merge
from supermerge.recipes import Recipe, load_recipe, parse_recipe


def merge(
    recipe: str | Path | dict[str, Any] | Recipe | MergeSpec,
    out: str | Path,
    *,
    overwrite: bool = False,
    threads: int = 2,
    compute_threads: int | None = None,
    shard_size: int = 5 * 2**30,
    progress: Progress | None = None,
) -> MergeResult:
    """Merge the models a recipe names into a new model directory at ``out``.

    ``recipe`` is a YAML file path, a mapping in the recipe format, a Recipe or an engine
    MergeSpec. Everything is checked from headers before any weight is read (PlanError lists
    every problem); then tensors stream one at a time with about (K + 2) x the largest
    tensor resident. ``threads`` read ahead, ``compute_threads`` torch threads merge
    (default: the cores the readers leave). Returns a MergeResult; ``out`` is published
    atomically.
    """
    if isinstance(recipe, MergeSpec):
        spec = recipe
        recipe_yaml = yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False)
    else:
        root = None
        if isinstance(recipe, str | Path):
            root = Path(recipe).resolve().parent
            recipe = load_recipe(recipe)
        elif isinstance(recipe, dict):
            recipe = parse_recipe(recipe)
        spec = recipe.to_spec(root)
        recipe_yaml = recipe.to_yaml()
    plan = plan_merge(spec, out=Path(out), overwrite=overwrite)
    try:
        return execute(plan, out, overwrite=overwrite, threads=threads,
                       compute_threads=compute_threads, shard_size=shard_size,
                       recipe_yaml=recipe_yaml, progress=progress)
    finally:
        plan.close()


def merge_learned(
    recipe: str | Path | dict[str, Any],
    out: str | Path,
    *,
    overwrite: bool = False,
    shard_size: int = 5 * 2**30,
    progress: Callable[[int, int, float | None], None] | None = None,
):
    """Merge with data as a learn recipe says (SuperMerge, AdaMerging, Fisher, RegMean) and
    export it to ``out``.

    Returns a LearnOutcome: the output path, the method and, for the trained methods, the
    LearnedMerge with its coefficients, tree and losses (None for fisher and regmean).
    ``progress(done, total, loss)`` counts steps (loss None: examples, for fisher and
    regmean). See :mod:`supermerge.recipes.learn` for the recipe format and the costs.
    """
    from supermerge.recipes.learn import run_learn_recipe

    return run_learn_recipe(recipe, out, overwrite=overwrite, shard_size=shard_size,
                            progress=progress)
