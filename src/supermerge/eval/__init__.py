"""Evaluation: tasks with fixed splits, cached experts, ``evaluate`` and the benchmark.

Layers inside the package: ``tasks`` (Task, splits, metrics, file tasks) -> ``sources``
(the tasks whose data ships in packages) -> ``model`` (mean-pooled encoders and heads) ->
``experts`` (fine-tuning and the cache) -> ``evaluate`` -> ``report``. The benchmark that
uses them all is :mod:`supermerge.run.bench`.
"""

from supermerge.eval.evaluate import EvalReport, TaskScore, evaluate
from supermerge.eval.experts import (
    Expert,
    ExpertCache,
    ExpertConfig,
    default_cache,
    get_experts,
    train_expert,
)
from supermerge.eval.model import MeanPooledEncoder, load_encoder, load_head
from supermerge.eval.report import (
    benchmark_markdown,
    benchmark_notes,
    benchmark_rows,
    markdown_table,
    plot_accuracy,
    report_rows,
    text_table,
    write_results,
)
from supermerge.eval.sources import (
    ALL_TASKS,
    DEFAULT_TASKS,
    SOURCES,
    default_base,
    load_task,
    resolve_tasks,
)
from supermerge.eval.tasks import (
    SplitSizes,
    Task,
    TaskError,
    TaskUnavailable,
    accuracy,
    macro_f1,
    task_from_file,
)
from supermerge.progress import Progress

__all__ = [
    "ALL_TASKS",
    "DEFAULT_TASKS",
    "SOURCES",
    "EvalReport",
    "Expert",
    "ExpertCache",
    "ExpertConfig",
    "MeanPooledEncoder",
    "Progress",
    "SplitSizes",
    "Task",
    "TaskError",
    "TaskScore",
    "TaskUnavailable",
    "accuracy",
    "benchmark_markdown",
    "benchmark_notes",
    "benchmark_rows",
    "default_base",
    "default_cache",
    "evaluate",
    "get_experts",
    "load_encoder",
    "load_head",
    "load_task",
    "macro_f1",
    "markdown_table",
    "plot_accuracy",
    "report_rows",
    "resolve_tasks",
    "task_from_file",
    "text_table",
    "train_expert",
    "write_results",
]
