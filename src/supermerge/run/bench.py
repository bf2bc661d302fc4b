"""The benchmark behind `supermerge demo`: real experts, every merge method, test scores.

:func:`run_benchmark` builds (or reuses) one expert per task, merges them with every
data-free method in the registry that can merge K models (those with a ``lambda`` get it
chosen on the validation split), with the data-driven methods of :mod:`supermerge.learn`
(AdaMerging, Fisher and RegMean on the unlabelled validation inputs, SuperMerge on the
labelled validation split, and hierarchical SuperMerge on request), scores every merge
on the test splits with each task's own head, and writes ``results.json``, ``results.md``
and ``accuracy.png``. Every method is one job; jobs run in ``workers`` processes (see
:mod:`supermerge.eval.parallel`).

``results.json`` keeps a stable shape: ``tasks``, ``experts`` {task: score}, ``methods``
{name: {per_task, average, normalized, seconds, needs, ...}}, ``date``, ``command``; plus
``metrics``, ``not_run`` {name: reason}, ``skipped`` {task: reason}, ``base`` (the
unmerged base with the experts' heads) and ``settings``.
"""

from __future__ import annotations

import datetime
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from supermerge.api import merge
from supermerge.errors import InputValueError, SupermergeError
from supermerge.eval.evaluate import EvalReport, evaluate
from supermerge.eval.experts import Expert, ExpertCache, ExpertConfig, get_experts
from supermerge.eval.model import collate, load_encoder, load_tokenizer, tokenize
from supermerge.eval.parallel import run_jobs
from supermerge.eval.report import write_results
from supermerge.eval.tasks import Split, Task
from supermerge.io.guard import check_apart
from supermerge.methods import Method, available_methods, get_method
from supermerge.progress import Progress, ignore

log = logging.getLogger(__name__)

LEARNED_RUNS = ("adamerging", "fisher", "regmean", "twin", "surgery", "supermerge",
                "supermerge_surgery", "supermerge_paper", "supermerge_hierarchical")
PAPER = {"objective": "labels", "basis": "task_vectors"}
"""SuperMerge as its paper configures it (cross-entropy on labels, raw task vectors)."""
Row = dict[str, Any]


def learned_method_name(run: str) -> str:
    """The learned method a benchmark run uses (``supermerge_paper`` -> ``supermerge``)."""
    return "supermerge" if run.startswith("supermerge") else run


@dataclass(frozen=True)
class BenchmarkConfig:
    """What the benchmark runs, beside the tasks.

    ``lambdas``: the grid searched on validation for methods with a ``lambda``.
    SuperMerge runs with its defaults, as a user gets it (``supermerge_paper`` with the
    paper's objective and basis); ``learned_steps`` replaces every trained method's steps.
    AdaMerging alone is shortened to minutes on two CPU cores (``adamerging_steps``,
    ``adamerging_lr``, ``adamerging_batch_size``; the report states it): its default is
    the paper's 500 steps at 1e-3, and its rate keeps lr x steps near that product (faster,
    its entropy objective collapses tasks onto one class). Fisher and RegMean keep their
    defaults and read every validation input.
    ``methods``: run only these (names as in results.json; empty: all).
    ``hierarchical``: also run hierarchical SuperMerge (``fan_in`` experts per node).
    ``workers``: processes for the experts and the merges. ``keep_models``: keep every
    merged model under ``out/models``.
    """

    expert: ExpertConfig = field(default_factory=ExpertConfig)
    lambdas: tuple[float, ...] = (0.3, 0.6, 1.0)
    learned_steps: int | None = None
    adamerging_steps: int = 40
    adamerging_lr: float = 0.01
    adamerging_batch_size: int = 8
    hierarchical: bool = False
    fan_in: int = 2
    workers: int = 2
    keep_models: bool = False
    methods: tuple[str, ...] = ()

    def learned_params(self, name: str) -> dict[str, Any]:
        """The parameters the benchmark gives a data-driven run (``learned_steps`` only to
        methods that take steps)."""
        from supermerge.learn import get_learned_method

        method = get_learned_method(learned_method_name(name))
        params: dict[str, Any] = {}
        if name == "adamerging":
            params = {"steps": self.adamerging_steps, "lr": self.adamerging_lr,
                      "batch_size": self.adamerging_batch_size}
        if self.learned_steps is not None and "steps" in method.params.model_fields:
            params["steps"] = self.learned_steps
        if name == "supermerge_paper":
            params |= PAPER
        if name == "supermerge_hierarchical":
            params |= {"hierarchical": True, "fan_in": self.fan_in}
        return params


def run_benchmark(
    tasks: Sequence[Task],
    out: str | Path,
    *,
    base: str | Path,
    cache: ExpertCache | None = None,
    config: BenchmarkConfig | None = None,
    skipped: Mapping[str, str] | None = None,
    command: str = "",
    progress: Progress = ignore,
) -> dict[str, Any]:
    """Build experts, merge with every method, score; returns the results (as written).

    Writes ``results.json``, ``results.md`` and ``accuracy.png`` into ``out``. ``skipped``
    records tasks left out (with the reason). A method that fails is listed as not run
    with its error. Costs the experts not yet cached (see
    :func:`~supermerge.eval.experts.get_experts`), per data-free method one merge and one
    validation pass per ``lambda`` tried, per learned method ``learned_steps`` steps, and
    one test pass per method, spread over ``workers`` processes.
    """
    config = config or BenchmarkConfig()
    plan = _plan(len(tasks), config)
    out = Path(out)
    check_apart(out, [base, *(task.source for task in tasks if task.source)])
    work = out / ".work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    experts = get_experts(base, tasks, config=config.expert, cache=cache,
                          workers=config.workers, progress=progress)
    check_apart(out, [expert.path for expert in experts.values()])
    bench = _Bench(Path(base), tuple(tasks), dict(experts), config, out, work)
    learned = [n for n in LEARNED_RUNS if n in plan and plan[n] is None]
    jobs = [*learned, "base", *(n for n, why in plan.items() if why is None and n not in learned)]
    outcomes = {name: (row, error) for name, row, error in run_jobs(
        _job, [(bench, name) for name in jobs], workers=config.workers, progress=progress,
        on_done=_log_outcome)}
    base_row, error = outcomes.pop("base")
    if base_row is None:
        raise SupermergeError(f"scoring the base model failed: {error}")
    methods, not_run = {}, {}
    for name, reason in plan.items():
        row, error = outcomes.get(name, (None, None))
        if row is None:
            not_run[name] = reason or f"failed: {error}"
        else:
            methods[name] = row
    results: dict[str, Any] = {
        "tasks": [t.name for t in tasks],
        "metrics": {t.name: t.metric for t in tasks},
        "experts": {name: e.score for name, e in experts.items()},
        "methods": methods,
        "not_run": not_run,
        "skipped": dict(skipped or {}),
        "base": base_row,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "settings": {
            "base_model": str(base),
            "splits": {t.name: {k: len(v) for k, v in t.splits.items()} for t in tasks},
            "expert": asdict(config.expert),
            "expert_seconds": {name: e.seconds for name, e in experts.items()},
            "lambdas": list(config.lambdas),
            "workers": config.workers,
        },
    }
    shutil.rmtree(work, ignore_errors=True)
    write_results(results, out)
    return results


def _plan(k: int, config: BenchmarkConfig) -> dict[str, str | None]:
    """Every method in display order -> None if the benchmark runs it, else why not.

    With ``config.methods`` only those are planned; an unknown name is an InputValueError.
    """
    plan = {method.name: _cannot_run(method, k) for method in available_methods()}
    missing = _learn_missing()
    plan |= {name: missing for name in LEARNED_RUNS if config.hierarchical
             or name != "supermerge_hierarchical" or name in config.methods}
    if not config.methods:
        return plan
    unknown = [name for name in config.methods if name not in plan]
    if unknown:
        raise InputValueError(f"unknown benchmark method(s) {', '.join(map(repr, unknown))}",
                              fix=f"choose among: {', '.join([*plan, LEARNED_RUNS[-1]])}")
    return {name: why for name, why in plan.items() if name in config.methods}


def _learn_missing() -> str | None:
    """Why the data-driven methods cannot run here (None: they can)."""
    try:
        import supermerge.learn  # noqa: F401 - imported to learn whether it can be
    except ImportError as err:
        return f"supermerge.learn cannot be imported ({err})"
    return None


def _cannot_run(method: Method, k: int) -> str | None:
    """Why the benchmark cannot run a registered method on k experts (None: it can).

    Methods that need task ids (TALL masks, EMR) run: each task is scored with its id.
    """
    if method.needs not in ("none", "task id"):
        return f"needs {method.needs} data, which the benchmark gives only to supermerge.learn"
    if k < method.min_models or (method.max_models is not None and k > method.max_models):
        count = (f"exactly {method.min_models}" if method.min_models == method.max_models
                 else f"at least {method.min_models}" if method.max_models is None
                 else f"{method.min_models} to {method.max_models}")
        return f"merges {count} model(s), the benchmark has {k}"
    return None


def _job(bench: _Bench, name: str, progress: Progress) -> tuple[str, Row | None, str | None]:
    """One benchmark job (the base, a registry method or a learned one).

    Returns (name, results row, None), or (name, None, error message) if it failed: the
    run goes on and lists the method as failed.
    """
    try:
        if name == "base":
            row = bench.entry(bench.score(bench.base, "base", progress), needs="none")
        elif name in LEARNED_RUNS:
            row = bench.learned(name, progress)
        else:
            row = bench.data_free(get_method(name), progress)
    except SupermergeError as err:
        return name, None, err.message
    except Exception as err:  # a bug in one method must not sink a long run of the others
        return name, None, f"{type(err).__name__}: {err}"
    return name, row, None


def _log_outcome(outcome: tuple[str, Row | None, str | None]) -> None:
    name, row, error = outcome
    if row is None:
        log.warning("%s failed: %s", name, error)
        return
    normalized = "-" if row["normalized"] is None else f"{row['normalized']:.3f}"
    log.info("%s: average %.3f, normalised %s", name, row["average"], normalized)


@dataclass(frozen=True)
class _Bench:
    """What every job needs; plain data, so that it travels to worker processes."""

    base: Path
    tasks: tuple[Task, ...]
    experts: dict[str, Expert]
    config: BenchmarkConfig
    out: Path
    work: Path

    @cached_property
    def tokenizer(self) -> Any:
        """The base model's tokenizer (loaded once per process)."""
        return load_tokenizer(self.base)

    @cached_property
    def heads(self) -> dict[str, torch.nn.Module]:
        """Each task's head, from its expert (loaded once per process)."""
        return {name: e.head() for name, e in self.experts.items()}

    def score(self, model: str | Path | torch.nn.Module, label: str, progress: Progress,
              split: Split = "test") -> EvalReport:
        """Evaluate a model (directory or encoder) on every task with the experts' heads."""
        return evaluate(model, self.tasks, experts=self.experts, heads=self.heads,
                        tokenizer=self.tokenizer, split=split,
                        max_length=self.config.expert.max_length, label=label,
                        progress=progress)

    @staticmethod
    def entry(report: EvalReport, *, needs: str, seconds: float | None = None,
              **extra: Any) -> Row:
        """A method's row of results.json."""
        return {"per_task": report.per_task(), "average": report.average,
                "normalized": report.normalized, "seconds": seconds, "needs": needs, **extra}

    def target(self, name: str) -> Path:
        """Where a method's merged model goes: kept under out/models, or a work folder."""
        return (self.out / "models" if self.config.keep_models else self.work) / name

    def data_free(self, method: Method, progress: Progress) -> Row:
        """Merge with one registry method (lambda chosen on validation); returns its row.

        Each candidate merge is kept only while it is the best on validation.
        """
        global_names, _ = method.parameter_names()
        grid = self.config.lambdas if "lambda" in global_names else (None,)
        tried: dict[str, float] = {}
        best: tuple[float, Path, float, float | None] | None = None
        for index, value in enumerate(grid):
            label = method.name if value is None else f"{method.name} lambda={value}"
            folder = self.work / f"{method.name}-{index}"
            recipe = {
                "merge_method": method.name,
                "base_model": str(self.base),
                "models": [{"model": str(e.path)} for e in self.experts.values()],
                "parameters": {} if value is None else {"lambda": value},
            }
            started = time.perf_counter()
            merge(recipe, folder, overwrite=True,
                  progress=lambda _stage, d, t, what=None, s=f"merge {label}":
                  progress(s, d, t, what))
            seconds = time.perf_counter() - started
            score = 0.0
            if len(grid) > 1:
                score = self.score(folder, label, progress, split="validation").average
                tried[str(value)] = score
            if best is None or score > best[0]:
                if best is not None:
                    shutil.rmtree(best[1])
                best = (score, folder, seconds, value)
            else:
                shutil.rmtree(folder)
        assert best is not None  # the grid is never empty
        _, folder, seconds, value = best
        target = self.target(method.name)
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        folder.rename(target)
        report = self.score(target, method.name, progress)
        if not self.config.keep_models:
            shutil.rmtree(target)
        extra = {} if value is None else {"params": {"lambda": value},
                                          "validation": {"lambda": tried}}
        return self.entry(report, needs=method.needs, seconds=seconds, **extra)

    def learned(self, name: str, progress: Progress, params: Mapping[str, Any] | None = None
                ) -> Row:
        """Merge with a data-driven method on the validation split (with labels only if the
        method needs them) and score it; returns its row, with the measured peak memory.

        ``params`` replace the configuration's for this run (ablations)."""
        from supermerge.io import open_checkpoint
        from supermerge.learn import CheckpointState, TaskData, export_outcome, get_learned_method
        from supermerge.learn import Task as LearnTask
        from supermerge.learn.surgery import with_surgery

        method = get_learned_method(learned_method_name(name))
        params = dict(self.config.learned_params(name) if params is None else params)
        defaults = method.validate({})
        needs = method.data_needed(method.validate(params))
        data = []
        for task in self.tasks:
            texts, labels = task.examples("validation")
            inputs = collate(tokenize(self.tokenizer, texts, self.config.expert.max_length),
                             self.tokenizer.pad_token_id)
            targets = torch.tensor(labels) if needs == "labelled" else None
            data.append(LearnTask(task.name, TaskData(inputs, targets, f"{task.name} validation")))
        module = load_encoder(self.base)
        with ExitStack() as stack:
            experts = {n: CheckpointState(stack.enter_context(open_checkpoint(e.path)))
                       for n, e in self.experts.items()}
            started = time.perf_counter()
            def report_progress(stage: str, done: int, total: int, info: Any = None) -> None:
                progress(f"{stage} {name}", done, total, info)

            outcome = method.run(module, experts, data, heads=self.heads,
                                 progress=report_progress, **params)
            if name == "supermerge_surgery":  # SuperMerge's merge, repaired per task
                outcome = with_surgery(outcome, module, experts, data, heads=self.heads,
                                       progress=report_progress)
            seconds = time.perf_counter() - started
        extra: dict[str, Any] = {}
        if outcome.merge is not None:
            fit = outcome.merge.fits["root"]
            extra = {"heldout_loss": fit.heldout_loss, "objective": fit.objective,
                     "configuration": outcome.merge.chosen, "selection": outcome.merge.selection}
        if name == "supermerge_surgery":
            extra["then"] = "Representation Surgery (surgery's defaults) on its merged model"
        routed = bool(outcome.files)  # a router or surgery beside the model: scored from disk
        if self.config.keep_models or routed:
            export_outcome(self.target(name), outcome, method=method.name, overwrite=True,
                           model_dir=self.base,
                           base_models=[str(e.path) for e in self.experts.values()])
        state, peak = outcome.state, outcome.peak_rss
        if routed:
            report = self.score(self.target(name), name, progress)
            if not self.config.keep_models:
                shutil.rmtree(self.target(name))
        else:
            merged = load_encoder(self.base)
            merged.load_weights(state)
            report = self.score(merged, name, progress)
        changed = {k: [v, getattr(defaults, k)] for k, v in params.items()
                   if v != getattr(defaults, k)}
        return self.entry(report, needs=needs, seconds=seconds, params=params,
                          non_default=changed, peak_rss_mib=peak / 2**20, **extra)
