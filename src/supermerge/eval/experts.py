"""Experts: the base fine-tuned on each task, built once and cached.

An expert is a Hugging Face model directory (the fine-tuned encoder, its tokenizer), its
task head in ``heads/<task>.safetensors``, ``expert.json`` (task, classes, metric, test
score, hyper-parameters) and ``manifest.json`` (SHA-256 of every file, written last).

The cache (``~/.cache/supermerge`` or ``$XDG_CACHE_HOME/supermerge`` unless given) keys
an expert by the base model's content, the task's data and splits and the training
hyper-parameters, so a change to any of them trains a new expert. An entry whose files do
not match its manifest is deleted and rebuilt, never trusted. Entries are published
atomically (built in a temporary sibling, then renamed).

Training: full fine-tuning of the encoder (AdamW, ``lr``) with a mean-pooling linear head
(its own ``head_lr``), linear warm-up then decay, length-bucketed batches, seeded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from supermerge.eval.model import (
    MeanPooledEncoder,
    collate,
    head_path,
    length_batches,
    load_encoder,
    load_head,
    load_tokenizer,
    new_head,
    predict,
    save_head,
    tokenize,
)
from supermerge.eval.parallel import run_jobs
from supermerge.eval.tasks import Task
from supermerge.progress import Progress, ignore

log = logging.getLogger(__name__)

FORMAT = 1
META = "expert.json"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ExpertConfig:
    """Fine-tuning hyper-parameters (all part of the cache key)."""

    lr: float = 1e-4
    head_lr: float = 1e-3
    epochs: int = 2
    batch_size: int = 32
    max_length: int = 64
    weight_decay: float = 0.01
    warmup: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class Expert:
    """A built expert: where it lives and how well it does on its task's test split."""

    task: str
    path: Path
    metric: str
    score: float
    label_names: tuple[str, ...]
    seconds: float
    cached: bool = False

    @property
    def head_file(self) -> Path:
        """The expert's head file."""
        return head_path(self.path, self.task)

    def head(self) -> torch.nn.Linear:
        """Load the expert's head."""
        return load_head(self.head_file)


def default_cache() -> Path:
    """Return ``$XDG_CACHE_HOME/supermerge`` or ``~/.cache/supermerge``."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "supermerge"


_FINGERPRINTS: dict[tuple, str] = {}


def model_fingerprint(path: str | Path) -> str:
    """Return the SHA-256 of a model directory's top-level files (names and contents).

    Memoised per process by file sizes and modification times. Costs one read of the
    directory (about 0.1 s per 100 MB) the first time.
    """
    path = Path(path).resolve()
    files = sorted(f for f in path.iterdir() if f.is_file())
    identity = (str(path), *((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if identity not in _FINGERPRINTS:
        digest = hashlib.sha256()
        for file in files:
            digest.update(f"{file.name}\0{file_sha256(file)}\0".encode())
        _FINGERPRINTS[identity] = digest.hexdigest()
    return _FINGERPRINTS[identity]


def file_sha256(path: Path) -> str:
    """Return the SHA-256 hex digest of one file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def expert_key(base_fingerprint: str, task: Task, config: ExpertConfig) -> str:
    """Return the cache key: a digest of the base, the task's data and the config."""
    payload = {"format": FORMAT, "base": base_fingerprint, "task": task.fingerprint,
               "config": asdict(config)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class ExpertCache:
    """Expert directories under ``root/experts/<task>-<key>``."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache()

    def entry(self, task: Task, key: str) -> Path:
        """The directory of the expert for ``task`` with cache key ``key``."""
        return self.root / "experts" / f"{task.name}-{key[:16]}"

    def load(self, task: Task, key: str) -> Expert | None:
        """Return the cached expert, or None if absent or corrupt (a corrupt one is deleted).

        Costs one SHA-256 pass over the entry's files.
        """
        entry = self.entry(task, key)
        if not entry.exists():
            return None
        problem = _verify(entry, key)
        if problem is not None:
            log.warning("expert cache entry %s is corrupt (%s): rebuilding it", entry, problem)
            shutil.rmtree(entry, ignore_errors=True)
            return None
        meta = json.loads((entry / META).read_text())
        return Expert(task.name, entry, meta["metric"], meta["score"],
                      tuple(meta["label_names"]), meta["seconds"], cached=True)

    def build(self, base: str | Path, task: Task, key: str, config: ExpertConfig,
              progress: Progress = ignore) -> Expert:
        """Fine-tune, score on the test split and publish one expert; returns it.

        Costs ``epochs`` passes over the train split (forward and backward) and one
        forward pass over the test split.
        """
        started = time.perf_counter()
        encoder, head, tokenizer = train_expert(base, task, config, progress)
        texts, labels = task.examples("test")
        ids = tokenize(tokenizer, texts, config.max_length)
        score = task.score(predict(encoder, head, ids, tokenizer.pad_token_id), labels)
        seconds = time.perf_counter() - started
        meta = {"format": FORMAT, "key": key, "task": task.name, "metric": task.metric,
                "score": score, "label_names": list(task.label_names), "seconds": seconds,
                "base": str(base), "config": asdict(config),
                "splits": {k: len(v) for k, v in task.splits.items()}}

        def write(folder: Path) -> None:
            encoder.save_pretrained(folder)
            tokenizer.save_pretrained(str(folder))
            save_head(head, head_path(folder, task.name))

        entry = self.entry(task, key)
        _publish(entry, meta, write)
        return Expert(task.name, entry, str(task.metric), score, task.label_names, seconds)


def _publish(entry: Path, meta: dict, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling of ``entry`` (``write``, then META, then MANIFEST) and
    rename it into place, replacing an old entry."""
    temporary = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    write(temporary)
    (temporary / META).write_text(json.dumps(meta, indent=2) + "\n")
    files = sorted(p for p in temporary.rglob("*") if p.is_file())
    manifest = {p.relative_to(temporary).as_posix(): file_sha256(p) for p in files}
    (temporary / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(entry, ignore_errors=True)
    os.replace(temporary, entry)


def _verify(entry: Path, key: str) -> str | None:
    """Return what is wrong with a cache entry, or None if every file matches its manifest."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        meta = json.loads((entry / META).read_text())
    except (OSError, ValueError) as err:
        return f"unreadable {MANIFEST} or {META}: {err}"
    if meta.get("key") != key or META not in manifest:
        return "its key does not match"
    for name, digest in manifest.items():
        file = entry / name
        if not file.is_file():
            return f"{name} is missing"
        if file_sha256(file) != digest:
            return f"{name} does not match its checksum"
    return None


def train_expert(base: str | Path, task: Task, config: ExpertConfig,
                 progress: Progress = ignore) -> tuple[MeanPooledEncoder, torch.nn.Linear, object]:
    """Fine-tune ``base`` on ``task``'s train split; returns (encoder, head, tokenizer).

    The encoder and head come back in eval mode. Costs ``epochs * ceil(n / batch_size)``
    optimiser steps, each a forward and backward pass of the whole encoder.
    """
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(base)
    encoder = load_encoder(base).train()
    head = new_head(encoder.hidden_size, task.num_classes, config.seed)
    texts, labels = task.examples("train")
    ids = tokenize(tokenizer, texts, config.max_length)
    targets = torch.tensor(labels)
    steps = config.epochs * math.ceil(len(ids) / config.batch_size)
    warmup = max(1, round(config.warmup * steps))
    optimizer = torch.optim.AdamW(
        [{"params": encoder.parameters(), "lr": config.lr},
         {"params": head.parameters(), "lr": config.head_lr}],
        weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, (steps - s) / max(1, steps - warmup)))
    generator = torch.Generator().manual_seed(config.seed)
    lengths = [len(row) for row in ids]
    stage = f"train {task.name}"
    step = 0
    progress(stage, 0, steps)
    for _ in range(config.epochs):
        for batch in length_batches(lengths, config.batch_size, generator):
            logits = head(encoder(**collate([ids[i] for i in batch], tokenizer.pad_token_id)))
            loss = F.cross_entropy(logits, targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            progress(stage, step, steps)
    return encoder.eval(), head.eval(), tokenizer


def get_experts(
    base: str | Path,
    tasks: Sequence[Task],
    *,
    config: ExpertConfig | None = None,
    cache: ExpertCache | None = None,
    workers: int = 1,
    progress: Progress = ignore,
) -> dict[str, Expert]:
    """Return an expert per task (by task name): cached ones reused, missing ones built.

    With ``workers`` > 1 missing experts train in that many processes, one torch thread
    each (see :func:`~supermerge.eval.parallel.run_jobs`, also for the entry-point guard
    a calling script needs). Costs one cache check per task plus, per missing expert, the
    training described in :func:`train_expert`.
    """
    config = config or ExpertConfig()
    cache = cache or ExpertCache()
    fingerprint = model_fingerprint(base)
    experts: dict[str, Expert] = {}
    jobs = []
    for task in tasks:
        key = expert_key(fingerprint, task, config)
        found = cache.load(task, key)
        if found is not None:
            log.info("expert %s: cached in %s", task.name, found.path)
            experts[task.name] = found
        else:
            jobs.append((task, key))
    built = run_jobs(_build, [(cache.root, base, task, key, config) for task, key in jobs],
                     workers=workers, progress=progress, on_done=_log_built)
    experts.update({expert.task: expert for expert in built})
    return {task.name: experts[task.name] for task in tasks}


def _build(cache_root: Path, base: str | Path, task: Task, key: str, config: ExpertConfig,
           progress: Progress) -> Expert:
    """One expert build, as a job for :func:`~supermerge.eval.parallel.run_jobs`."""
    return ExpertCache(cache_root).build(base, task, key, config, progress)


def _log_built(expert: Expert) -> None:
    log.info("expert %s: %s %.3f on the test split, built in %.0f s", expert.task,
             expert.metric, expert.score, expert.seconds)
