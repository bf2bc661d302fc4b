"""Recipe search on the offline benchmark: CMA-ES vs a lambda grid vs SuperMerge; MAP vs a grid.

Uses the eval layer's package tasks and their cached experts (all-MiniLM-L6-v2 fine-tuned
per task; built on first use, see ``supermerge demo``). Every method gets the same budget
of B *model evaluations*, one evaluation being one pass over the tasks' validation splits
(32 examples per task):

- ``lambda grid``: task arithmetic with all weights 1 and B values of lambda in [0, 1.5];
- ``CMA-ES``: one task-arithmetic weight per expert in [0, 1.5], B // popsize generations;
- ``SuperMerge``: B full-batch steps (each also a backward pass) on the same validation
  examples, tanh coefficients per tensor, best held-out step kept.

Each winner is scored on the test splits (never seen by any method). Then, for the first
two tasks, MAP (a 3 x 3 design, quadratic surrogates, 5 re-measured front points) is
compared with a brute-force ``--grid`` x ``--grid`` grid of the two weights: the error of
the surrogates over the whole grid, the error at the re-measured front points, and the
hypervolume of the measured grid front against MAP's re-measured points.

Prints markdown tables; ``--json`` also writes every number. Run:
``python benchmarks/search.py --tasks sms_spam,rt_sentiment --budget 16`` (minutes on
2 cores; the grid dominates).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supermerge.cli.search import TextTaskEvaluator
from supermerge.eval import default_base, evaluate, get_experts, load_encoder, resolve_tasks
from supermerge.eval.model import collate, load_tokenizer, tokenize
from supermerge.io import open_checkpoint
from supermerge.learn import CheckpointState, TaskData, supermerge
from supermerge.learn import Task as LearnTask
from supermerge.search import (
    LocalBackend,
    SearchSpace,
    best_of,
    cma_search,
    grid_units,
    hypervolume_2d,
    map_front,
    non_dominated,
    score_points,
)

WEIGHTS = (0.0, 1.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sms_spam,rt_sentiment")
    parser.add_argument("--budget", type=int, default=16, help="model evaluations per method")
    parser.add_argument("--popsize", type=int, default=4)
    parser.add_argument("--grid", type=int, default=9, help="brute-force grid per weight")
    parser.add_argument("--skip-map", action="store_true", help="only compare the methods")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tasks, _ = resolve_tasks(args.tasks.split(","))
    base = default_base()
    experts = get_experts(base, tasks)
    paths = [str(experts[t.name].path) for t in tasks]
    factory = TextTaskEvaluator(str(base), tuple(paths), tuple(t.name for t in tasks))
    started = time.perf_counter()
    evaluator = factory()
    backend = LocalBackend(lambda: evaluator)
    results: dict[str, Any] = {"tasks": [t.name for t in tasks], "budget": args.budget,
                               "build_seconds": time.perf_counter() - started,
                               "experts_test": {t.name: experts[t.name].score for t in tasks}}
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "models": paths}
    scorer = TestScorer(base, tasks, experts)

    rows = {}
    lam = SearchSpace({**recipe, "models": [{"model": p, "parameters": {"weight": 1.0}}
                                            for p in paths]}, {"lambda": (0.0, 1.5)})
    timer = time.perf_counter()
    grid = score_points(lam, backend, grid_units(1, args.budget))
    best = best_of(grid)
    rows["lambda grid"] = scorer.row(
        evaluator.merged_weights(lam.candidate_at(best.values)), best.fitness, args.budget,
        time.perf_counter() - timer, f"lambda={best.values[0]:.3f}")

    weights = SearchSpace(recipe, {"weight": WEIGHTS})
    timer = time.perf_counter()
    found = cma_search(weights, backend, generations=args.budget // args.popsize,
                       popsize=args.popsize, seed=args.seed)
    rows["CMA-ES"] = scorer.row(
        evaluator.merged_weights(weights.candidate_at(found.best.values)), found.best.fitness,
        found.evaluations, time.perf_counter() - timer,
        ", ".join(f"{v:.2f}" for v in found.best.values))

    timer = time.perf_counter()
    learned = learn_supermerge(base, tasks, paths, scorer, args.budget, args.seed)
    rows["SuperMerge"] = scorer.row(learned, scorer.validation(learned), args.budget,
                                    time.perf_counter() - timer, "tanh(W) per tensor")
    results["methods"] = rows
    print(methods_table(rows, [t.name for t in tasks], args.budget))

    if len(tasks) >= 2 and not args.skip_map:
        pair = SearchSpace({**recipe, "models": paths[:2]}, {"weight": WEIGHTS})
        pair_evaluator = TextTaskEvaluator(str(base), tuple(paths[:2]),
                                           tuple(t.name for t in tasks[:2]))()
        results["map"] = map_vs_grid(pair, LocalBackend(lambda: pair_evaluator), args.grid,
                                     args.seed)
        print(map_table(results["map"]))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


class TestScorer:
    """Scores merged encoder weights on the test (or validation) splits with the experts'
    heads; loads the weights into one reusable encoder."""

    def __init__(self, base: Path, tasks: list, experts: dict) -> None:
        self.tasks, self.experts = tasks, experts
        self.encoder = load_encoder(base)
        self.tokenizer = load_tokenizer(base)
        self.heads = {name: e.head() for name, e in experts.items()}

    def scores(self, weights: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        """Per-task metric of the encoder with ``weights`` on ``split``."""
        self.encoder.load_state_dict(weights, strict=False)
        report = evaluate(self.encoder, self.tasks, heads=self.heads, tokenizer=self.tokenizer,
                          split=split)
        return report.per_task()

    def validation(self, weights: dict[str, torch.Tensor]) -> float:
        """Mean validation metric."""
        return float(np.mean(list(self.scores(weights, "validation").values())))

    def row(self, weights: dict[str, torch.Tensor], validation: float, evaluations: int,
            seconds: float, found: str) -> dict[str, Any]:
        """A results row: validation fitness, test scores, cost, what was found."""
        test = self.scores(weights, "test")
        return {"validation": validation, "test": test, "test_mean": float(np.mean(
            list(test.values()))), "evaluations": evaluations, "seconds": seconds,
            "found": found}


def learn_supermerge(base: Path, tasks: list, paths: list[str], scorer: TestScorer,
                     steps: int, seed: int) -> dict[str, torch.Tensor]:
    """SuperMerge with ``steps`` full-batch steps; returns the merged encoder weights."""
    data = []
    for task in tasks:
        texts, labels = task.examples("validation")
        inputs = collate(tokenize(scorer.tokenizer, texts, 64), scorer.tokenizer.pad_token_id)
        data.append(LearnTask(task.name, TaskData(inputs, torch.tensor(labels))))
    module = load_encoder(base)
    with ExitStack() as stack:
        experts = {t.name: CheckpointState(stack.enter_context(open_checkpoint(p)))
                   for t, p in zip(tasks, paths, strict=True)}
        merge = supermerge(module, module.state_dict(), experts, data, heads=scorer.heads,
                           steps=steps, batch_size=32, eval_every=max(1, steps // 4),
                           lr=0.05, seed=seed)
    return merge.model.merged_state_dict()


def map_vs_grid(space: SearchSpace, backend: LocalBackend, points: int,
                seed: int) -> dict[str, Any]:
    """MAP's predicted front against a brute-force grid of the two weights."""
    timer = time.perf_counter()
    result = map_front(space, backend, checks=5, seed=seed)
    map_seconds = time.perf_counter() - timer
    timer = time.perf_counter()
    units = grid_units(2, points)
    grid = score_points(space, backend, units)
    grid_seconds = time.perf_counter() - timer
    tasks = result.tasks
    measured = np.array([[g.scores.per_task[t] for t in tasks] for g in grid])
    predicted = np.stack([result.surrogates[t].predict(units) for t in tasks], axis=1)
    checks = np.array([[c.scores.per_task[t] for t in tasks] for c in result.checks])
    front = measured[non_dominated(measured)]
    reference = tuple(float(v) for v in measured.min(axis=0))
    return {
        "tasks": tasks,
        "map_evaluations": result.evaluations,
        "map_seconds": map_seconds,
        "grid_evaluations": len(grid),
        "grid_seconds": grid_seconds,
        "surrogate_r2": {t: s.r2 for t, s in result.surrogates.items()},
        "grid_mean_abs_error": np.abs(predicted - measured).mean(axis=0).tolist(),
        "check_mean_abs_error": np.abs(result.check_errors()).mean(axis=0).tolist(),
        "hypervolume_grid_front": hypervolume_2d(front, reference),
        "hypervolume_map_checks": hypervolume_2d(checks, reference),
        "reference": list(reference),
        "grid_front": front.tolist(),
        "map_checks_measured": checks.tolist(),
        "map_checks_predicted": result.check_predicted.tolist(),
    }


def methods_table(rows: dict[str, dict[str, Any]], tasks: list[str], budget: int) -> str:
    """Markdown: one row per method."""
    head = ["method", "evaluations", "validation mean", *(f"test {t}" for t in tasks),
            "test mean", "seconds", "found"]
    lines = [f"Budget: {budget} model evaluations (validation passes) per method.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name, str(r["evaluations"]), f"{r['validation']:.3f}",
                 *(f"{r['test'][t]:.3f}" for t in tasks), f"{r['test_mean']:.3f}",
                 f"{r['seconds']:.0f}", r["found"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def map_table(m: dict[str, Any]) -> str:
    """Markdown: MAP against the brute-force grid."""
    first, second = m["tasks"]
    return "\n".join([
        f"MAP vs brute-force grid ({first}, {second}; validation split):", "",
        "| | evaluations | seconds | hypervolume | mean abs error (per task) |",
        "|---|---|---|---|---|",
        f"| brute-force grid | {m['grid_evaluations']} | {m['grid_seconds']:.0f} | "
        f"{m['hypervolume_grid_front']:.4f} | - |",
        f"| MAP (surrogates over the grid) | {m['map_evaluations']} | {m['map_seconds']:.0f} | "
        f"- | {m['grid_mean_abs_error'][0]:.3f}, {m['grid_mean_abs_error'][1]:.3f} |",
        f"| MAP (re-measured front points) | 5 | - | {m['hypervolume_map_checks']:.4f} | "
        f"{m['check_mean_abs_error'][0]:.3f}, {m['check_mean_abs_error'][1]:.3f} |",
        "", f"Surrogate R² on the design: {m['surrogate_r2']}; hypervolume reference: "
        f"the grid's worst score per task {m['reference']}.", ""])


if __name__ == "__main__":
    main()
