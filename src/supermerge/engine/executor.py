"""Streaming execution of a merge plan: read, merge and write one tensor at a time.

Reads run on a thread pool ahead of the computation, limited by a byte budget of about
(K + 2) x the largest tensor in float32, so peak memory stays bounded whatever the model
size while small tensors still overlap their reads with compute. Every tensor is merged
in plan order with a seed derived from its name, so the output does not depend on the
number of threads.

A ``per_task`` method (TALL masks, EMR) returns a shared tensor plus per-task masks: the
shared tensors are written as the model, the masks 1 bit per entry into the output's
``task_state.safetensors`` through the same streaming writer, and ``task_state.json``
records the tasks and their scales (:mod:`supermerge.engine.task_state`). A method that
can be continued (OPCM) gets ``merge_state.json`` (:mod:`supermerge.engine.merge_state`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from supermerge.engine.adapter import AdapterReport, AdapterSink, lora_targets
from supermerge.engine.heads import HeadMeta, head_files, heads_card_note
from supermerge.engine.merge_state import write_merge_state
from supermerge.engine.plan import MergePlan, Source, TensorJob, spec_inputs
from supermerge.engine.spec import parse_dtype
from supermerge.engine.task_state import TaskStateWriter
from supermerge.errors import InputValueError
from supermerge.io import CheckpointWriter
from supermerge.io.guard import TOKENIZER_FILE_PATTERNS
from supermerge.io.lora import ADAPTER_SAFE_WEIGHTS
from supermerge.io.tokenizer import tokenizer_files
from supermerge.methods import TaskSpecific, TensorContext
from supermerge.methods.primitives import PARALLEL_FROM
from supermerge.progress import Progress

log = logging.getLogger(__name__)



@dataclass
class LoadedJob:
    """A job's inputs, resident in the compute dtype."""

    job: TensorJob
    reference: torch.Tensor
    base: torch.Tensor | None
    experts: list[torch.Tensor]


@dataclass
class MergeResult:
    """What a merge did, for the CLI and the logs."""

    out: Path
    tensors: int
    merged: int
    copied: int
    seconds: float
    largest_tensor_bytes: int
    memory_budget_bytes: int
    warnings: list[str] = field(default_factory=list)
    adapter: AdapterReport | None = None  # output: adapter: what the adapter holds and loses


def execute(
    plan: MergePlan,
    out: str | Path,
    *,
    overwrite: bool = False,
    threads: int = 2,
    compute_threads: int | None = None,
    shard_size: int = 5 * 2**30,
    recipe_yaml: str = "",
    progress: Progress | None = None,
) -> MergeResult:
    """Run the plan and publish the merged model at ``out``; returns a MergeResult.

    ``threads`` read ahead; the methods compute with ``compute_threads`` torch threads
    (default: the cores the readers leave, at least 1 and at most torch's setting),
    restored afterwards, and run their independent work (one expert each, or blocks of
    entries) on ``cores // compute_threads`` threads of their own for tensors of at least
    ``PARALLEL_FROM`` entries (:func:`method_threads`); the output is the same bytes for
    any of these counts. Cost: each input tensor is read once (plus ``passes`` more times
    for methods with a whole-model statistic); resident memory about (K + 2) x the largest
    tensor (a per-task method adds K boolean masks of one tensor); a method that can be
    continued adds one read of the base's weight files (their digest, for merge_state.json)
    unless it continues a merge. On any error the partial
    output, masks included, is removed and ``out`` is left as it was.
    """
    torch_threads = compute_threads or default_compute_threads(threads)
    with _torch_threads(torch_threads):
        return _execute(plan, out, overwrite=overwrite, threads=threads,
                        method_threads=method_threads(torch_threads),
                        shard_size=shard_size, recipe_yaml=recipe_yaml, progress=progress)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def method_threads(torch_threads: int) -> int:
    """Threads a method may use for its independent work (``TensorContext.threads``) beside
    ``torch_threads`` intra-op threads: ``cores // torch_threads``, at least 1, so the two
    together never ask for more than the cores (docs/performance.md has the measurements).
    """
    return max(1, _cores() // max(1, torch_threads))


def default_compute_threads(readers: int) -> int:
    """Torch threads for the methods beside ``readers`` reader threads: the cores left over,
    at least 1, at most torch's current setting.

    On a small machine torch's own parallelism, which takes every core, fights the readers:
    measured on 2 cores (502 M bfloat16 parameters, 3 experts), ties took 26.2 s with 2
    torch threads and 15.5 s with 1.
    """
    return max(1, min(torch.get_num_threads(), _cores() - readers))


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _execute(plan: MergePlan, out: str | Path, *, overwrite: bool, threads: int,
             method_threads: int, shard_size: int, recipe_yaml: str,
             progress: Progress | None) -> MergeResult:
    started = time.perf_counter()
    compute = parse_dtype(plan.spec.compute_dtype, "compute_dtype") or torch.float32
    merged = copied = 0
    layout = [(job.name, job.shape, job.out_dtype) for job in plan.jobs]
    task_state = _task_state_writer(plan)
    sink = _adapter_sink(plan)
    # The writer first (output guard, free disk space), then the first read of a weight.
    with CheckpointWriter(out, overwrite=overwrite, shard_size=shard_size,
                          layout=None if sink else layout,
                          side_files=task_state.side_files if task_state else None,
                          inputs=spec_inputs(plan.spec),
                          single_file=ADAPTER_SAFE_WEIGHTS if sink else None) as writer:
        statistic = _whole_model_statistic(plan, compute, threads, progress)
        total = len(plan.jobs)
        # No enumerate and an explicit del: a job's inputs must be freed before the next
        # job is awaited (enumerate's cached tuple and the loop variable would keep them).
        # A per-task method's state keeps tensors past a job: its inputs are not recycled.
        memory = _Memory(plan.memory_budget(), recycle=task_state is None)
        for loaded in _stream(plan, plan.jobs, compute, threads, memory):
            tensor = _merge_one(plan, loaded, statistic, method_threads)
            if task_state is not None and loaded.job.merge:
                tensor = task_state.add(writer, loaded.job.name, tensor)
            if sink is None:
                writer.add(loaded.job.name, tensor.to(loaded.job.out_dtype).contiguous())
                if loaded.job.merge:  # written (the writer keeps no reference): reuse the inputs
                    memory.recycle([*([loaded.base] if loaded.base is not None else []),
                                    *loaded.experts])
            elif loaded.job.merge:
                sink.add(writer, loaded.job.name, tensor, loaded.base, loaded.job.out_dtype)
            merged += loaded.job.merge
            copied += not loaded.job.merge
            if progress:
                progress("merge", merged + copied, total, loaded.job.name)
            del loaded, tensor
        report = sink.finish(writer) if sink is not None else None
        if sink is None:
            # the reference's tokenizer (if experts lack it), unless the merge writes its own
            skip = TOKENIZER_FILE_PATTERNS if plan.vocab is not None else ()
            writer.copy_model_files(plan.reference.model_dir, skip)
            if plan.model_files is not plan.reference:
                writer.copy_model_files(plan.model_files.model_dir, skip)
            _write_config(plan, writer)
            if plan.vocab is not None:  # the tokenizer of the output vocabulary
                for name, data in tokenizer_files(plan.vocab.tokenizer).items():
                    writer.write_bytes(name, data)
        _write_heads(plan, writer)
        writer.write_text("supermerge_recipe.yaml", recipe_yaml)
        if task_state is not None:
            task_state.finish(writer)
        _write_merge_state(plan, writer, statistic)
        writer.write_model_card(
            base_models=[*([plan.spec.base_model] if plan.spec.base_model else []),
                         *(m.path for m in plan.spec.models)],
            method=plan.method.name,
            recipe_yaml=recipe_yaml,
            extra_markdown=(task_state.model_card_note() if task_state
                            else report.markdown() if report else "")
            + heads_card_note([head.task for head in plan.heads]),
            library="peft" if report else "transformers",
        )
        published = writer.commit()
    for warning in plan.warnings:
        log.warning(warning)
    return MergeResult(out=published, tensors=len(plan.jobs), merged=merged, copied=copied,
                       seconds=time.perf_counter() - started,
                       largest_tensor_bytes=plan.largest_tensor_bytes,
                       memory_budget_bytes=plan.memory_budget(), warnings=list(plan.warnings),
                       adapter=report)


def _adapter_sink(plan: MergePlan) -> AdapterSink | None:
    """The adapter writer of ``output: adapter`` (targets from the inputs' headers)."""
    if plan.spec.output != "adapter":
        return None
    base = plan.spec.base_model
    recorded = str(Path(base).resolve()) if base and Path(base).exists() else base
    return AdapterSink(plan.reference, lora_targets(plan.reference, plan.experts),
                       plan.spec.rank, recorded, svd=plan.spec.svd, seed=plan.spec.seed)


def _task_state_writer(plan: MergePlan) -> TaskStateWriter | None:
    """The writer of a per-task method's masks and task_state.json; None for other methods."""
    if not plan.method.per_task:
        return None
    base = plan.spec.base_model  # recorded absolute: load_task_state may run elsewhere
    return TaskStateWriter(plan.method.name, [m.path for m in plan.spec.models],
                           str(Path(base).resolve()) if base is not None else None,
                           [(job.name, job.shape) for job in plan.jobs if job.merge])


def _write_merge_state(plan: MergePlan, writer: CheckpointWriter, statistic) -> None:
    """Write ``merge_state.json`` for a method that can be continued (OPCM): its record of
    the statistic, the base's digest (one read of its weight files, unless the merge
    continued carries it) and every expert merged so far."""
    if plan.method.state is None or plan.base is None or plan.spec.output != "model":
        return  # an adapter holds a truncated update: nothing to continue from
    previous = plan.resumed
    experts = [m.path for m in plan.spec.models]
    if previous is not None:
        experts = [*previous.experts, *experts[1:]]
    write_merge_state(writer, method=plan.method.name, parameters=dict(plan.spec.parameters),
                      base=plan.base, base_digest=previous.base_digest if previous else None,
                      experts=experts, record=plan.method.state(statistic))


def _write_heads(plan: MergePlan, writer: CheckpointWriter) -> None:
    """Write each expert's task head (``heads/<task>.*``, :mod:`supermerge.engine.heads`).
    Costs one read of the head tensors (small: the last layers only)."""
    heads = {head.task: {name: head.checkpoint.read(name) for name in head.names}
             for head in plan.heads}
    meta = {head.task: HeadMeta(config=head.checkpoint.config, expert=head.checkpoint.path)
            for head in plan.heads}
    for name, data in head_files(heads, meta).items():
        writer.write_bytes(name, data)


def _write_config(plan: MergePlan, writer: CheckpointWriter) -> None:
    """Write config.json with the plan's changes (a sliced merge's layer count, the output
    vocabulary's size) and the recipe's output dtype, so transformers loads the output as
    written."""
    config = plan.model_files.config
    if config is None or (plan.spec.out_dtype is None and not plan.config_changes):
        return
    changes = dict(plan.config_changes)
    if plan.spec.out_dtype is not None:
        name = str(parse_dtype(plan.spec.out_dtype, "dtype")).removeprefix("torch.")
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        changes.update(dict.fromkeys(keys, name))
    writer.write_text("config.json", json.dumps({**config, **changes}, indent=2))


def _merge_one(plan: MergePlan, loaded: LoadedJob, statistic,
               threads: int = 1) -> torch.Tensor | TaskSpecific:
    """Return the output of one job: the method's tensor (or TaskSpecific), or the
    reference's values where nothing is merged.

    With ``job.rows`` only the first rows are merged; the other rows keep the reference's
    values (and, for a per-task method, masks of False: every task keeps them too).
    """
    job = loaded.job
    if not job.merge:
        return loaded.reference
    rows = job.rows
    cut = (lambda t: t[:rows]) if rows is not None else (lambda t: t)
    base = cut(loaded.base) if loaded.base is not None else None
    ctx = TensorContext(name=job.name, seed=job.seed, statistic=statistic,
                        position=job.position, scratch=True,
                        threads=threads if job.numel >= PARALLEL_FROM else 1)
    result = plan.method.fn(base, [cut(e) for e in loaded.experts], job.params,
                            job.model_params, ctx)
    if rows is None:
        return result
    if isinstance(result, TaskSpecific):
        no = torch.zeros_like(loaded.reference, dtype=torch.bool)
        return TaskSpecific(shared=_fill_rows(loaded.reference, result.shared, rows),
                            masks=[_fill_rows(no, m, rows) for m in result.masks],
                            scales=result.scales)
    return _fill_rows(loaded.reference, result, rows)


def _fill_rows(full: torch.Tensor, head: torch.Tensor, rows: int) -> torch.Tensor:
    """Return a copy of ``full`` with its first ``rows`` rows replaced by ``head``."""
    out = full.clone()
    out[:rows] = head
    return out


def _whole_model_statistic(plan: MergePlan, compute, threads, progress):
    """Stream every mergeable tensor's task vectors through the method's statistic, if any."""
    if plan.statistic_params is None:
        return None
    stat = plan.method.statistic(*plan.statistic_params)
    jobs = [j for j in plan.jobs if j.merge]
    for p in range(stat.passes):
        done = 0
        for loaded in _stream(plan, jobs, compute, threads,
                              _Memory(plan.memory_budget(), recycle=False)):
            rows = loaded.job.rows
            base = loaded.base if rows is None else loaded.base[:rows]
            for i, expert in enumerate(loaded.experts):  # our own buffers: subtract in place
                stat.observe(p, i, (expert if rows is None else expert[:rows]).sub_(base))
            done += 1  # noqa: SIM113 -- enumerate's cached tuple would keep the inputs alive
            if progress:
                progress(f"statistic pass {p + 1}/{stat.passes}", done, len(jobs),
                         loaded.job.name)
            del loaded, base
        stat.finish_pass(p)
    return stat.result()


class _Memory:
    """The stream's byte budget: the reads in flight plus freed inputs kept for reuse.

    A merged job's input buffers, once its output is written, are kept (newest last) for
    later reads of as many entries: a Llama-like model repeats its shapes every layer, so
    most reads land in memory already faulted in instead of fresh pages (on 2 cores the
    page faults of fresh buffers cost about as much system time as the copies from the
    page cache). Kept buffers count against the budget: the oldest are freed whenever a
    read needs their room, so after each admission in-flight plus kept bytes are within
    it; the consumer's current job comes on top, as without reuse (a kept buffer is
    memory the finished job held). Used from the consumer's thread only (the stream's
    generator runs there).
    """

    def __init__(self, budget: int, *, recycle: bool) -> None:
        self.budget = budget
        self.in_flight = 0
        self._recycle = recycle
        self._kept: list[torch.Tensor] = []
        self._kept_bytes = 0

    def admit(self, job: TensorJob, *, first: bool) -> list[torch.Tensor | None] | None:
        """Reserve ``job``'s bytes and return a reused buffer (or None) per float input;
        None, reserving nothing, when it does not fit beside the reads in flight (a job
        with nothing else in flight, ``first``, always fits)."""
        need = job.input_bytes()
        if not first and self.in_flight + need > self.budget:
            return None
        sources = ([job.base] if job.base is not None else []) + list(job.experts)
        reused = [self._take(source) for source in sources] if job.merge else []
        while self._kept and self.in_flight + need + self._kept_bytes > self.budget:
            self._kept_bytes -= self._kept.pop(0).nbytes  # the oldest first
        self.in_flight += need
        return reused

    def done(self, job: TensorJob) -> None:
        """The job's inputs are the consumer's now: no longer in flight."""
        self.in_flight -= job.input_bytes()

    def recycle(self, tensors: list[torch.Tensor]) -> None:
        """Keep a finished job's input buffers (each once), up to the budget in all."""
        if not self._recycle:
            return
        seen: set[int] = set()
        for tensor in tensors:
            storage = tensor.untyped_storage()
            whole = (tensor.is_contiguous() and tensor.storage_offset() == 0
                     and storage.nbytes() == tensor.nbytes)
            if not whole or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            if self._kept_bytes + tensor.nbytes <= self.budget:
                self._kept.append(tensor.view(-1))
                self._kept_bytes += tensor.nbytes

    def _take(self, source: Source) -> torch.Tensor | None:
        numel = int(torch.Size(source.checkpoint.info(source.name).shape).numel())
        for i in range(len(self._kept) - 1, -1, -1):
            if self._kept[i].numel() == numel:
                self._kept_bytes -= self._kept[i].nbytes
                return self._kept.pop(i)
        return None


def _stream(plan: MergePlan, jobs: list[TensorJob], compute: torch.dtype,
            threads: int, memory: _Memory) -> Iterator[LoadedJob]:
    """Yield the jobs' inputs in order, reading ahead on threads within ``memory``'s budget."""
    pending: deque[tuple[TensorJob, Future]] = deque()
    upcoming = iter(jobs)
    next_job = next(upcoming, None)
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="read") as pool:
        while pending or next_job is not None:
            while next_job is not None:
                reused = memory.admit(next_job, first=not pending)
                if reused is None:
                    break
                pending.append((next_job, pool.submit(_load, plan, next_job, compute, reused)))
                del reused
                next_job = next(upcoming, None)
            job, future = pending.popleft()
            try:
                loaded = future.result()
            except BaseException:
                for _, other in pending:
                    other.cancel()
                raise
            memory.done(job)
            yield loaded
            del loaded, future  # free this job's inputs while the next one is awaited


def _load(plan: MergePlan, job: TensorJob, compute: torch.dtype,
          reused: list[torch.Tensor | None]) -> LoadedJob:
    """Read one job's inputs, into the ``reused`` buffers where given (base first); the
    reference is the base (or the first expert), never read twice."""
    if not job.merge:
        return LoadedJob(job, job.reference.checkpoint.read(job.reference.name), None, [])
    into = iter(reused)
    sources = [*([job.base] if job.base is not None else []), *job.experts]
    inputs = [_read(plan, source, compute, next(into)) for source in sources]
    if job.remap and plan.vocab is not None:  # rows onto the output vocabulary, in place
        plan.vocab.remap([source.checkpoint for source in sources], inputs)
    base = inputs[0] if job.base is not None else None
    experts = inputs[1:] if job.base is not None else inputs
    return LoadedJob(job, base if base is not None else experts[0], base, experts)


def _read(plan: MergePlan, source: Source, compute: torch.dtype,
          reused: torch.Tensor | None = None) -> torch.Tensor:
    """Read one float input in the compute dtype (into ``reused``, a flat buffer of as many
    entries, when given), applying the NaN/Inf policy."""
    shape = source.checkpoint.info(source.name).shape
    out = reused.view(shape) if reused is not None and reused.dtype == compute else None
    tensor = source.checkpoint.read(source.name, dtype=compute, out=out)
    if tensor.numel() and not all(map(math.isfinite, torch.aminmax(tensor))):
        # NaN and Inf show up in the min or max: 25x cheaper than torch.isfinite
        bad = int((~torch.isfinite(tensor)).sum())
        message = f"{bad} NaN/Inf value(s) in an input tensor"
        if plan.spec.on_nonfinite == "refuse":
            raise InputValueError(message, file=str(source.checkpoint.path), tensor=source.name,
                                  fix="repair the checkpoint, or set `on_nonfinite: warn` to merge "
                                      "anyway")
        log.warning("%s (file %s, tensor %s)", message, source.checkpoint.path, source.name)
    return tensor
