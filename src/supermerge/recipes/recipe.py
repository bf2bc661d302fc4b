"""Recipes: YAML merge configurations, validated by pydantic, in mergekit's format.

A recipe accepts mergekit's keys for the methods both tools have::

    merge_method: ties
    base_model: ./base
    models:
      - model: ./math
        parameters: {weight: 1.0, density: 0.2}
      - model: ./code
        parameters: {density: [0.1, 0.3]}   # a gradient over the layers
    parameters: {lambda: 1.0}
    dtype: bfloat16

A ``continual:`` recipe continues a previous ``opcm`` merge with new experts (its base,
parameters and state come from that output's ``merge_state.json``)::

    merge_method: opcm
    continual: ./merged-1-to-4      # never modified: the result is a new output
    models: [./expert5]

plus supermerge's own keys (``seed``, ``compute_dtype``, ``on_missing``, ``vocab``,
``on_nonfinite``, ``heads``, and per model ``task`` and ``prefix``)::

    heads: classifier.              # task heads: never merged, each kept under heads/
    models:
      - model: ./bert-spam          # BertForSequenceClassification of a BertModel base
        prefix: {"bert.": ""}       # its names' prefix -> the base's (found automatically
        task: spam                  #   when consistent); the head's file: heads/spam...
 Differences from mergekit are documented in the README: ``dtype`` is the
*output* dtype here (computation is float32 unless ``compute_dtype`` says otherwise), and
a base model listed again under ``models`` is dropped for methods that merge task vectors
(its task vector is zero), as mergekit does.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from supermerge.engine import MergeSpec, ModelSpec, SliceSource, SliceSpec
from supermerge.engine.merge_state import read_merge_state
from supermerge.engine.slices import order_for_method, same_path
from supermerge.errors import RecipeError, validation_details
from supermerge.io.lora import split_base_adapter
from supermerge.learn.registry import LEARNED_METHODS
from supermerge.methods import get_method
from supermerge.recipes.tokenizer import RecipeTokenizer, locate_source, tokenizer_spec

log = logging.getLogger(__name__)

_UNSUPPORTED = {
    "chat_template": "the chat template is copied from the base model's tokenizer files",
    "modules": "per-module recipes are not supported; use `filter` values in `parameters`",
}


class RecipeModel(BaseModel):
    """One input model in a recipe."""

    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    prefix: dict[str, str] | None = Field(
        None, description="this model's tensor-name prefix -> the reference's ({'bert.': ''}); "
        "a string is a prefix the reference lacks")
    task: str | None = Field(None, description="its task's name (heads/<task>.safetensors)")

    @field_validator("prefix", mode="before")
    @classmethod
    def _prefix_shorthand(cls, value: Any) -> Any:
        """Accept ``prefix: bert.`` as ``{bert.: ''}``."""
        return {value: ""} if isinstance(value, str) else value

    @field_validator("task")
    @classmethod
    def _task_is_a_file_name(cls, value: str | None) -> str | None:
        if value is not None:
            check_file_name(value, "the task name (`task:`)")
        return value


class RecipeSliceSource(BaseModel):
    """One source of an output slice: a model's layers ``layer_range[0]`` to
    ``layer_range[1] - 1`` (half-open, as mergekit's)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    layer_range: list[int] = Field(min_length=2, max_length=2)
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: list[int]) -> list[int]:
        start, end = value
        if not 0 <= start < end:
            raise ValueError(f"layer_range [{start}, {end}] must be [start, end] with "
                             "0 <= start < end (half-open: [0, 4] is layers 0 to 3)")
        return value


class RecipeSlice(BaseModel):
    """One output slice (mergekit's ``slices:`` entry)."""

    model_config = ConfigDict(extra="forbid")

    sources: list[RecipeSliceSource] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    base_model: str | None = None
    residual_weight: float | None = Field(
        None, description="accepted as mergekit accepts it; mergekit's planner never uses it")


class Recipe(BaseModel):
    """A whole merge recipe (mergekit-compatible where the two overlap)."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    base_model: str | None = None
    models: list[RecipeModel] = Field(default_factory=list)
    slices: list[RecipeSlice] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    compute_dtype: str = "float32"
    seed: int = 0
    on_missing: Literal["refuse", "base"] = "refuse"
    vocab: Literal["common_rows", "refuse"] = "common_rows"
    on_nonfinite: Literal["refuse", "warn"] = "refuse"
    heads: list[str] = Field(default_factory=list)
    output: Literal["model", "adapter"] = "model"  # adapter: a PEFT LoRA adapter of `rank`
    rank: int | None = Field(None, ge=1)
    svd: Literal["exact", "randomized"] = "exact"  # how output: adapter factors
    name: str | None = None
    continual: str | None = Field(
        None, description="a previous merge's output folder to continue (opcm): its "
        "merge_state.json gives the base, the parameters and its state; `models` are the "
        "new experts, merged after it in order")
    tokenizer_source: str | None = None  # mergekit's legacy spelling of `tokenizer: {source}`
    tokenizer: RecipeTokenizer | None = None

    @model_validator(mode="after")
    def _one_tokenizer_key(self) -> Recipe:
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give `tokenizer_source` or `tokenizer:`, not both (as mergekit)")
        return self

    @field_validator("heads", mode="before")
    @classmethod
    def _one_head_prefix(cls, value: Any) -> Any:
        """Accept ``heads: classifier.`` as a list of one prefix."""
        return [value] if isinstance(value, str) else value

    @field_validator("models", mode="before")
    @classmethod
    def _plain_paths(cls, value: Any) -> Any:
        """Accept `- ./path` as shorthand for `- model: ./path`."""
        if isinstance(value, list):
            return [{"model": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _models_or_slices(self) -> Recipe:
        """mergekit's rule: a recipe lists `models` or `slices`, not both."""
        if self.slices is not None and self.models:
            raise ValueError("give either `models` (whole models) or `slices` (layer ranges), "
                             "not both")
        if self.slices is not None and not self.slices:
            raise ValueError("`slices` is empty: list at least one slice")
        if self.slices is not None and any(piece.residual_weight is not None
                                           for piece in self.slices):
            log.info("`residual_weight` changes nothing (mergekit never uses it either)")
        return self

    def to_spec(self, root: Path | None = None) -> MergeSpec:
        """Return the engine's MergeSpec; relative paths resolve against ``root`` when they
        exist there (the recipe's folder), else against the working directory."""
        method = get_method(self.merge_method)
        warn_repeated_models([m.model for m in self.models], root, "models")
        base = locate_path(self.base_model, root) if self.base_model else None
        models = [ModelSpec(locate_path(m.model, root), dict(m.parameters), prefix=m.prefix,
                            task=m.task) for m in self.models]
        parameters, resume = dict(self.parameters), None
        if self.continual is not None:
            resume = locate_path(self.continual, root)
            state = read_merge_state(resume)  # RecipeError naming the file if absent
            if not self.models:
                raise RecipeError("`continual:` without new experts under `models:`",
                                  fix="list the experts to merge into it under `models:`")
            if method.resume is None:
                raise RecipeError(
                    f"`continual:` continues a merge, which method '{method.name}' cannot do",
                    fix="use `merge_method: opcm` (see `supermerge methods opcm`)")
            base = base or state.base_model
            parameters = {**state.parameters, **parameters}
            models = [ModelSpec(resume, method.resume(state.state)), *models]
        if base is not None:
            models, listed = order_for_method(method, models, lambda m: same_path(m.path, base))
            if listed is not None and method.needs_base:
                log.info("base model listed under models: dropped (its task vector is zero)")
        return MergeSpec(
            method=self.merge_method, models=models, base_model=base,
            parameters=parameters, out_dtype=self.out_dtype or self.dtype,
            compute_dtype=self.compute_dtype, seed=self.seed, on_missing=self.on_missing,
            vocab=self.vocab, on_nonfinite=self.on_nonfinite, heads=list(self.heads),
            output=self.output, rank=self.rank, svd=self.svd, resume=resume,
            slices=[SliceSpec([SliceSource(locate_path(s.model, root), list(s.layer_range),
                                           dict(s.parameters)) for s in piece.sources],
                              dict(piece.parameters),
                              locate_path(piece.base_model, root) if piece.base_model else None)
                    for piece in self.slices] if self.slices else None,
            tokenizer=tokenizer_spec(self.tokenizer_source, self.tokenizer,
                                     lambda p: locate_path(p, root)))

    def located(self, root: Path | None) -> Recipe:
        """Return a copy whose model paths are resolved as :meth:`to_spec` resolves them
        (against ``root`` where they exist there): it runs from any working directory."""
        def locate(path: str) -> str:
            return locate_path(path, root)

        return self.model_copy(update={
            "tokenizer_source": self.tokenizer_source and locate_source(self.tokenizer_source,
                                                                        locate),
            "tokenizer": self.tokenizer and self.tokenizer.located(locate),
            "base_model": locate_path(self.base_model, root) if self.base_model else None,
            "continual": locate_path(self.continual, root) if self.continual else None,
            "models": [m.model_copy(update={"model": locate_path(m.model, root)})
                       for m in self.models],
            "slices": [piece.model_copy(update={
                "base_model": locate_path(piece.base_model, root) if piece.base_model else None,
                "sources": [s.model_copy(update={"model": locate_path(s.model, root)})
                            for s in piece.sources]}) for piece in self.slices]
            if self.slices else None})

    def to_yaml(self) -> str:
        """The recipe as YAML (what is saved beside the merged model)."""
        return yaml.safe_dump(self.model_dump(exclude_defaults=True), sort_keys=False)


def locate_path(path: str, root: Path | None) -> str:
    """Return ``path`` as a recipe means it: against ``root`` (the recipe's folder) where
    it exists there, each half of ``BASE+ADAPTER`` likewise, else as written (relative to
    the working directory). Costs a few ``stat`` calls."""
    if root is not None and not Path(path).is_absolute() and (root / path).exists():
        return str(root / path)
    if root is not None and "+" in path and not Path(path).exists():
        # BASE+ADAPTER: each half against the recipe's folder
        for i in (i for i, c in enumerate(path) if c == "+"):
            spelled = f"{locate_path(path[:i], root)}+{locate_path(path[i + 1:], root)}"
            if split_base_adapter(spelled) is not None:
                return spelled
    return path


def warn_repeated_models(paths: list[str], root: Path | None, key: str) -> None:
    """Log a warning for each model listed more than once under ``key`` (the same file or
    folder, however spelled): it then counts once per listing, which is rarely meant."""
    counts = Counter(Path(locate_path(p, root)).resolve() for p in paths)
    for path, count in counts.items():
        if count > 1:
            log.warning("%s is listed %d times under `%s`: it enters the merge %d times; "
                        "list it once (and give it a larger weight if that is the intent)",
                        path, count, key, count)


def check_file_name(name: str, what: str) -> None:
    """Raise ValueError unless ``name`` can name a file in an output folder: not empty, not
    ``.`` or ``..``, no ``/``, ``\\`` or NUL (a recipe cannot write outside its output)."""
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise ValueError(f"{what} {name!r} cannot name a file: use a name without '/', "
                         "'\\' or '..'")


def parse_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe mapping; RecipeError with every problem and the valid keys."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source} must be a mapping of keys to values", file=source,
                          fix="see the README's recipe format")
    for key, why in _UNSUPPORTED.items():
        if key in data:
            raise RecipeError(f"mergekit key `{key}` is not supported", file=source, fix=why)
    data_driven = {m.name: m for m in LEARNED_METHODS}.get(data.get("merge_method"))
    if data_driven is not None:
        raise RecipeError(
            f"`{data_driven.name}` needs {data_driven.needs} data for each expert, which a "
            "merge recipe has no place for", file=source,
            fix="write a learn recipe (each expert with its `data:` file) and run "
            "`supermerge learn RECIPE -o OUT`; see the README, 'Merges from data'")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(
            f"invalid recipe: {validation_details(err)}", file=source,
            fix=f"valid top-level keys: {', '.join(Recipe.model_fields)}") from None


def load_yaml(path: str | Path, what: str = "recipe") -> Any:
    """Return the YAML document in the file at ``path``; RecipeError naming the file when
    it is missing or not valid YAML (``what`` names the file's kind in the message)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{what} file not found", file=path, fix="check the path")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"not valid YAML: {err}", file=path, fix="fix the YAML syntax") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file; RecipeError naming the file on any problem."""
    return parse_recipe(load_yaml(path), str(path))
