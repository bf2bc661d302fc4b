"""Recipes for data-driven merges (`supermerge learn`): base, experts, each task's data.

::

    merge_method: supermerge            # adamerging, fisher or regmean
    base_model: ./base
    head_prefix: classifier.            # each expert's own head, never merged
    architecture: sequence_classification   # or causal_lm
    examples: 32                        # examples read per task (see below)
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
    surgery: true                       # or {rank: 16, steps: 200}: Representation Surgery

The module is the experts' architecture (transformers' Auto class for ``architecture``)
loaded with the base model's weights; each task's head comes from its own expert. With
``architecture: pooled_encoder`` each expert is a backbone folder (a Hugging Face encoder)
with its linear head in a file (``head: ./spam-head.safetensors``, ``weight`` [classes,
hidden] and ``bias``); the module mean-pools the encoder's states
(:mod:`supermerge.learn.modules`), the layout of the benchmark's experts.
``supermerge`` needs labelled examples; ``adamerging``, ``fisher`` and ``regmean`` read
only the inputs. ``examples`` defaults to 32 for the trained methods (supermerge,
adamerging) and to the ``examples`` parameter (256) for fisher and regmean, which learn
nothing: they merge in closed form from statistics of the data. An expert's ``weight``
(fisher only) scales its share of the Fisher-weighted average.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from supermerge.engine.heads import HeadMeta
from supermerge.errors import MethodError, RecipeError, validation_details
from supermerge.io import Checkpoint, open_checkpoint
from supermerge.io.guard import check_output
from supermerge.io.lora import input_paths
from supermerge.learn import (
    CheckpointState,
    LearnedMerge,
    LearnedMethod,
    Task,
    export_outcome,
    get_learned_method,
    load_task_data,
)
from supermerge.learn.distributed import TorchDataParallel
from supermerge.learn.method import TRAINED_EXAMPLES, closed_form_run, typed_params
from supermerge.learn.modules import MeanPooledEncoder, read_linear_head
from supermerge.learn.registry import LEARNED_METHODS
from supermerge.learn.surgery import SurgeryParams, with_surgery
from supermerge.methods.registry import Params
from supermerge.progress import Progress
from supermerge.recipes.recipe import check_file_name, load_yaml, locate_path, warn_repeated_models

log = logging.getLogger(__name__)

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
    unlabelled: str | None = Field(
        None, description="JSONL or CSV file of more inputs of the task (input_key only), for "
        "objectives that learn from inputs (distill, entropy) and for fisher and regmean")
    weight: float | None = Field(
        None, gt=0, description="fisher only: the expert's weight in the average (default 1)")
    head: str | None = Field(
        None, description="architecture pooled_encoder: the task's linear head file "
        "(safetensors: weight [classes, hidden], bias)")

    @property
    def task_name(self) -> str:
        return self.task or Path(self.model).name

    @model_validator(mode="after")
    def _task_name_is_a_file_name(self) -> LearnExpert:
        """The task name names the task's head file in the output: no path in it."""
        check_file_name(self.task_name, f"the task name of expert {self.model!r} (`task:`)")
        return self


class LearnRecipe(BaseModel):
    """A learned merge: method, base, experts with their data, options."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str = Field(description="a learned method (`supermerge methods`)")
    base_model: str
    experts: list[LearnExpert] = Field(min_length=1)
    head_prefix: str | None = Field(
        None, description="the prefix of the experts' task heads (`heads:`, as merge recipes "
        "spell it, is the same key)", validation_alias=AliasChoices("head_prefix", "heads"))
    architecture: Literal["sequence_classification", "causal_lm", "pooled_encoder"] = (
        "sequence_classification")
    examples: int | None = Field(
        None, ge=2, description="examples read per task (default: 32 for supermerge and "
        "adamerging, the `examples` parameter for fisher and regmean)")
    max_length: int = Field(128, ge=4)
    parameters: dict[str, Any] = Field(default_factory=dict)
    surgery: bool | dict[str, Any] = Field(
        False, description="Representation Surgery on the merged model: true, or its "
        "parameters (rank, steps, lr, batch_size, seed)")

    @property
    def surgery_params(self) -> dict[str, Any] | None:
        """The surgery's parameters as given (None: no surgery)."""
        if self.surgery is False:
            return None
        return {} if self.surgery is True else dict(self.surgery)

    def to_yaml(self) -> str:
        """The recipe as YAML (saved beside the merged model)."""
        return yaml.safe_dump(self.model_dump(exclude_defaults=True), sort_keys=False)

    @field_validator("head_prefix", mode="before")
    @classmethod
    def _one_head_prefix(cls, value: Any) -> Any:
        """``heads: [classifier.]`` as merge recipes write it: one prefix."""
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError(f"a learned merge takes one head prefix, got {value}")
            return value[0]
        return value

    @model_validator(mode="after")
    def _heads_match_the_architecture(self) -> LearnRecipe:
        """pooled_encoder experts are backbones with a head file each; transformers
        classifiers carry their head (``head_prefix``)."""
        if self.architecture == "pooled_encoder":
            headless = [e.task_name for e in self.experts if e.head is None]
            if headless:
                raise ValueError(f"experts {headless} have no `head` file, which "
                                 "architecture pooled_encoder needs for every expert")
            if self.head_prefix:
                raise ValueError("head_prefix names heads inside the experts; pooled_encoder "
                                 "experts give theirs as `head` files: remove head_prefix")
        elif any(e.head for e in self.experts):
            raise ValueError("`head` files are for architecture: pooled_encoder (backbone "
                             "folders); a transformers classifier carries its head "
                             "(head_prefix)")
        return self

    @model_validator(mode="after")
    def _known_method(self) -> LearnRecipe:
        try:
            get_learned_method(self.merge_method)
        except MethodError as err:
            raise ValueError(f"{err.message}; {err.fix}") from None
        return self

    @property
    def method(self) -> LearnedMethod:
        """The learned method the recipe names."""
        return get_learned_method(self.merge_method)


def load_learn_recipe(source: str | Path | dict[str, Any]) -> tuple[LearnRecipe, Path | None]:
    """Validate a learn recipe (a YAML path or a mapping); returns it and its folder."""
    root = path = None
    if not isinstance(source, dict):
        path = Path(source)
        source = load_yaml(path)
        root = path.resolve().parent
    try:
        recipe = LearnRecipe.model_validate(source)
    except ValidationError as err:
        raise RecipeError(f"invalid learn recipe: {validation_details(err)}",
                          fix=f"valid top-level keys: {', '.join(LearnRecipe.model_fields)}"
                          ) from None
    params = _method_params(recipe)  # validated: MethodError naming every invalid value
    if recipe.surgery_params is not None:
        typed_params("surgery", SurgeryParams, recipe.surgery_params)
    if recipe.architecture == "causal_lm" and params.get("labels") == "exact":  # fisher
        raise RecipeError("labels: exact sums over the classes, which a language model's "
                          "vocabulary makes impractical", file=path,
                          fix="use labels: sampled (the default) for causal_lm")
    warn_repeated_models([e.model for e in recipe.experts], root, "experts")
    with_unlabelled = [e.task_name for e in recipe.experts if e.unlabelled]
    if with_unlabelled and params.get("objective") == "labels":
        raise RecipeError(f"experts {with_unlabelled} have `unlabelled` inputs, which the "
                          "labels objective cannot use", file=path,
                          fix="use objective: distill or labels+distill, or remove `unlabelled`")
    weighted = [e.task_name for e in recipe.experts if e.weight is not None]
    if weighted and "weight" not in recipe.method.model_params.model_fields:
        users = " or ".join(m.name for m in LEARNED_METHODS
                            if "weight" in m.model_params.model_fields)
        raise RecipeError(f"experts {weighted} have a `weight`, which only {users} uses",
                          file=path, fix="remove the experts' `weight`")
    return recipe, root


def _method_params(recipe: LearnRecipe) -> dict[str, Any]:
    """The method's parameters, validated, with its defaults filled in."""
    return recipe.method.validate(recipe.parameters).model_dump()


def _examples(recipe: LearnRecipe) -> int:
    """Examples read per task: the recipe's, else the method's default."""
    if recipe.examples is not None:
        return recipe.examples
    return TRAINED_EXAMPLES if recipe.method.trains else _method_params(recipe)["examples"]


@dataclass
class LearnOutcome:
    """What `supermerge learn` did: the output, and for trained methods the learned merge
    (None for fisher and regmean)."""

    out: Path
    method: str
    merge: LearnedMerge | None


def run_learn_recipe(
    source: str | Path | dict[str, Any],
    out: str | Path,
    *,
    overwrite: bool = False,
    shard_size: int = 5 * 2**30,
    progress: Progress | None = None,
    parallel: TorchDataParallel | None = None,
    merged: str | Path | None = None,
) -> LearnOutcome:
    """Run the data-driven merge a recipe describes, export it to ``out``; returns a
    LearnOutcome.

    ``merged``: a model already merged from the recipe's experts (any method, e.g. from
    `supermerge merge`) that replaces the recipe's method; Representation Surgery (the
    recipe's ``surgery`` parameters, on by default here) is trained on it
    (`supermerge surgery`).

    Everything that can be checked before training is: the recipe, every path, every data
    file (read and validated against its head) and the experts' tensor names. Costs the
    method's training steps on the tasks' examples (fisher: a forward and backward pass
    per example and expert; regmean: a forward pass); the experts are read lazily.

    ``parallel`` (supermerge and adamerging; see :mod:`supermerge.learn.distributed`):
    every rank of the process group runs this with the same arguments, each its share of
    every batch; rank 0 alone writes ``out``, and every rank returns the same merge.
    """
    recipe, root = load_learn_recipe(source)
    method = recipe.method
    surgery = recipe.surgery_params if merged is None else recipe.surgery_params or {}
    if parallel is not None and (surgery is not None or merged is not None):
        raise RecipeError("surgery has no data-parallel mode", fix="run it in one process")
    if parallel is not None and not method.parallel:
        raise RecipeError(f"{recipe.merge_method} has no data-parallel mode",
                          fix="run it in one process; data parallelism is for " + ", ".join(
                              m.name for m in LEARNED_METHODS if m.parallel))
    transformers = _transformers()
    locate = lambda p: locate_path(p, root)  # noqa: E731 -- BASE+ADAPTER: each half too
    base_dir = Path(locate(recipe.base_model))
    expert_dirs = {e.task_name: Path(locate(e.model)) for e in recipe.experts}
    if len(expert_dirs) != len(recipe.experts):
        raise RecipeError("two experts share a task name", fix="give each expert its own `task`")
    # an adapter folder applies to the recipe's base (io.lora)
    checkpoints = {name: open_checkpoint(path, base=str(base_dir))
                   for name, path in expert_dirs.items()}
    inputs = [base_dir, *(p for d in expert_dirs.values() for p in input_paths(str(d))),
              *(locate(e.data) for e in recipe.experts),
              *(locate(e.unlabelled) for e in recipe.experts if e.unlabelled),
              *(locate(e.head) for e in recipe.experts if e.head),
              *([] if merged is None else [Path(merged)])]
    check_output(out, inputs=inputs, overwrite=overwrite,  # size: the weights of an expert
                 nbytes=sum(i.nbytes for i in next(iter(checkpoints.values())).infos().values()))
    open_checkpoint(base_dir).close()  # headers (or a refused pickle) before transformers
    if recipe.head_prefix:
        _check_head_prefix(recipe.head_prefix, checkpoints)
    heads = _head_files(recipe, locate, base_dir) if recipe.architecture == "pooled_encoder" \
        else None
    # the first expert's config (an adapter's is its base's)
    first_dir = next(iter(checkpoints.values())).model_dir or next(iter(expert_dirs.values()))
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    kind = "causal_lm" if recipe.architecture == "causal_lm" else "classification"
    limit = _examples(recipe)
    tasks = [
        Task(e.task_name, load_task_data(
            locate(e.data), kind=kind, tokenizer=tokenizer, input_key=e.input_key,
            label_key=e.label_key, label_names=e.labels, max_length=recipe.max_length,
            limit=limit, class_labels=method.trains,
            unlabelled=locate(e.unlabelled) if e.unlabelled else None), kind)
        for e in recipe.experts]
    if heads is not None:  # backbone folders + head files
        module = MeanPooledEncoder(_base_module(transformers.AutoModel, base_dir, None, None))
    else:
        auto = getattr(transformers, _AUTO_CLASSES[recipe.architecture])
        config = transformers.AutoConfig.from_pretrained(first_dir)
        module = _base_module(auto, base_dir, config, recipe.head_prefix)
    experts = {name: CheckpointState(ckpt) for name, ckpt in checkpoints.items()}
    layout = "pooled_encoder" if heads is not None else "transformers"
    written = {"method": recipe.merge_method, "recipe_yaml": recipe.to_yaml(),
               "base_models": [str(base_dir), *map(str, expert_dirs.values())],
               "model_dir": base_dir if heads is not None else first_dir,
               "overwrite": overwrite, "shard_size": shard_size, "inputs": inputs,
               "base_dir": base_dir,
               "head_meta": {e.task_name: HeadMeta(
                   config=checkpoints[e.task_name].config, expert=expert_dirs[e.task_name],
                   layout=layout, labels=e.labels) for e in recipe.experts}}
    options = dict(recipe.parameters)  # as given: a method may read which were set
    if "weight" in method.model_params.model_fields:
        options["weights"] = {e.task_name: e.weight or 1.0 for e in recipe.experts}
    run = method.run if merged is None else _merged_run(Path(merged), module,
                                                        recipe.head_prefix)
    outcome = run(module, experts, tasks, head_prefix=recipe.head_prefix,
                  heads=heads, progress=progress, parallel=parallel, **options)
    if surgery is not None:
        outcome = with_surgery(outcome, module, experts, tasks, head_prefix=recipe.head_prefix,
                               heads=heads, progress=progress, **surgery)
    if parallel is not None and parallel.rank != 0:
        return LearnOutcome(Path(out), recipe.merge_method, outcome.merge)
    return LearnOutcome(export_outcome(out, outcome, **written), recipe.merge_method,
                        outcome.merge)


def _merged_run(merged: Path, module: Any, head_prefix: str | None) -> Any:
    """A learned method's run that returns the tensors of the model at ``merged`` (each
    expert's head kept, as the methods keep them); RecipeError naming the model and a
    tensor it lacks, from its headers before any weight is read."""
    with open_checkpoint(merged) as checkpoint:
        names = set(checkpoint.names())
    wanted = [n for n, t in module.state_dict().items() if t.is_floating_point()
              and not (head_prefix and n.startswith(head_prefix))]
    missing = [n for n in wanted if n not in names]
    if missing:
        raise RecipeError(f"the merged model lacks {len(missing)} tensor(s) of the experts' "
                          f"architecture", file=merged, tensor=missing[0],
                          fix="give a model merged from this recipe's experts")

    def read(module: Any, experts: Any, tasks: Any, **_options: Any) -> dict[str, Any]:
        with open_checkpoint(merged) as checkpoint:
            return {n: checkpoint.read(n) for n in wanted}

    return closed_form_run("merged", read, MergedModelParams)


class MergedModelParams(Params):
    """A merged model read as it is takes no parameters."""


def _head_files(recipe: LearnRecipe, locate: Any, base_dir: Path) -> dict[str, Any]:
    """Each expert's linear head read from its ``head`` file, checked against the base's
    hidden size and the task's class names; RecipeError naming the file otherwise."""
    with open_checkpoint(base_dir) as base:
        hidden = (base.config or {}).get("hidden_size")
    heads = {}
    for expert in recipe.experts:
        head = read_linear_head(locate(expert.head))
        if hidden is not None and head.in_features != hidden:
            raise RecipeError(f"the head reads {head.in_features} features, the base model's "
                              f"hidden size is {hidden}", file=locate(expert.head),
                              fix="give the head trained on this base's encoder")
        if expert.labels is not None and len(expert.labels) != head.out_features:
            raise RecipeError(f"the head has {head.out_features} classes, `labels` names "
                              f"{len(expert.labels)}", file=locate(expert.head),
                              fix="list one name per class of the head, in its order")
        heads[expert.task_name] = head
    return heads


def _check_head_prefix(prefix: str, checkpoints: dict[str, Checkpoint]) -> None:
    """RecipeError naming the experts none of whose tensors start with ``prefix``, with a
    few of their tensor names (one per top-level module); costs nothing: names only."""
    headless = {task: ckpt for task, ckpt in checkpoints.items()
                if not any(n.startswith(prefix) for n in ckpt.names())}
    if not headless:
        return
    task, ckpt = next(iter(headless.items()))
    names = ckpt.names()
    firsts = {name.split(".", 1)[0]: name for name in reversed(names)}  # one per module
    shown = list(dict.fromkeys([*reversed(firsts.values()), *names[-2:]]))[:6]
    raise RecipeError(
        f"head_prefix {prefix!r} matches no tensor of expert(s) "
        f"{', '.join(map(repr, headless))}: their tasks would have no head",
        file=ckpt.path,
        fix=f"set head_prefix to the prefix of the task heads; {task!r} holds e.g. "
        f"{', '.join(shown)}")


def _base_module(auto: Any, base_dir: Path, config: Any, head_prefix: str | None) -> Any:
    """The experts' architecture with the base model's weights, in eval mode.

    transformers' load report (the task head the base lacks, "newly initialized") becomes
    one log line; weights other than the head that the base lacks are a warning. Costs
    loading the base model once.
    """
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        module, info = auto.from_pretrained(base_dir, config=config, output_loading_info=True)
    finally:
        transformers_logging.set_verbosity(level)
    missing = list(info.get("missing_keys", []))
    head = [name for name in missing if head_prefix and name.startswith(head_prefix)]
    others = [name for name in missing if name not in head]
    if head:
        log.info("%s: the base model has no task head (%s): each task's head comes from its "
                 "expert", type(module).__name__, ", ".join(sorted(head)))
    if others:
        log.warning("%d weight(s) of %s are not in the base model %s and start from random "
                    "values (e.g. %s): is it the experts' base?", len(others),
                    type(module).__name__, base_dir, ", ".join(sorted(others)[:3]))
    return module.eval()


def _transformers():
    try:
        import transformers
    except ImportError:
        raise RecipeError("learned merges of Hugging Face models need transformers",
                          fix="pip install 'supermerge[hf]'") from None
    return transformers
