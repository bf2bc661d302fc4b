"""Recipes for learned merges (`supermerge learn`): base, experts, and each task's data.

::

    merge_method: supermerge            # or adamerging
    base_model: ./base
    head_prefix: classifier.            # each expert's own head, never merged
    architecture: sequence_classification   # or causal_lm
    examples: 32                        # validation examples read per task
    max_length: 64
    experts:
      - model: ./expert-spam
        task: spam                      # the task's name (default: the folder's name)
        data: ./spam-validation.jsonl   # JSONL or CSV, columns `input` and `label`
        labels: [ham, spam]             # class names, when labels are written as names
      - model: ./expert-topic
        data: ./topic.csv
        input_key: text
        label_key: topic
    parameters: {steps: 200, granularity: tensor, hierarchical: false, fan_in: 2}

The module is the experts' architecture (transformers' Auto class for ``architecture``)
loaded with the base model's weights; each task's head comes from its own expert.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from supermerge.errors import RecipeError
from supermerge.io import open_checkpoint
from supermerge.learn import (
    LEARNED_METHODS,
    CheckpointState,
    LearnedMerge,
    Task,
    adamerging,
    export_learned,
    load_task_data,
    supermerge,
)

log = logging.getLogger(__name__)

_RUNNERS: dict[str, Callable[..., LearnedMerge]] = {"supermerge": supermerge,
                                                     "adamerging": adamerging}
_AUTO_CLASSES = {"sequence_classification": "AutoModelForSequenceClassification",
                 "causal_lm": "AutoModelForCausalLM"}


class LearnExpert(BaseModel):
    """One expert and its task's validation data."""

    model_config = ConfigDict(extra="forbid")

    model: str
    task: str | None = Field(None, description="task name (default: the expert's folder name)")
    data: str = Field(description="JSONL or CSV file of validation examples")
    input_key: str = "input"
    label_key: str = "label"
    labels: list[str] | None = Field(None, description="class names, if labels are names")

    @property
    def task_name(self) -> str:
        return self.task or Path(self.model).name


class LearnRecipe(BaseModel):
    """A learned merge: method, base, experts with their data, options."""

    model_config = ConfigDict(extra="forbid")

    merge_method: Literal["supermerge", "adamerging"]
    base_model: str
    experts: list[LearnExpert] = Field(min_length=1)
    head_prefix: str | None = None
    architecture: Literal["sequence_classification", "causal_lm"] = "sequence_classification"
    examples: int = Field(32, ge=2, description="validation examples read per task")
    max_length: int = Field(128, ge=4)
    parameters: dict[str, Any] = Field(default_factory=dict)

    def to_yaml(self) -> str:
        """The recipe as YAML (saved beside the merged model)."""
        return yaml.safe_dump(self.model_dump(exclude_defaults=True), sort_keys=False)


def load_learn_recipe(source: str | Path | dict[str, Any]) -> tuple[LearnRecipe, Path | None]:
    """Validate a learn recipe (a YAML path or a mapping); returns it and its folder."""
    root = None
    if not isinstance(source, dict):
        path = Path(source)
        if not path.is_file():
            raise RecipeError("recipe file not found", file=path, fix="check the path")
        try:
            source = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise RecipeError(f"not valid YAML: {err}", file=path,
                              fix="fix the YAML syntax") from None
        root = path.resolve().parent
    try:
        recipe = LearnRecipe.model_validate(source)
    except ValidationError as err:
        details = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}"
                            for e in err.errors())
        raise RecipeError(f"invalid learn recipe: {details}",
                          fix=f"valid top-level keys: {', '.join(LearnRecipe.model_fields)}"
                          ) from None
    method = next(m for m in LEARNED_METHODS if m.name == recipe.merge_method)
    method.validate(recipe.parameters)
    return recipe, root


@dataclass
class LearnOutcome:
    """What `supermerge learn` did."""

    out: Path
    merge: LearnedMerge


def run_learn_recipe(
    source: str | Path | dict[str, Any],
    out: str | Path,
    *,
    overwrite: bool = False,
    shard_size: int = 5 * 2**30,
    progress: Callable[[int, int, float], None] | None = None,
) -> LearnOutcome:
    """Learn the merge a recipe describes and export it to ``out``; returns a LearnOutcome.

    Everything that can be checked before training is: the recipe, every path, every data
    file (read and validated against its head) and the experts' tensor names. Costs the
    method's training steps on the tasks' validation examples; the experts are read
    lazily, one tensor at a time.
    """
    recipe, root = load_learn_recipe(source)
    if Path(out).exists() and not overwrite:
        raise RecipeError("the output already exists", file=out,
                          fix="pass --overwrite or choose another output path")
    transformers = _transformers()
    locate = lambda p: str(root / p) if root and (root / p).exists() else p  # noqa: E731
    base_dir = Path(locate(recipe.base_model))
    expert_dirs = {e.task_name: Path(locate(e.model)) for e in recipe.experts}
    if len(expert_dirs) != len(recipe.experts):
        raise RecipeError("two experts share a task name", fix="give each expert its own `task`")
    checkpoints = {name: open_checkpoint(path) for name, path in expert_dirs.items()}
    first_dir = next(iter(expert_dirs.values()))
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    tasks = [
        Task(e.task_name, load_task_data(
            locate(e.data), kind="causal_lm" if recipe.architecture == "causal_lm"
            else "classification", tokenizer=tokenizer, input_key=e.input_key,
            label_key=e.label_key, label_names=e.labels, max_length=recipe.max_length,
            limit=recipe.examples),
             "causal_lm" if recipe.architecture == "causal_lm" else "classification")
        for e in recipe.experts]
    auto = getattr(transformers, _AUTO_CLASSES[recipe.architecture])
    config = transformers.AutoConfig.from_pretrained(first_dir)
    module = auto.from_pretrained(base_dir, config=config).eval()
    merge = _RUNNERS[recipe.merge_method](
        module, module.state_dict(),
        {name: CheckpointState(ckpt) for name, ckpt in checkpoints.items()}, tasks,
        head_prefix=recipe.head_prefix, progress=progress, **recipe.parameters)
    path = export_learned(out, merge, method=recipe.merge_method,
                          base_models=[str(base_dir), *map(str, expert_dirs.values())],
                          recipe_yaml=recipe.to_yaml(), model_dir=first_dir,
                          overwrite=overwrite, shard_size=shard_size)
    return LearnOutcome(path, merge)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise RecipeError("learned merges of Hugging Face models need transformers",
                          fix="pip install 'supermerge[hf]'") from None
    return transformers
