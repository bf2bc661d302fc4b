"""Planning a merge from headers alone: every problem is found before any weight is read.

``plan_merge`` opens every checkpoint lazily, checks that each expert has each tensor of
the reference model with a compatible shape and dtype, resolves the per-tensor parameters
and validates them against the method's types. It returns a :class:`MergePlan` (one
:class:`TensorJob` per output tensor) or raises one :class:`PlanError` listing every
problem at once.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from supermerge.engine.merge_state import (
    STATE_FILE,
    MergeState,
    read_merge_state,
    weights_digest,
)
from supermerge.engine.params import LayerPositions, TensorParameters, is_tensor_dependent
from supermerge.engine.slices import SliceLayout, slice_layout
from supermerge.engine.spec import MergeSpec, parse_dtype
from supermerge.engine.vocab import VOCAB_HINTS, VocabPlan, plan_vocab, vocab_size_change
from supermerge.errors import MethodError, OutputError, PlanError, Problem, SupermergeError
from supermerge.io import Checkpoint, TensorInfo, open_checkpoint, tied_aliases
from supermerge.io.guard import check_output
from supermerge.io.lora import input_paths
from supermerge.methods import Method, get_method
from supermerge.names import prefix_shift, shifted_name

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Source:
    """Where one input tensor of a job lives: a checkpoint and the name inside it."""

    checkpoint: Checkpoint
    name: str

    @property
    def info(self) -> TensorInfo:
        return self.checkpoint.info(self.name)


@dataclass(frozen=True)
class TaskHead:
    """One expert's task head: its tensors (the expert's own names), kept out of the merge."""

    task: str
    checkpoint: Checkpoint
    names: tuple[str, ...]


@dataclass
class TensorJob:
    """One output tensor: copy it from the reference, or merge it from its sources."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    reference: Source
    experts: list[Source] = field(default_factory=list)
    base: Source | None = None
    merge: bool = True
    rows: int | None = None  # merge only the first `rows` rows (vocabulary mismatch)
    remap: bool = False  # an embedding matrix: map its rows onto the output vocabulary
    params: Any = None
    model_params: list[Any] = field(default_factory=list)
    seed: int = 0
    position: float = 0.0

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def input_bytes(self) -> int:
        """Bytes held while this job's inputs are resident in float32."""
        count = 1 + (len(self.experts) if self.merge else 0)
        return count * self.numel * 4


@dataclass
class MergePlan:
    """Everything the executor needs, checked."""

    spec: MergeSpec
    method: Method
    base: Checkpoint | None
    experts: list[Checkpoint]
    reference: Checkpoint
    jobs: list[TensorJob]
    statistic_params: tuple[Any, list[Any]] | None = None
    warnings: list[str] = field(default_factory=list)
    heads: list[TaskHead] = field(default_factory=list)
    name_maps: list[dict[str, str]] = field(default_factory=list)
    unaligned: set[int] = field(default_factory=set)  # experts lacking most tensors
    vocab: VocabPlan | None = None  # the output vocabulary of the tokenizer options
    config_changes: dict[str, Any] = field(default_factory=dict)  # keys set in config.json
    resumed: MergeState | None = None  # the record of the merge continued (spec.resume)

    @property
    def model_files(self) -> Checkpoint:
        """Whose config and tokenizer files the output gets: the first expert's when the
        output carries its head (its config names those classes), else the reference's."""
        if any(job.reference.checkpoint is not self.reference for job in self.jobs
               if self.spec.is_head(job.name)):
            return self.experts[0]
        return self.reference

    @property
    def largest_tensor_bytes(self) -> int:
        """float32 bytes of the largest output tensor."""
        return max((job.numel * 4 for job in self.jobs), default=0)

    def memory_budget(self) -> int:
        """About (K + 2) x the largest tensor in float32: the engine's resident-bytes bound."""
        return (len(self.experts) + 2) * self.largest_tensor_bytes

    def close(self) -> None:
        for ckpt in {id(c): c for c in [*self.experts, self.reference]}.values():
            ckpt.close()


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that depends only on the recipe seed and the name (thread-order free)."""
    return zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF


def plan_merge(spec: MergeSpec, *, out: Path | None = None, overwrite: bool = False) -> MergePlan:
    """Check the whole merge from headers and return its plan.

    Raises PlanError listing every problem found.

    Cost: opens every checkpoint's headers; reads no weight.
    """
    problems: list[Problem] = []
    method = _method_or_problem(spec, problems)
    if out is not None and not _is_resumed_folder(spec, Path(out), problems):
        _check_output(spec, Path(out), overwrite, problems)
    base = _open(spec.base_model, problems) if spec.base_model else None
    # an adapter folder among the models applies to the recipe's base (io.lora)
    experts = [_open(m.path, problems, base=spec.base_model) for m in spec.models]
    if method is not None and method.needs_base and spec.base_model is None:
        problems.append(Problem(f"method '{method.name}' needs a base model",
                                fix="add `base_model: <path>` to the recipe"))
    _check_adapter_output(spec, method, problems)
    for where, value in (("dtype", spec.out_dtype), ("compute_dtype", spec.compute_dtype)):
        try:
            parse_dtype(value, where)
        except SupermergeError as err:
            problems.append(Problem(err.message, fix=err.fix))
    if problems:
        raise PlanError(problems)
    reference = base if base is not None else experts[0]
    plan = MergePlan(spec=spec, method=method, base=base, experts=experts,  # type: ignore[arg-type]
                     reference=reference, jobs=[])
    _log_ignored(method, spec)
    if spec.slices:
        _plan_slices(plan, problems)
    else:
        resolver, found = TensorParameters.from_recipe(
            method, spec.parameters, [m.parameters for m in spec.models],
            [m.path for m in spec.models])
        problems.extend(found)
        plan.name_maps = [_name_map(plan, model, expert)
                          for model, expert in zip(spec.models, experts, strict=True)]
        plan.heads = _task_heads(plan, problems)
        plan.unaligned = _check_missing(plan, problems)
        if spec.tokenizer is not None:
            _plan_vocab(plan, problems)
        plan.jobs = _plan_jobs(plan, resolver, problems)
        if method.statistic is not None and not problems:
            plan.statistic_params = _statistic_params(method, resolver.global_specs,
                                                      resolver.model_layers, problems)
    if spec.resume is not None and not problems:
        plan.resumed = _resumed_state(plan, problems)
    if problems:
        plan.close()
        raise PlanError(problems)
    return plan


def _check_output(spec: MergeSpec, out: Path, overwrite: bool, problems: list[Problem]) -> None:
    """The output guard of every writer (io.guard.check_output), as a problem."""
    try:
        check_output(out, inputs=spec_inputs(spec), overwrite=overwrite)
    except OutputError as err:
        problems.append(Problem(err.message, file=err.file, fix=err.fix))


def _is_resumed_folder(spec: MergeSpec, out: Path, problems: list[Problem]) -> bool:
    """Whether ``out`` is the merge being continued (a problem then: it is only read)."""
    if spec.resume is None or out.resolve() != Path(spec.resume).resolve():
        return False
    problems.append(Problem(
        "the output is the merged model being continued: a continued merge never modifies "
        "its input", file=str(out), fix="write the continued merge to a new folder (-o NEW)"))
    return True


def _resumed_state(plan: MergePlan, problems: list[Problem]) -> MergeState | None:
    """The record of the merge ``spec.resume`` continues, checked against this merge:
    the same method, entered first, on the same base (by digest: one read of the base's
    weight files)."""
    spec = plan.spec
    try:
        state = read_merge_state(spec.resume)
    except SupermergeError as err:
        problems.append(Problem(err.message, file=err.file, fix=err.fix))
        return None
    where = str(Path(spec.resume) / STATE_FILE)
    if state.method != plan.method.name or plan.method.resume is None:
        problems.append(Problem(
            f"{spec.resume} is a '{state.method}' merge; '{plan.method.name}' cannot continue "
            "it", file=where, fix=f"continue it with `merge_method: {state.method}`"))
    elif not spec.models or Path(spec.models[0].path).resolve() != Path(spec.resume).resolve():
        problems.append(Problem("the merged model continued must be the first model",
                                file=where, fix="list it first (`continual:` does this)"))
    elif plan.base is None or weights_digest(plan.base) != state.base_digest:
        problems.append(Problem(
            f"the base model is not the one {spec.resume} was merged on (its weights differ "
            "from the digest recorded)", file=spec.base_model,
            fix=f"use the recorded base, {state.base_model}, or merge the experts again "
            "from this base"))
    return state


def _method_or_problem(spec: MergeSpec, problems: list[Problem]) -> Method | None:
    try:
        method = get_method(spec.method)
        if not spec.slices:  # a sliced merge counts each slice's sources (engine.slices)
            method.check_count(len(spec.models))
        return method
    except MethodError as err:
        problems.append(Problem(err.message, fix=err.fix))
        return None


def _check_adapter_output(spec: MergeSpec, method: Method | None,
                          problems: list[Problem]) -> None:
    """``output: adapter`` needs a base to subtract, a positive rank and one model out."""
    if spec.output != "adapter":
        if spec.rank is not None or spec.svd != "exact":
            problems.append(Problem("`rank` or `svd` is set but the output is a model",
                                    fix="add `output: adapter`, or remove them"))
        return
    if spec.base_model is None:
        problems.append(Problem("`output: adapter` stores the merged update over a base, "
                                "and the recipe has no base model",
                                fix="add `base_model: <path>` to the recipe"))
    if not isinstance(spec.rank, int) or isinstance(spec.rank, bool) or spec.rank < 1:
        problems.append(Problem(f"`output: adapter` needs a positive integer `rank`, got "
                                f"{spec.rank!r}", fix="add e.g. `rank: 16` to the recipe"))
    if method is not None and method.per_task:
        problems.append(Problem(f"method '{method.name}' writes per-task masks beside the "
                                "model, which an adapter cannot hold",
                                fix="write a model (leave out `output: adapter`)"))
    if spec.tokenizer is not None:
        problems.append(Problem("an adapter cannot change the base's vocabulary, and the "
                                "recipe builds a new one (`tokenizer_source` / `tokenizer`)",
                                fix="write a model (leave out `output: adapter`), or remove "
                                "the tokenizer options"))


def spec_inputs(spec: MergeSpec) -> list[str]:
    """Every path a merge reads (both halves of BASE+ADAPTER), for the output guard."""
    spellings = [s for s in (spec.base_model, *(m.path for m in spec.models)) if s]
    return [path for spelling in spellings for path in input_paths(spelling)]


def _open(path: str, problems: list[Problem], base: str | None = None) -> Checkpoint | None:
    try:
        return open_checkpoint(path, base=base)
    except SupermergeError as err:
        problems.append(Problem(err.message, file=err.file or path, fix=err.fix))
        return None


def _log_ignored(method: Method, spec: MergeSpec) -> None:
    """Log once per key that a mergekit parameter is accepted but changes nothing here
    (``ignored`` on the method's parameter classes maps the key to the reason)."""
    given = set(spec.parameters).union(*(m.parameters for m in spec.models), *(
        p for piece in spec.slices or [] for p in (piece.parameters, *(
            source.parameters for source in piece.sources))))
    for params in (method.params, method.model_params):
        for key, why in getattr(params, "ignored", {}).items():
            if key in given:
                log.info("method '%s': `%s` changes nothing here: %s", method.name, key, why)


def _flat(layers) -> dict[str, Any]:
    """One model's parameter layers as one mapping (own values over the recipe's)."""
    merged: dict[str, Any] = {}
    for specs, _where in reversed(layers):
        merged.update(specs)
    return merged


def _name_map(plan: MergePlan, model, expert: Checkpoint) -> dict[str, str]:
    """Return {reference name: the expert's name for it} for each reference tensor the
    expert holds: the same name, a tied alias, or the name under a prefix shift (the
    model's ``prefix``, else one found by :func:`~supermerge.names.prefix_shift`, logged).
    Costs nothing: names only."""
    names = plan.reference.names()
    present = set(expert.names())
    aliases = tied_aliases(expert)
    shift, explicit = model.prefix, model.prefix is not None
    if shift is None and expert is not plan.reference:
        found = prefix_shift(names, list(present))
        if found is not None:
            shift = {found[0]: found[1]}
    mapping: dict[str, str] = {}
    for name in names:
        shifted = shifted_name(name, shift) if shift else None
        candidates = [shifted, name] if explicit else [name, shifted]
        actual = next((c for c in candidates if c is not None and c in present), None)
        if actual is None and name in aliases:
            actual = aliases[name]
        if actual is not None:
            mapping[name] = actual
    if shift and not explicit:
        moved = sum(actual != name for name, actual in mapping.items())
        if moved:
            (other, ref), = shift.items()
            log.info("%s: its tensor names start with %r where the reference's start with %r: "
                     "aligned %d tensor(s) (set `prefix:` on this model to choose otherwise)",
                     expert.path, other, ref, moved)
    return mapping


def _task_heads(plan: MergePlan, problems: list[Problem]) -> list[TaskHead]:
    """Each expert's head tensors under the recipe's ``heads`` prefixes; a problem for an
    expert with none (its task would have no head) or two experts with one task name."""
    if not plan.spec.heads:
        return []
    heads = []
    for model, expert in zip(plan.spec.models, plan.experts, strict=True):
        names = tuple(n for n in expert.names() if plan.spec.is_head(n))
        if not names:
            problems.append(Problem(
                f"no tensor starts with the head prefix(es) {plan.spec.heads}: task "
                f"{model.task_name!r} would have no head", file=str(expert.path),
                fix=f"set `heads:` to the prefix of the task heads; this model holds e.g. "
                f"{', '.join(_some_names(expert))}"))
        heads.append(TaskHead(model.task_name, expert, names))
    tasks = [head.task for head in heads]
    for task in {t for t in tasks if tasks.count(t) > 1}:
        problems.append(Problem(f"two models share the task name {task!r}: their heads would "
                                "overwrite each other", fix="give each model its own `task:`"))
    return heads


def _some_names(checkpoint: Checkpoint, count: int = 6) -> list[str]:
    """A few tensor names of ``checkpoint``: one per top-level module, then its last two."""
    names = checkpoint.names()
    firsts = {name.split(".", 1)[0]: name for name in reversed(names)}
    return list(dict.fromkeys([*reversed(firsts.values()), *names[-2:]]))[:count]


def _plan_jobs(plan: MergePlan, resolver: TensorParameters, problems) -> list[TensorJob]:
    spec, reference = plan.spec, plan.reference
    out_dtype = parse_dtype(spec.out_dtype, "dtype")
    positions = LayerPositions(reference.names())
    jobs = []
    for name in reference.names():
        ref_info = reference.info(name)
        keep_dtype = out_dtype is None or not ref_info.is_float
        job = TensorJob(name=name, shape=tuple(ref_info.shape),
                        out_dtype=ref_info.dtype if keep_dtype else out_dtype,
                        reference=Source(reference, name),
                        base=Source(plan.base, name) if plan.base is not None else None,
                        seed=tensor_seed(spec.seed, name))
        jobs.append(job)
        if spec.is_head(name):
            _first_task_head(plan, job)
            continue
        if not ref_info.is_float:
            job.merge = False  # integer buffers are copied from the reference, never averaged
            continue
        if plan.vocab is not None and name in plan.vocab.names:
            job.remap, job.shape = True, (plan.vocab.rows, *ref_info.shape[1:])
        job.experts = _expert_sources(plan, name, ref_info, job, problems)
        job.position = positions.position(name)
        typed, found = resolver.at(name, job.position)
        problems.extend(found)
        job.params, job.model_params = typed if typed is not None else (None, [])
    _report_extra_tensors(plan)
    return jobs


def _first_task_head(plan: MergePlan, job: TensorJob) -> None:
    """A head tensor is never merged: the output carries the first expert's (its shape),
    or the reference's own where the first expert has none."""
    job.merge = False
    actual = plan.name_maps[0].get(job.name) if plan.experts else None
    if actual is not None:
        info = plan.experts[0].info(actual)
        job.reference = Source(plan.experts[0], actual)
        job.shape = tuple(info.shape)
        job.out_dtype = job.out_dtype if info.is_float else info.dtype


def _check_missing(plan: MergePlan, problems: list[Problem]) -> set[int]:
    """Return the indices of the experts that lack most of the reference's float tensors
    (the wrong model, or names that differ in a way no prefix explains), with one problem
    each: `on_missing: base` would give the base back, so it is neither applied nor
    suggested. Costs nothing: names only."""
    wanted = [n for n in plan.reference.names()
              if plan.reference.info(n).is_float and not plan.spec.is_head(n)]
    unaligned = set()
    for index, expert in enumerate(plan.experts):
        missing = [n for n in wanted if n not in plan.name_maps[index]]
        if 2 * len(missing) <= len(wanted):
            continue
        unaligned.add(index)
        problems.append(Problem(
            f"{len(missing)} of the reference's {len(wanted)} tensors are missing in this model "
            f"(e.g. {', '.join(missing[:3])}); it holds e.g. {', '.join(_some_names(expert))}",
            file=str(expert.path),
            fix="merge fine-tunes of the same base model; if the names differ by a prefix, map "
                "it on the model: `prefix: {'<its prefix>': '<the reference's prefix>'}`"))
    return unaligned


def _expert_sources(plan, name, ref_info, job, problems) -> list[Source]:
    sources = []
    for i, expert in enumerate(plan.experts):
        actual = plan.name_maps[i].get(name)
        if actual is None:
            if i in plan.unaligned:
                continue  # one problem for the whole model (_check_missing)
            if plan.spec.on_missing == "base" and plan.base is not None:
                sources.append(Source(plan.base, name))
                plan.warnings.append(f"{expert.path}: missing {name}, used the base's tensor")
                continue
            problems.append(Problem("tensor missing in an expert", file=str(expert.path),
                                    tensor=name,
                                    fix="merge models of the same architecture, or set "
                                        "`on_missing: base` to use the base's tensor"))
            continue
        _check_source(plan, name, ref_info, Source(expert, actual), job, problems)
        sources.append(Source(expert, actual))
    return sources


def _check_source(plan, name, ref_info, source: Source, job, problems) -> None:
    """A problem unless ``source`` is a float tensor of the reference's shape (or, for an
    embedding, of another vocabulary size: ``job.rows``, as ``vocab`` says, or remapped onto
    the output vocabulary, ``job.remap``, whose plan checked its shape)."""
    info, expert = source.info, source.checkpoint
    if not info.is_float:
        problems.append(Problem(f"dtype {info.dtype} is not a float dtype but the reference's "
                                f"is {ref_info.dtype}", file=str(expert.path), tensor=name,
                                fix="merge checkpoints of the same model"))
    elif tuple(info.shape) != tuple(ref_info.shape) and not job.remap:
        _shape_mismatch(plan, name, ref_info, info, expert, job, problems)
    if info.dtype != ref_info.dtype and info.is_float:
        log.info("%s: %s is %s, reference is %s (computed in float32)",
                 expert.path, source.name, info.dtype, ref_info.dtype)


def _plan_vocab(plan: MergePlan, problems: list[Problem]) -> None:
    """The output vocabulary of the tokenizer options (:mod:`supermerge.engine.vocab`) and
    its ``vocab_size`` in the output config."""
    plan.vocab = plan_vocab(plan.spec, plan.base, plan.experts, plan.reference,
                            plan.name_maps, problems)
    if plan.vocab is not None:
        plan.warnings += plan.vocab.warnings
        plan.config_changes.update(vocab_size_change(plan.reference.config, plan.vocab.rows))


def _plan_slices(plan: MergePlan, problems: list[Problem]) -> None:
    """Plan a sliced merge (:mod:`supermerge.engine.slices`): one job per output tensor,
    the output config's layer count, and the options a sliced merge cannot take refused."""
    spec, method = plan.spec, plan.method
    for refused, why, fix in (
            (spec.heads, "`heads` keeps each model's task head", "remove `heads`"),
            (spec.output == "adapter", "`output: adapter` stores an update over one base "
             "model, and slices change the layers", "write a model (leave out `output`)"),
            (method.per_task, f"method '{method.name}' writes per-task masks of whole "
             "models", "use a method without task masks"),
            (spec.tokenizer is not None, "the tokenizer options (`tokenizer_source`, "
             "`tokenizer:`) remap whole models' embeddings", "merge whole models (`models:`) "
             "to change the vocabulary, or leave out the tokenizer options")):
        if refused:
            problems.append(Problem(f"{why}: not possible with `slices`", fix=fix))
    opened = {m.path: expert for m, expert in zip(spec.models, plan.experts, strict=True)}
    layout = slice_layout(spec, method, opened, plan.reference, problems)
    plan.jobs = _slice_jobs(plan, layout, problems)
    plan.config_changes = layout.config_changes
    plan.warnings.extend(layout.warnings)
    if method.statistic is not None and layout.tensors and not problems:
        resolver = layout.tensors[0].resolver
        if _statistic_params(method, resolver.global_specs, resolver.model_layers,
                             problems) is not None:
            problems.append(Problem(
                f"method '{method.name}' with these parameters computes a whole-model "
                "statistic, and a sliced merge has no single set of models",
                fix="use the per-tensor scope (e.g. leave out `trim_scope: model`)"))


def _slice_jobs(plan: MergePlan, layout: SliceLayout, problems: list[Problem]
                ) -> list[TensorJob]:
    """One job per output tensor of a sliced merge: merged from its sources (whose first,
    the base where there is one, gives the shape and is copied for non-float tensors)."""
    out_dtype = parse_dtype(plan.spec.out_dtype, "dtype")
    jobs = []
    for piece in layout.tensors:
        base = Source(*piece.base) if piece.base is not None else None
        experts = [Source(*expert) for expert in piece.experts]
        reference = base or experts[0]
        ref_info = reference.info
        keep_dtype = out_dtype is None or not ref_info.is_float
        job = TensorJob(name=piece.name, shape=tuple(ref_info.shape),
                        out_dtype=ref_info.dtype if keep_dtype else out_dtype,
                        reference=reference, base=base, position=piece.position,
                        seed=tensor_seed(plan.spec.seed, piece.name))
        jobs.append(job)
        if not ref_info.is_float:
            job.merge = False
            continue
        job.experts = experts
        for source in experts:
            _check_source(plan, piece.name, ref_info, source, job, problems)
        typed, found = piece.resolver.at(piece.name, piece.position)
        problems.extend(found)
        job.params, job.model_params = typed if typed is not None else (None, [])
    return jobs


def _shape_mismatch(plan, name, ref_info, info, expert, job, problems) -> None:
    same_width = len(info.shape) == len(ref_info.shape) and tuple(info.shape[1:]) == tuple(
        ref_info.shape[1:])
    vocab_like = same_width and any(h in name for h in VOCAB_HINTS)
    if vocab_like and plan.spec.vocab == "common_rows":
        job.rows = min(job.rows or ref_info.shape[0], info.shape[0])
        plan.warnings.append(
            f"{name}: vocabulary sizes differ ({expert.path} has {info.shape[0]} rows, the "
            f"reference {ref_info.shape[0]}); merged the first {job.rows} rows, kept the "
            "reference's other rows")
        return
    fix = ("set `vocab: common_rows` to merge the shared rows" if vocab_like
           else "merge fine-tunes of the same base model")
    problems.append(Problem(f"shape {tuple(info.shape)} differs from the reference's "
                            f"{tuple(ref_info.shape)}", file=str(expert.path), tensor=name,
                            fix=fix))


def _report_extra_tensors(plan: MergePlan) -> None:
    for expert, mapping in zip(plan.experts, plan.name_maps, strict=True):
        used = set(mapping.values())
        extra = [n for n in expert.names() if n not in used and not plan.spec.is_head(n)]
        if extra:
            plan.warnings.append(f"{expert.path}: {len(extra)} tensor(s) not in the reference "
                                 f"were ignored (e.g. {extra[0]})")


def _statistic_params(method, global_specs, model_specs, problems):
    """Whole-model statistics need one value per model: per-tensor specs are refused."""
    model_specs = [_flat(layers) for layers in model_specs]
    varying = [k for k, v in global_specs.items() if is_tensor_dependent(v)] + [
        k for m in model_specs for k, v in m.items() if is_tensor_dependent(v)]
    try:
        glob, models = method.validate(
            {k: v for k, v in global_specs.items() if not is_tensor_dependent(v)},
            [{k: v for k, v in m.items() if not is_tensor_dependent(v)} for m in model_specs])
    except MethodError as err:
        problems.append(Problem(err.message, fix=err.fix))
        return None
    if method.statistic(glob, models) is None:
        return None
    if varying:
        problems.append(Problem(
            f"method '{method.name}' computes a whole-model statistic with these parameters, "
            f"so {sorted(set(varying))} cannot vary per tensor",
            fix="give one scalar value per model (or use the per-tensor scope)"))
        return None
    return glob, models
