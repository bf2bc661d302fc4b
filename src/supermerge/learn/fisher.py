"""Fisher merging (Matena & Raffel 2022, *Merging Models with Fisher-Weighted Averaging*,
arXiv 2111.09832): the element-wise ``sum_i w_i F_i theta_i / sum_i w_i F_i`` with ``F_i``
the diagonal Fisher of expert ``i`` on its own task's inputs (labels sampled from the
model, or its exact expectation over the classes). See :mod:`supermerge.learn.statistics`
for how experts, tasks and heads are matched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from supermerge.learn.data import IGNORE_INDEX, Task, TaskData
from supermerge.learn.errors import LearnError
from supermerge.learn.method import LearnedMethod, closed_form_run, register
from supermerge.learn.model import Head, eval_mode, wide_float
from supermerge.learn.params import FisherModelParams, FisherParams
from supermerge.learn.statistics import (
    DEFAULT_EXAMPLES,
    ExampleCounter,
    State,
    Weights,
    attention_mask_of,
    expert_weights,
    finish_state,
    prepare_pairs,
    run_logits,
)
from supermerge.progress import Progress


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
    if floor < 0:
        raise LearnError("floor must not be negative", fix="use floor >= 0 (default 1e-6)")
    if labels == "exact" and any(task.kind != "classification" for task in tasks):
        raise LearnError("the exact Fisher sums over the classes: classification tasks only",
                         fix="use labels='sampled' for language models")
    names, pairs, aliases = prepare_pairs(module, experts, tasks, head_prefix, heads)
    w = expert_weights(weights, list(experts))
    generator = torch.Generator().manual_seed(seed)
    counter = ExampleCounter(pairs, examples, 1, progress)
    numerator: dict[str, torch.Tensor] = {}
    denominator: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}  # sum_i w_i theta_i, kept only when floor == 0
    dtypes: dict[str, torch.dtype] = {}  # the first expert's, for the result
    total = sum(w[name] for name, _task, _head in pairs)
    with eval_mode(module):
        for expert_name, task, head in pairs:
            state = dict(experts[expert_name])
            fisher = _diagonal_fisher(module, state, head, names, task, counter,
                                      generator, exact=labels == "exact")
            if normalize:
                fisher = _unit_norm(fisher)
            for name in names:
                dtypes.setdefault(name, state[name].dtype)
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
    merged = {}
    for name in names:
        value = numerator[name] / denominator[name]
        if floor == 0:  # entries every Fisher leaves at zero: the weighted average
            value = torch.where(denominator[name] > 0, value, plain[name] / total)
        merged[name] = value.to(dtypes[name])
    return finish_state(module, experts, pairs[0][0], merged, names, aliases, head_prefix)


def _unit_norm(fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Fisher divided by its L2 norm over every tensor (an all-zero one unchanged)."""
    norm = math.sqrt(sum(float(f.double().square().sum()) for f in fisher.values()))
    return fisher if norm == 0 else {name: f / norm for name, f in fisher.items()}


def _diagonal_fisher(
    module: nn.Module, state: dict[str, torch.Tensor], head: Head | None, names: list[str],
    task: Task, counter: ExampleCounter, generator: torch.Generator, *, exact: bool = False,
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
    for example in counter.batches(task):
        logits = run_logits(module, call, head, example)
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
    return {n: f / count for n, f in fisher.items()}


def _sampled_log_likelihood(
    logits: torch.Tensor, example: TaskData, task: Task, generator: torch.Generator,
) -> torch.Tensor:
    """Sum of log p(y | x) with y sampled from the model's own prediction (scalar)."""
    logits = wide_float(logits)
    if task.kind == "causal_lm":
        logits = logits[:, :-1]
        mask = attention_mask_of(example)
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


FISHER = register(LearnedMethod(
    name="fisher",
    summary="average weighted element-wise by each expert's diagonal Fisher on unlabelled data",
    paper="Matena, Raffel 2022, Merging Models with Fisher-Weighted Averaging "
    "(arXiv 2111.09832)",
    needs="unlabelled",
    params=FisherParams,
    run=closed_form_run("fisher", fisher_merge, FisherParams),
    trains=False,
    model_params=FisherModelParams,
    needs_base=False,
))
