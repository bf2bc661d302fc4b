"""RegMean (Jin et al. 2023, *Dataless Knowledge Fusion by Merging Weights of Language
Models*, arXiv 2212.09849): per ``nn.Linear``, the weight minimising the summed squared
distance of the merged layer's outputs to each expert's, on each expert's inputs:
``W^T = (sum_i G~_i)^{-1} sum_i G~_i W_i^T``; other tensors are averaged. See
:mod:`supermerge.learn.statistics` for how experts, tasks and heads are matched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from supermerge.learn.data import Task
from supermerge.learn.errors import LearnError
from supermerge.learn.method import LearnedMethod, closed_form_run, register
from supermerge.learn.model import Head, eval_mode, wide_float
from supermerge.learn.params import RegMeanParams
from supermerge.learn.statistics import (
    BATCH,
    DEFAULT_EXAMPLES,
    ExampleCounter,
    State,
    attention_mask_of,
    finish_state,
    prepare_pairs,
    run_logits,
)
from supermerge.progress import Progress


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
    names, pairs, aliases = prepare_pairs(module, experts, tasks, head_prefix, heads)
    linears = _linear_weights(module, names, aliases)
    counter = ExampleCounter(pairs, examples, BATCH, progress)
    gram_sum: dict[str, torch.Tensor] = {}
    rhs_sum: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}  # the first expert's, for the result
    with eval_mode(module):
        for expert_name, task, head in pairs:
            state = dict(experts[expert_name])
            grams = _input_grams(module, state, head, linears, task, counter)
            for weight_name, gram in grams.items():
                shrunk = _shrink_(gram, alpha)
                weight_t = state[weight_name].to(torch.float64).T.to(shrunk.device)
                rhs = shrunk @ weight_t
                _require_finite(shrunk, rhs, expert_name, weight_name)
                if weight_name in gram_sum:
                    gram_sum[weight_name] += shrunk
                    rhs_sum[weight_name] += rhs
                else:
                    gram_sum[weight_name], rhs_sum[weight_name] = shrunk, rhs
            for name in names:  # float32 sums: the experts' tensors are never written
                if name in sums:
                    sums[name].add_(state[name].to(sums[name]))
                else:
                    sums[name] = wide_float(state[name]).clone()
                    dtypes[name] = state[name].dtype
            del state, grams
    count = len(pairs)
    merged: dict[str, torch.Tensor] = {}
    for name in names:
        mean = sums[name] / count
        if name in gram_sum:
            merged[name] = _solve(name, gram_sum[name], rhs_sum[name],
                                  mean.T.double()).T.to(dtypes[name])
        else:
            merged[name] = mean.to(dtypes[name])
    return finish_state(module, experts, pairs[0][0], merged, names, aliases, head_prefix)


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
    linears: dict[str, nn.Linear], task: Task, counter: ExampleCounter,
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
    try:
        with torch.no_grad():
            for batch in counter.batches(task):
                mask = attention_mask_of(batch)
                run_logits(module, state, head, batch)
    finally:
        for handle in handles:
            handle.remove()
    for name, layer in linears.items():  # a linear the forward never reached
        if name not in grams:
            grams[name] = torch.zeros(layer.in_features, layer.in_features,
                                      dtype=torch.float64)
    return grams


def _require_finite(gram: torch.Tensor, rhs: torch.Tensor, expert: str | None,
                    weight_name: str) -> None:
    """Raise LearnError naming the expert (None: the sum over experts) and the layer when
    its Gram matrix, or the Gram times the layer's weight, holds Inf or NaN: no solver can
    merge from it (torch's least squares fails an internal assertion)."""
    if not bool(torch.isfinite(gram).all()):
        overflow = "the layer's inputs reach Inf or NaN"
    elif not bool(torch.isfinite(rhs).all()):
        overflow = "the layer's weight times its inputs' Gram matrix reaches Inf or NaN"
    else:
        return
    who = f"expert {expert!r}" if expert is not None else "the experts together"
    raise LearnError(
        f"RegMean cannot merge this layer: on {who}, {overflow} (weights so large that the "
        "activations overflow, or weights that are already Inf or NaN)",
        tensor=weight_name,
        fix=f"check {who} for huge or non-finite weights (`supermerge inspect`) and re-train "
        "or re-export it, or merge without it",
    )


def _shrink_(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """Return ``alpha G + (1 - alpha) diag(G)`` in ``gram``'s own memory: the off-diagonal
    scaled by ``alpha``, the diagonal kept."""
    diagonal = gram.diagonal().clone()
    gram.mul_(alpha).diagonal().copy_(diagonal)
    return gram


def _solve(name: str, gram: torch.Tensor, rhs: torch.Tensor,
           mean_t: torch.Tensor) -> torch.Tensor:
    """Solve ``gram @ X = rhs`` for X (``[in, out]``); unseen features take ``mean_t``.

    Raises LearnError naming ``name`` when the summed system overflowed to Inf or NaN."""
    _require_finite(gram, rhs, None, name)
    unseen = torch.diagonal(gram) <= 0
    if bool(unseen.any()):  # a zero diagonal means a zero row/column (G is PSD)
        gram = gram + torch.diag(unseen.to(gram.dtype))
        rhs = torch.where(unseen[:, None], mean_t.to(rhs.device), rhs)
    solution, info = torch.linalg.solve_ex(gram, rhs)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        solution = torch.linalg.lstsq(gram, rhs).solution
    return solution


REGMEAN = register(LearnedMethod(
    name="regmean",
    summary="per linear layer, closed-form merge from each expert's input Gram matrix",
    paper="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language "
    "Models (arXiv 2212.09849)",
    needs="unlabelled",
    params=RegMeanParams,
    run=closed_form_run("regmean", regmean_merge, RegMeanParams),
    trains=False,
    needs_base=False,
))
