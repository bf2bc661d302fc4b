"""Reports of scores: a terminal table, Markdown, JSON and a grouped bar chart.

Benchmark results (the dict :func:`supermerge.run.bench.run_benchmark` returns) and
single-model :class:`~supermerge.eval.evaluate.EvalReport` s are both rendered from one
list of rows, so the terminal and Markdown tables always agree.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from supermerge.eval.evaluate import EvalReport

Rows = list[list[str]]
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1"}


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def ranked(results: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The methods run, best normalised score first (then by name)."""
    return sorted(results["methods"].items(),
                  key=lambda item: (-(item[1]["normalized"] or 0.0), item[0]))


def benchmark_rows(results: Mapping[str, Any]) -> Rows:
    """Return the header and one row per model: experts, base, then the methods ranked."""
    tasks = results["tasks"]
    experts = results["experts"]
    rows = [["model", *tasks, "average", "normalized", "merge s"]]
    rows.append(["expert (each task's own)", *(_number(experts[t]) for t in tasks),
                 _number(_mean([experts[t] for t in tasks])), "1.000", ""])
    named = [("base (no merge)", results["base"])]
    named += [(_method_label(name, row), row) for name, row in ranked(results)]
    for label, row in named:
        rows.append([label, *(_number(row["per_task"][t]) for t in tasks),
                     _number(row["average"]), _number(row["normalized"]),
                     _number(row.get("seconds"), 1)])
    return rows


def _method_label(name: str, row: Mapping[str, Any]) -> str:
    chosen = row.get("params", {}).get("lambda") if "validation" in row else None
    return name if chosen is None else f"{name} (lambda {chosen})"


def report_rows(report: EvalReport) -> Rows:
    """Return the header and one row per task, then the average, for one model."""
    rows = [["task", "metric", "score", "expert", "normalized"]]
    for s in report.scores.values():
        rows.append([s.task, METRIC_NAMES.get(s.metric, s.metric), _number(s.score),
                     _number(s.expert), _number(s.normalized)])
    rows.append(["average", "", _number(report.average), "", _number(report.normalized)])
    return rows


def text_table(rows: Rows) -> str:
    """Render rows as a fixed-width table for a terminal (first column left-aligned)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                        strict=True)]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def markdown_table(rows: Rows) -> str:
    """Render rows as a Markdown table (numbers right-aligned)."""
    lines = ["| " + " | ".join(rows[0]) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines) + "\n"


def benchmark_notes(results: Mapping[str, Any]) -> list[str]:
    """Sentences under the table: metrics, methods not run, tasks skipped."""
    metrics = results.get("metrics", {})
    lines = [
        "Scores are on each task's test split with the task's own head; "
        "normalized = mean over tasks of merged / expert.",
        "Metrics: " + ", ".join(f"{t} {METRIC_NAMES.get(m, m)}" for t, m in metrics.items())
        + ".",
    ]
    lines += [f"Not run: {name} ({why})." for name, why in results.get("not_run", {}).items()]
    lines += [f"Skipped task: {name} ({why})." for name, why in results.get("skipped", {}).items()]
    lines += [f"{name} ran with " + ", ".join(f"{k} {v[0]} (default {v[1]})"
                                               for k, v in row["non_default"].items()) + "."
              for name, row in results["methods"].items() if row.get("non_default")]
    lines += [f"{name} ran with every default of its method."
              for name, row in results["methods"].items()
              if "non_default" in row and not row["non_default"]]
    lines += [f"{name} then ran {row['then']}." for name, row in results["methods"].items()
              if row.get("then")]
    lines += [f"{name} kept {row['configuration']} by held-out prediction loss (" + ", ".join(
        f"{label} {loss:.4f}" for label, loss in row["selection"].items()) + ")."
        for name, row in results["methods"].items() if row.get("selection")]
    peaks = {name: row["peak_rss_mib"] for name, row in results["methods"].items()
             if "peak_rss_mib" in row}
    if peaks:
        lines.append("Measured peak RSS rise of the learned merges: " + ", ".join(
            f"{name} {mib:.0f} MiB" for name, mib in peaks.items()) + ".")
    return lines


def benchmark_markdown(results: Mapping[str, Any]) -> str:
    """Return results.md: a title line, the table and the notes."""
    head = f"Benchmark of {len(results['tasks'])} tasks, {results['date']}"
    if results.get("command"):
        head += f", `{results['command']}`"
    bullets = "".join(f"- {line}\n" for line in benchmark_notes(results))
    return f"{head}\n\n{markdown_table(benchmark_rows(results))}\n{bullets}"


def plot_accuracy(results: Mapping[str, Any], path: str | Path) -> Path:
    """Draw grouped bars to a PNG: one group per model (the experts first as reference,
    the base, then the methods ranked), one bar per task, a mark at each average.

    Needs matplotlib. Returns the path.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = results["tasks"]
    models = [("experts", results["experts"]), ("base", results["base"]["per_task"])]
    models += [(name, row["per_task"]) for name, row in ranked(results)]
    width = 0.8 / len(tasks)
    figure = Figure(figsize=(max(8.0, 0.55 * len(models) + 2), 5.0))
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    colors = colormaps["tab10" if len(tasks) <= 10 else "tab20"]
    for i, task in enumerate(tasks):
        xs = [m + (i - (len(tasks) - 1) / 2) * width for m in range(len(models))]
        ax.bar(xs, [scores[task] for _, scores in models], width, label=task,
               color=colors(i))
    averages = [_mean([scores[t] for t in tasks]) for _, scores in models]
    ax.scatter(range(len(models)), averages, marker="_", s=400, color="black", zorder=3,
               label="average")
    ax.axhline(averages[0], color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(models)), [name for name, _ in models], rotation=45, ha="right")
    ax.set_ylim(0, 1.15)  # room for the legend above the bars
    ax.set_yticks([i / 5 for i in range(6)])
    ax.set_ylabel("test score (accuracy or macro-F1)")
    ax.set_title(f"{len(tasks)} experts merged into one model: test score per task "
                 f"({results['date'][:10]})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(len(tasks) + 1, 5), loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return Path(path)


def write_results(results: Mapping[str, Any], out: str | Path) -> dict[str, Path]:
    """Write results.json, results.md and accuracy.png into ``out``; returns their paths.

    Without matplotlib (the ``plot`` extra) the chart is skipped with a warning and
    ``"chart"`` is missing from the result."""
    from supermerge.plotting import can_plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md",
             "chart": out / "accuracy.png"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["markdown"].write_text(benchmark_markdown(results))
    if can_plot(str(paths["chart"])):
        plot_accuracy(results, paths["chart"])
    else:
        del paths["chart"]
    return paths
