"""The Python entry point: ``supermerge.merge(recipe_or_path, out)``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from supermerge.engine import MergeResult, MergeSpec, ModelSpec, execute, plan_merge
from supermerge.errors import RecipeError
from supermerge.progress import Progress
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
    out = _output_path(out)
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
        elif not isinstance(recipe, Recipe):
            raise _not_a_recipe(recipe, "a merge recipe: a YAML file path, a mapping of its "
                                "keys, a Recipe or a MergeSpec")
        spec = recipe.to_spec(root)
        recipe_yaml = recipe.to_yaml()
    plan = plan_merge(spec, out=out, overwrite=overwrite)
    try:
        return execute(plan, out, overwrite=overwrite, threads=threads,
                       compute_threads=compute_threads, shard_size=shard_size,
                       recipe_yaml=recipe_yaml, progress=progress)
    finally:
        plan.close()


def extract(
    base: str | Path,
    tuned: str | Path,
    out: str | Path,
    *,
    rank: int,
    svd: str = "exact",
    overwrite: bool = False,
    threads: int = 2,
    progress: Progress | None = None,
) -> MergeResult:
    """Extract a LoRA adapter of rank ``rank`` from a dense fine-tune: ``tuned - base``
    per tensor, factored by truncated SVD into a PEFT adapter folder at ``out`` (mergekit's
    extract-lora). Targets are every float ``.weight`` of 2+ dimensions (or, when ``tuned``
    is itself an adapter, its modules); changed whole modules go to modules_to_save.

    Returns the MergeResult whose ``adapter`` holds each tensor's captured energy and exact
    relative error. Cost: headers first, then one base and one tuned tensor resident at a
    time plus one thin SVD per changed target, O(m n min(m, n)); ``svd="randomized"``
    makes that O(m n (rank + 8)) at a slightly larger error (seeded: the same bytes
    every run).
    """
    spec = MergeSpec(method="passthrough", models=[ModelSpec(str(tuned))],
                     base_model=str(base), output="adapter", rank=rank, svd=svd)
    return merge(spec, out, overwrite=overwrite, threads=threads, progress=progress)


def merge_learned(
    recipe: str | Path | dict[str, Any],
    out: str | Path,
    *,
    overwrite: bool = False,
    shard_size: int = 5 * 2**30,
    progress: Progress | None = None,
):
    """Merge with data as a learn recipe says (SuperMerge, AdaMerging, Fisher, RegMean) and
    export it to ``out``.

    Returns a LearnOutcome: the output path, the method and, for the trained methods, the
    LearnedMerge with its coefficients, tree and losses (None for fisher and regmean).
    ``progress(stage, done, total, loss)`` counts steps (stage "learn"; loss None: examples,
    stage "statistics", for fisher and regmean). See :mod:`supermerge.recipes.learn` for
    the recipe format and the costs.
    """
    from supermerge.recipes.learn import run_learn_recipe

    out = _output_path(out)
    if not isinstance(recipe, str | Path | dict):
        raise _not_a_recipe(recipe, "a learn recipe: a YAML file path or a mapping of its keys")
    return run_learn_recipe(recipe, out, overwrite=overwrite, shard_size=shard_size,
                            progress=progress)


def _not_a_recipe(value: Any, expected: str) -> RecipeError:
    return RecipeError(f"the recipe is a {type(value).__name__}, not {expected}",
                       fix="pass the recipe's path, e.g. merge('recipe.yaml', 'out/'), or its "
                       "keys as a dict (see the README's recipe format)")


def _output_path(out: Any) -> Path:
    """``out`` as a Path; RecipeError for anything that is not a path."""
    if not isinstance(out, str | Path) or not str(out):
        raise RecipeError(f"the output is {_repr(out)}, not a folder path",
                          fix="pass the output folder as a str or Path, e.g. 'merged/'")
    return Path(out)


def _repr(value: Any) -> str:
    return repr(value) if len(repr(value)) <= 40 else f"a {type(value).__name__}"
