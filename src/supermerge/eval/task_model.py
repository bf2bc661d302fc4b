"""One task's model from any merge, ready to use: the merged backbone and that task's head.

A merge that keeps heads out of the merge writes each task's head and its expert's config
under ``heads/`` (:mod:`supermerge.engine.heads`); a per-task merge (``tall_masks``,
``emr``) writes each task's masks (:mod:`supermerge.engine.task_state`).
:func:`load_task_model` combines both into a transformers model of the expert's class,
with the expert's label names in its config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from supermerge.engine.heads import HEADS_DIR, SavedHead, read_head
from supermerge.engine.task_state import TASK_STATE_JSON, load_task_state, read_task_state
from supermerge.errors import CheckpointError
from supermerge.io import open_checkpoint
from supermerge.learn.modules import MeanPooledEncoder, PooledClassifier, linear_head
from supermerge.learn.surgery import SURGERY_JSON, apply_surgery, read_surgery
from supermerge.learn.twin import TWIN_JSON, load_twin
from supermerge.progress import Progress

log = logging.getLogger(__name__)


def load_task_model(
    out_dir: str | Path,
    task: int | str = 0,
    *,
    base: str | Path | Mapping[str, torch.Tensor] | None = None,
) -> Any:
    """Return task ``task``'s model from the merge at ``out_dir``: a transformers model
    (in eval mode) of its expert's class and config (label names included), holding the
    merged weights (task ``task``'s own for a per-task merge) and the task's head; for
    backbone-and-head-file experts a :class:`~supermerge.learn.modules.PooledClassifier`,
    which answers the same way (``model(**tokens).logits``, ``model.config.id2label``).
    A Twin-Merging output gives a :class:`~supermerge.learn.twin.TwinModel`, which routes
    each input through the task's mixture of exclusive parts (and answers the same way).

    ``task`` is an index in the recipe's order or a task name (a per-task merge also takes
    the expert's path). ``base``: the base model of a per-task merge, if not where the
    merge recorded it. Raises CheckpointError when a weight of the model is found neither
    in the merge nor in the head. Costs one copy of the weights in memory plus the model.
    """
    import transformers

    out_dir = Path(out_dir)
    head = read_head(out_dir, task) if (out_dir / HEADS_DIR).is_dir() else None
    if (out_dir / TASK_STATE_JSON).is_file():
        index = head.index if head is not None else read_task_state(out_dir).index(task)
        weights = load_task_state(out_dir, index, base=base)
    else:
        with open_checkpoint(out_dir) as merged:
            weights = {name: merged.read(name) for name in merged.names()}
    config_dict = head.config if head is not None and head.config else _config(out_dir)
    config = transformers.AutoConfig.for_model(**config_dict)
    routed = (out_dir / TWIN_JSON).is_file()
    if head is not None and head.layout == "pooled_encoder":
        pooled = _pooled_classifier(transformers, config, weights, head, out_dir)
        _surgery(out_dir, pooled.head, head.task)
        return load_twin(pooled, out_dir, head=pooled.head, prefix="encoder.") if routed \
            else pooled
    model_class = _model_class(transformers, config)
    model = model_class(config)
    model.load_state_dict(_match(model, weights, head.tensors if head else {}, out_dir),
                          strict=False)
    model.tie_weights()
    log.info("task %s: %s with the merged weights of %s%s%s", task, model_class.__name__,
             out_dir, f" and head {head.task!r}" if head else "",
             ", routed per input (Twin-Merging)" if routed else "")
    if (out_dir / SURGERY_JSON).is_file():
        surgery = read_surgery(out_dir)
        site = model.get_submodule((surgery.head_prefix or "").rstrip("."))
        _surgery(out_dir, site, head.task if head is not None else task)
    return load_twin(model.eval(), out_dir) if routed else model.eval()


def _surgery(out_dir: Path, site: torch.nn.Module, task: int | str) -> None:
    """Apply the task's Representation Surgery module, if the merge has them, in front of
    ``site`` (its head); CheckpointError if the merge has none for the task."""
    if not (out_dir / SURGERY_JSON).is_file():
        return
    modules = read_surgery(out_dir).modules
    names = list(modules)
    name = names[task] if isinstance(task, int) and 0 <= task < len(names) else task
    if name not in modules:
        raise CheckpointError(f"no surgery module for task {task!r}", file=out_dir /
                              SURGERY_JSON, fix=f"give one of the tasks: {', '.join(names)}")
    apply_surgery(site, modules[name])


def _pooled_classifier(transformers: Any, config: Any, weights: Mapping[str, torch.Tensor],
                       head: SavedHead, out_dir: Path) -> PooledClassifier:
    """A backbone-and-head-file task's model: the merged encoder, mean-pooled, and its head;
    its config says the classes (and their names when the recipe gave them)."""
    encoder = MeanPooledEncoder(transformers.AutoModel.from_config(config))
    encoder.load_state_dict(_match(encoder, weights, {}, out_dir), strict=False)
    linear = linear_head(head.tensors, out_dir / HEADS_DIR / f"{head.task}.safetensors")
    config.num_labels = linear.out_features
    if head.labels:
        config.id2label = dict(enumerate(head.labels))
        config.label2id = {name: i for i, name in enumerate(head.labels)}
    return PooledClassifier(encoder, linear, config).eval()


def _config(out_dir: Path) -> dict[str, Any]:
    with open_checkpoint(out_dir) as merged:
        config = merged.config
    if not config:
        raise CheckpointError("no config.json and no head records: the model class is unknown",
                              file=out_dir, fix="load the weights with your model class, or "
                              "merge with `heads:` so each task's config is kept")
    return dict(config)


def _model_class(transformers: Any, config: Any) -> Any:
    """The config's first architecture (e.g. BertForSequenceClassification), else AutoModel's."""
    for name in config.architectures or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel._model_mapping[type(config)]


def _match(model: Any, weights: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor],
           out_dir: Path) -> dict[str, torch.Tensor]:
    """Return the model's state dict from the head and the merged weights, whose names may
    lack or carry the model's base prefix (a backbone merged from ``bert.*`` experts);
    CheckpointError naming the weights found nowhere (tied ones are tied afterwards)."""
    prefix = getattr(model, "base_model_prefix", "")
    prefix = f"{prefix}." if isinstance(prefix, str) and prefix else ""
    tied = _tied_names(model)
    state, missing = {}, []
    for name in model.state_dict():
        candidates = [name, name.removeprefix(prefix) if prefix else name, prefix + name]
        source = head if name in head else weights
        found = next((c for c in candidates if c in source), None)
        if found is not None:
            state[name] = source[found]
        elif name not in tied:
            missing.append(name)
    if missing:
        raise CheckpointError(
            f"{len(missing)} weight(s) of {type(model).__name__} are in neither the merge nor "
            f"the task's head (e.g. {', '.join(missing[:3])})", file=out_dir,
            fix="merge with `heads:` naming the task heads' prefix, so each task's head is "
                "kept under heads/")
    return state


def _tied_names(model: Any) -> set[str]:
    """Names of parameters that share storage with an earlier one (tied embeddings)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        pointer = tensor.data_ptr()
        if pointer in seen and tensor.numel():
            tied.add(name)
        seen.setdefault(pointer, name)
    return tied


def task_accuracy(model: Any, tokenizer: Any, data_file: str | Path, *,
                  input_key: str = "input", label_key: str = "label", max_length: int = 128,
                  batch_size: int = 64, tick: Callable[[], None] = lambda: None) -> float:
    """Return the accuracy of a transformers sequence classifier on a JSONL or CSV file
    (``input_key`` text, ``label_key`` class index or a label name of the model's config).

    Raises LearnError naming the file for missing fields or unknown labels. Costs one
    forward pass per ``batch_size`` examples; ``tick`` is called after each.
    """
    data = _labelled(model, tokenizer, Path(data_file), input_key, label_key, max_length)
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            batch = data.select(torch.arange(start, min(start + batch_size, len(data))))
            _args, kwargs = batch.call_args()
            predictions = model(**kwargs).logits.argmax(-1)
            correct += int((predictions == batch.labels).sum())
            tick()
    return correct / len(data)


def _labelled(model: Any, tokenizer: Any, path: Path, input_key: str, label_key: str,
              max_length: int) -> Any:
    """The file's examples with labels as class indices: integers as they are, else names
    looked up in the model's ``id2label``."""
    from supermerge.learn import load_task_data
    from supermerge.learn.errors import LearnError

    read = dict(kind="classification", tokenizer=tokenizer, input_key=input_key,
                label_key=label_key, max_length=max_length)
    try:
        data = load_task_data(path, **read)
    except LearnError as err:
        if "not class indices" not in err.message:
            raise
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        data = load_task_data(path, label_names=names, **read)
    if data.labels is None:
        raise LearnError(f"no {label_key!r} field: accuracy needs labelled examples", file=path,
                         fix="label every example, or name the label field (label_key)")
    classes = model.config.num_labels
    if int(data.labels.max()) >= classes or int(data.labels.min()) < 0:
        raise LearnError(f"labels outside the model's {classes} classes", file=path,
                         fix="evaluate each task's data with its own task model")
    return data


def evaluate_task_models(
    model_dir: str | Path,
    data: Mapping[str, str | Path],
    *,
    experts: Mapping[str, str | Path] | None = None,
    expert_scores: Mapping[str, float] | None = None,
    input_key: str = "input",
    label_key: str = "label",
    max_length: int = 128,
    batch_size: int = 64,
    label: str | None = None,
    progress: Progress | None = None,
) -> Any:
    """Score each task's model of the merge at ``model_dir`` (:func:`load_task_model`) on
    that task's file in ``data`` (task -> JSONL/CSV); returns an
    :class:`~supermerge.eval.evaluate.EvalReport` (accuracy per task).

    Normalised by each task's expert on the same file: ``expert_scores[task]`` when given,
    else the expert at ``experts[task]`` (default: the path the merge recorded in
    ``heads/<task>.json``) is scored; a task without one has no normalised score. Costs
    one forward pass of each model over its file, and loading one task model at a time.
    """
    import time

    from supermerge.eval.evaluate import EvalReport, TaskScore
    from supermerge.eval.model import load_tokenizer

    started = time.perf_counter()
    model_dir = Path(model_dir)
    scores = {}
    for done, (task, file) in enumerate(data.items(), 1):
        model = load_task_model(model_dir, task)
        head = read_head(model_dir, task) if (model_dir / HEADS_DIR).is_dir() else None
        expert = (experts or {}).get(task) or _recorded_expert(head)
        tokenizer = load_tokenizer(*[p for p in (model_dir, expert) if p is not None])
        options = dict(input_key=input_key, label_key=label_key, max_length=max_length,
                       batch_size=batch_size)
        score = task_accuracy(model, tokenizer, file, **options)
        reference = (expert_scores or {}).get(task)
        if reference is None and expert is not None:
            classifier = expert_model(expert, head)
            if classifier is not None:
                reference = task_accuracy(classifier, tokenizer, file, **options)
        scores[task] = TaskScore(task, "accuracy", score, reference)
        if progress is not None:
            progress(f"evaluate {label or model_dir}", done, len(data))
    return EvalReport(label or str(model_dir), "user data", scores,
                      time.perf_counter() - started)


def expert_model(expert: str | Path, head: SavedHead | None = None) -> Any:
    """Return the expert of a task as a classifier, or None (logged) where it is not one:
    for a backbone-and-head-file task the expert's encoder with the head the merge kept
    (``head``), else the transformers classifier in the folder (None for a bare weights
    file, or a folder whose classifier head would start random)."""
    import transformers
    from transformers.utils import logging as transformers_logging

    if not (Path(expert) / "config.json").is_file():
        log.warning("%s has no config.json: its task is not normalised by it", expert)
        return None
    if head is not None and head.layout == "pooled_encoder":
        encoder = transformers.AutoModel.from_pretrained(expert)
        return _pooled_classifier(transformers, encoder.config, encoder.state_dict(), head,
                                  Path(expert))
    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            expert, output_loading_info=True)
    finally:
        transformers_logging.set_verbosity(level)
    if info.get("missing_keys"):
        log.warning("%s is not a classifier (no %s): its task is not normalised by it",
                    expert, ", ".join(sorted(info["missing_keys"])[:2]))
        return None
    return model.eval()


def _recorded_expert(head: SavedHead | None) -> str | None:
    """The expert path a head record names, if it still exists."""
    if head is None or head.expert is None or not Path(head.expert).exists():
        return None
    return head.expert
