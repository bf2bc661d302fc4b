"""Data-informed merges in closed form: Fisher merging and RegMean.

Both run the module forward over each expert's own task data (unlabelled: no labels are
read), gather a per-expert statistic and merge in one pass; nothing is trained.

* :func:`fisher_merge` (Matena & Raffel 2022, *Merging Models with Fisher-Weighted
  Averaging*, arXiv 2111.09832): element-wise ``sum_i w_i F_i theta_i / sum_i w_i F_i`` with
  ``F_i`` the diagonal empirical Fisher of expert ``i`` (labels sampled from the model).
* :func:`regmean_merge` (Jin et al. 2023, *Dataless Knowledge Fusion by Merging Weights of
  Language Models*, arXiv 2212.09849): per ``nn.Linear``, the weight minimising the summed
  squared distance of the merged layer's outputs to each expert's, on each expert's inputs:
  ``W^T = (sum_i G~_i)^{-1} sum_i G~_i W_i^T``; other tensors are averaged.

Experts are matched to tasks by name (a task named like an expert uses that expert's
data); when the names do not match, by position. Both functions take the module (its
architecture; its own tensors fill in whatever an expert lacks, e.g. integer buffers),
the experts as state dicts (or lazy mappings such as ``CheckpointState``) and return the
merged state dict. Heads are never merged and are left out of the result (every task
keeps its expert's head, as in :func:`~supermerge.learn.model.prepare_experts`): with
``head_prefix`` the tensors under it are each expert's head and each expert runs with its
own; or ``heads`` gives each task's head (tensor overrides or a module applied to the
module's output). ``progress(done, total)`` is called after every batch, counting
examples over all experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from supermerge.learn.data import IGNORE_INDEX, Task, TaskData
from supermerge.learn.errors import LearnError
from supermerge.learn.model import (
    Head,
    module_tensors,
    prepare_experts,
    run_with_head,
    wide_float,
)
from supermerge.learn.objectives import logits_of

State = Mapping[str, torch.Tensor]
Weights = Mapping[str, float] | Sequence[float]
Progress = Callable[[int, int], None]

DEFAULT_EXAMPLES = 256
BATCH = 32


def fisher_merge(
    module: nn.Module,
    experts: Mapping[str, State],
    tasks: Sequence[Task],
    *,
    head_prefix: str | None = None,
    heads: Mapping[str, Head] | None = None,
    weights: Weights | None = None,
    examples: int = DEFAULT_EXAMPLES,
    floor: float = 1e-6,
    normalize: bool = False,
    labels: Literal["sampled", "exact"] = "sampled",
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Fisher merging: the element-wise Fisher-weighted average of the experts.

    For expert ``i`` with parameters ``theta_i`` and the first ``examples`` inputs ``x`` of
    its task, the diagonal Fisher is ``F_i = mean_x (d log p(y | x; theta_i) / d theta)^2``
    with ``y ~ p(. | x; theta_i)`` sampled from the expert itself (a seeded generator:
    ``seed``), so no labels are needed. For language models (``kind="causal_lm"``) ``y`` is
    one sampled token per scored position (positions whose label is not -100 when labels are
    given, else those the attention mask marks real, else all) and ``log p`` their sum.
    ``labels="exact"`` (classification only) replaces the sample by the exact expectation,
    ``sum_y p(y | x) (d log p(y | x) / d theta)^2``: no sampling noise, one backward pass
    per class instead of one per example. The merge, per entry::

        merged = sum_i w_i (F_i + floor) theta_i / sum_i w_i (F_i + floor)

    so an all-zero Fisher falls back to the ``w``-weighted plain average (with ``floor=0``,
    entries every Fisher leaves at zero take that average too, never 0/0). ``normalize``
    first divides each expert's Fisher by its L2 norm over all merged tensors (MergeLM's
    and FusionBench's ``normalize_fisher_weight``), so that an expert whose Fisher is small
    overall, one confident on its own inputs, is not outvoted everywhere. ``weights`` (by
    expert name, or in the experts' order; default all 1) must be positive. Floating
    buffers (e.g. batch-norm statistics) have no gradient: zero Fisher, so they are averaged.

    Returns the merged state dict: merged floating tensors (in their original dtype, tied
    aliases included) and non-floating buffers taken from the first expert (the module's if
    it lacks them); no head tensors. Raises LearnError if an expert lacks a tensor, has a
    different shape, or has no task. Costs one forward and one backward pass per example
    per expert (per-example gradients are needed for the squares), and memory for two
    float32 accumulators the size of the merged tensors plus one expert.
    """
    if examples < 1:
        raise LearnError("examples must be at least 1", fix="use examples >= 1")
    if floor < 0:
        raise LearnError("floor must not be negative", fix="use floor >= 0 (default 1e-6)")
    if labels == "exact" and any(task.kind != "classification" for task in tasks):
        raise LearnError("the exact Fisher sums over the classes: classification tasks only",
                         fix="use labels='sampled' for language models")
    names, pairs, aliases = _prepare(module, experts, tasks, head_prefix, heads)
    w = _weights(weights, list(experts))
    generator = torch.Generator().manual_seed(seed)
    counter = _Counter(pairs, examples, 1, progress)
    numerator: dict[str, torch.Tensor] = {}
    denominator: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}  # sum_i w_i theta_i, kept only when floor == 0
    total = sum(w[name] for name, _task, _head in pairs)
    with _eval_mode(module):
        for expert_name, task, head in pairs:
            state = dict(experts[expert_name])
            fisher = _diagonal_fisher(module, state, head, names, task, counter,
                                      generator, exact=labels == "exact")
            if normalize:
                fisher = _unit_norm(fisher)
            for name in names:
                weighted = w[expert_name] * (fisher[name] + floor)
                term = weighted * wide_float(state[name]).to(weighted.device)
                if name in numerator:
                    numerator[name] += term
                    denominator[name] += weighted
                else:
                    numerator[name], denominator[name] = term, weighted
                if floor == 0:
                    value = w[expert_name] * wide_float(state[name]).to(weighted.device)
                    plain[name] = plain[name] + value if name in plain else value
            del state, fisher
    first = experts[pairs[0][0]]
    merged = {}
    for name in names:
        value = numerator[name] / denominator[name]
        if floor == 0:  # entries every Fisher leaves at zero: the weighted average
            value = torch.where(denominator[name] > 0, value, plain[name] / total)
        merged[name] = value.to(first[name].dtype)
    return _finish(module, experts, pairs[0][0], merged, names, aliases, head_prefix)


def regmean_merge(
    module: nn.Module,
    experts: Mapping[str, State],
    tasks: Sequence[Task],
    *,
    head_prefix: str | None = None,
    heads: Mapping[str, Head] | None = None,
    alpha: float = 0.9,
    examples: int = DEFAULT_EXAMPLES,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """RegMean: per linear layer, the weight closest to every expert on its own inputs.

    For every ``nn.Linear`` of the module (outside ``head_prefix``), forward hooks collect
    each expert's input Gram matrix ``G_i = X_i^T X_i`` over the first ``examples`` inputs
    of its task (``X_i``: the layer's inputs, all positions flattened; positions the
    ``attention_mask`` input marks as padding are left out). Off-diagonals are shrunk,
    ``G~_i = alpha G_i + (1 - alpha) diag(G_i)``, and the merged weight is::

        W^T = (sum_i G~_i)^{-1} sum_i G~_i W_i^T        (torch.linalg.solve, float64)

    ``alpha = 0`` gives the per-input-feature average weighted by each expert's feature
    energy; ``alpha = 1`` the exact least-squares merge (singular when there are fewer
    inputs than features: ``alpha < 1`` keeps the system invertible). An input feature no
    expert ever activates gets the plain average of its weight column; a system that is
    still singular is solved in the least-squares sense. Every other merged tensor (biases,
    norms, embeddings) is the plain average.

    Returns the merged state dict as :func:`fisher_merge` does. Raises LearnError for
    ``alpha`` outside [0, 1] or unfit experts. Costs one no-grad forward pass per example
    per expert and ``in_features^2`` float64 per linear layer and expert (the sums are
    kept, the per-expert Grams are not: memory is two Grams per layer), plus float32 sums
    of every merged tensor and ``in x out`` float64 per linear layer.
    """
    if not 0.0 <= alpha <= 1.0:
        raise LearnError(f"alpha must lie in [0, 1], got {alpha}", fix="use 0 <= alpha <= 1")
    if examples < 1:
        raise LearnError("examples must be at least 1", fix="use examples >= 1")
    names, pairs, aliases = _prepare(module, experts, tasks, head_prefix, heads)
    linears = _linear_weights(module, names, aliases)
    counter = _Counter(pairs, examples, BATCH, progress)
    gram_sum: dict[str, torch.Tensor] = {}
    rhs_sum: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    with _eval_mode(module):
        for expert_name, task, head in pairs:
            state = dict(experts[expert_name])
            grams = _input_grams(module, state, head, linears, task, counter)
            for weight_name, gram in grams.items():
                shrunk = _shrink_(gram, alpha)
                weight_t = state[weight_name].to(torch.float64).T.to(shrunk.device)
                if weight_name in gram_sum:
                    gram_sum[weight_name] += shrunk
                    rhs_sum[weight_name] += shrunk @ weight_t
                else:
                    gram_sum[weight_name], rhs_sum[weight_name] = shrunk, shrunk @ weight_t
            for name in names:  # float32 sums: the experts' tensors are never written
                if name in sums:
                    sums[name].add_(state[name].to(sums[name]))
                else:
                    sums[name] = wide_float(state[name]).clone()
            del state, grams
    count = len(pairs)
    merged: dict[str, torch.Tensor] = {}
    for name in names:
        dtype = experts[pairs[0][0]][name].dtype
        mean = sums[name] / count
        if name in gram_sum:
            merged[name] = _solve(gram_sum[name], rhs_sum[name], mean.T.double()).T.to(dtype)
        else:
            merged[name] = mean.to(dtype)
    return _finish(module, experts, pairs[0][0], merged, names, aliases, head_prefix)


# -- shared ------------------------------------------------------------------------------
Pairing = tuple[str, Task, Head | None]


def _prepare(
    module: nn.Module, experts: Mapping[str, State], tasks: Sequence[Task],
    head_prefix: str | None, heads: Mapping[str, Head] | None,
) -> tuple[list[str], list[Pairing], dict[str, str]]:
    """Check the experts; returns (merged names, (expert, task, head) triples, tied aliases).

    With ``head_prefix`` the head is None (the expert's own tensors hold it); with
    ``heads`` every task must have one.
    """
    if not experts:
        raise LearnError("no experts to merge", fix="give at least one expert")
    names, heads = prepare_experts(module, module.state_dict(), experts, head_prefix, heads)
    pairs = _pair(experts, tasks)
    aliases = module_tensors(module)[1]
    if head_prefix or not heads:
        return names, [(e, t, None) for e, t in pairs], aliases
    headless = [task.name for _e, task in pairs if task.name not in heads]
    if headless:
        raise LearnError(f"no head for task(s) {', '.join(map(repr, headless))}",
                         fix=f"give every task a head; heads given: {', '.join(heads)}")
    return names, [(e, t, heads[t.name]) for e, t in pairs], aliases


def _pair(experts: Mapping[str, State], tasks: Sequence[Task]) -> list[tuple[str, Task]]:
    """Match each expert with its task: by name, else by position."""
    by_name = {task.name: task for task in tasks}
    if all(name in by_name for name in experts):
        return [(name, by_name[name]) for name in experts]
    if len(tasks) != len(experts):
        missing = [name for name in experts if name not in by_name]
        raise LearnError(
            f"expert(s) {', '.join(map(repr, missing))} have no task: {len(experts)} "
            f"expert(s), {len(tasks)} task(s)",
            fix="name each task like its expert, or give one task per expert in order",
        )
    return list(zip(experts, tasks, strict=True))


def _weights(weights: Weights | None, names: list[str]) -> dict[str, float]:
    if weights is None:
        return dict.fromkeys(names, 1.0)
    if isinstance(weights, Mapping):
        missing = [n for n in names if n not in weights]
        if missing:
            raise LearnError(f"no weight for expert(s) {', '.join(map(repr, missing))}",
                             fix="give a weight per expert, by name")
        values = {n: float(weights[n]) for n in names}
    else:
        if len(weights) != len(names):
            raise LearnError(f"{len(weights)} weight(s) for {len(names)} expert(s)",
                             fix="give one weight per expert")
        values = {n: float(v) for n, v in zip(names, weights, strict=True)}
    if any(not v > 0 for v in values.values()):
        raise LearnError("expert weights must be positive", fix="use weights > 0")
    return values


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Run with dropout off; restores the module's training flag."""
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


class _Counter:
    """Batches of each task's first ``examples`` inputs; reports examples done overall."""

    def __init__(self, pairs: Sequence[Pairing], examples: int, size: int,
                 progress: Progress | None) -> None:
        self.examples, self.size, self.progress = examples, size, progress
        self.total = sum(min(examples, len(task.data)) for _e, task, _h in pairs)
        self.done = 0

    def batches(self, data: TaskData) -> Iterator[TaskData]:
        """Yield the batches of ``data``; counts each once it has been processed."""
        count = min(self.examples, len(data))
        for start in range(0, count, self.size):
            batch = data.select(torch.arange(start, min(start + self.size, count)))
            yield batch
            self.done += len(batch)
            if self.progress is not None:
                self.progress(self.done, self.total)


def _run(module: nn.Module, state: dict[str, torch.Tensor], head: Head | None,
         batch: TaskData) -> torch.Tensor:
    args, kwargs = batch.call_args()
    return logits_of(run_with_head(module, state, head, args, kwargs))


def _attention_mask(batch: TaskData) -> torch.Tensor | None:
    """The batch's ``attention_mask`` input as booleans (None without one)."""
    mask = batch.inputs.get("attention_mask") if isinstance(batch.inputs, dict) else None
    return None if mask is None else mask.bool()


def _finish(
    module: nn.Module, experts: Mapping[str, State], first: str,
    merged: dict[str, torch.Tensor], names: list[str], aliases: dict[str, str],
    head_prefix: str | None,
) -> dict[str, torch.Tensor]:
    """Add non-floating buffers (first expert's, else the module's) and tied aliases."""
    result: dict[str, torch.Tensor] = {}
    known = set(names)
    for name, tensor in module.state_dict().items():
        if head_prefix and name.startswith(head_prefix):
            continue
        if name in known:
            result[name] = merged[name]
        elif aliases.get(name) in known:
            result[name] = merged[aliases[name]]
        elif not tensor.is_floating_point():
            source = experts[first]
            result[name] = source.get(name, tensor).detach().clone()
    return result


# -- Fisher ------------------------------------------------------------------------------
def _unit_norm(fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Fisher divided by its L2 norm over every tensor (an all-zero one unchanged)."""
    norm = math.sqrt(sum(float(f.double().square().sum()) for f in fisher.values()))
    return fisher if norm == 0 else {name: f / norm for name, f in fisher.items()}


def _diagonal_fisher(
    module: nn.Module, state: dict[str, torch.Tensor], head: Head | None, names: list[str],
    task: Task, counter: _Counter, generator: torch.Generator, *, exact: bool = False,
) -> dict[str, torch.Tensor]:
    """Mean over examples of the squared gradient of log p(y | x), per tensor: for y sampled
    from the model, or (``exact``) weighted by p(y | x) over every class."""
    learnable = {n for n, _p in module.named_parameters()}
    params = {
        n: wide_float(state[n]).detach().requires_grad_(True) for n in names if n in learnable
    }
    call = {**state, **params}
    fisher = {n: torch.zeros_like(wide_float(state[n])) for n in names}
    count = 0
    for example in counter.batches(task.data):
        logits = _run(module, call, head, example)
        if exact:
            log_p = F.log_softmax(wide_float(logits), dim=-1)[0]
            terms = list(zip(log_p.detach().exp().tolist(), log_p, strict=True))
        else:
            terms = [(1.0, _sampled_log_likelihood(logits, example, task, generator))]
        for index, (weight, term) in enumerate(terms):
            if not term.requires_grad:
                continue
            grads = torch.autograd.grad(term, list(params.values()), allow_unused=True,
                                        retain_graph=index < len(terms) - 1)
            for name, grad in zip(params, grads, strict=True):
                if grad is not None:
                    fisher[name].add_(grad.detach().square(), alpha=weight)
        count += 1
    if count == 0:
        raise LearnError(f"task {task.name!r} has no examples", file=task.data.source,
                         fix="give each task some unlabelled inputs")
    return {n: f / count for n, f in fisher.items()}


def _sampled_log_likelihood(
    logits: torch.Tensor, example: TaskData, task: Task, generator: torch.Generator,
) -> torch.Tensor:
    """Sum of log p(y | x) with y sampled from the model's own prediction (scalar)."""
    logits = wide_float(logits)
    if task.kind == "causal_lm":
        logits = logits[:, :-1]
        mask = _attention_mask(example)
        if example.labels is not None:
            logits = logits[example.labels[:, 1:] != IGNORE_INDEX]
        elif mask is not None:
            logits = logits[mask[:, 1:]]
        logits = logits.reshape(-1, logits.shape[-1])
    log_p = F.log_softmax(logits, dim=-1)
    if log_p.numel() == 0:
        return log_p.sum()
    probs = log_p.detach().exp().cpu().double()
    sampled = torch.multinomial(probs, 1, generator=generator).to(log_p.device)
    return log_p.gather(-1, sampled).sum()


# -- RegMean -----------------------------------------------------------------------------
def _linear_weights(
    module: nn.Module, names: list[str], aliases: dict[str, str],
) -> dict[str, nn.Linear]:
    """Merged weight name (primary) -> its nn.Linear, for the linears that are merged."""
    known = set(names)
    linears: dict[str, nn.Linear] = {}
    for path, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            name = f"{path}.weight" if path else "weight"
            name = aliases.get(name, name)
            if name in known and name not in linears:
                linears[name] = sub
    return linears


def _input_grams(
    module: nn.Module, state: dict[str, torch.Tensor], head: Head | None,
    linears: dict[str, nn.Linear], task: Task, counter: _Counter,
) -> dict[str, torch.Tensor]:
    """X^T X (float64) of every linear's inputs over the task's first examples.

    Inputs laid out like the batch's attention mask (``[batch, positions, features]``)
    keep only the real positions.
    """
    grams: dict[str, torch.Tensor] = {}
    mask: torch.Tensor | None = None

    def hook_for(name: str):  # noqa: ANN202 - a forward pre-hook
        def hook(_layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach()
            if mask is not None and x.shape[:-1] == mask.shape:
                x = x[mask]
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            gram = x.T @ x
            grams[name] = grams[name] + gram if name in grams else gram
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(n)) for n, layer in linears.items()]
    seen = 0
    try:
        with torch.no_grad():
            for batch in counter.batches(task.data):
                mask = _attention_mask(batch)
                _run(module, state, head, batch)
                seen += len(batch)
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise LearnError(f"task {task.name!r} has no examples", file=task.data.source,
                         fix="give each task some unlabelled inputs")
    for name, layer in linears.items():  # a linear the forward never reached
        if name not in grams:
            grams[name] = torch.zeros(layer.in_features, layer.in_features,
                                      dtype=torch.float64)
    return grams


def _shrink_(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """Return ``alpha G + (1 - alpha) diag(G)`` in ``gram``'s own memory: the off-diagonal
    scaled by ``alpha``, the diagonal kept."""
    diagonal = gram.diagonal().clone()
    gram.mul_(alpha).diagonal().copy_(diagonal)
    return gram


def _solve(gram: torch.Tensor, rhs: torch.Tensor, mean_t: torch.Tensor) -> torch.Tensor:
    """Solve ``gram @ X = rhs`` for X (``[in, out]``); unseen features take ``mean_t``."""
    unseen = torch.diagonal(gram) <= 0
    if bool(unseen.any()):  # a zero diagonal means a zero row/column (G is PSD)
        gram = gram + torch.diag(unseen.to(gram.dtype))
        rhs = torch.where(unseen[:, None], mean_t.to(rhs.device), rhs)
    solution, info = torch.linalg.solve_ex(gram, rhs)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        solution = torch.linalg.lstsq(gram, rhs).solution
    return solution
