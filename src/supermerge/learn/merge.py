"""The learned methods' Python API: ``supermerge`` and ``adamerging``.

Both take the module (its architecture, loaded with the base weights), the base state,
the experts by name (state dicts or lazy mappings such as ``CheckpointState``), the tasks
with their validation data, the head (``head_prefix`` or ``heads``) and the method's
parameters by their recipe names (see :mod:`supermerge.learn.params`). Both return a
:class:`~supermerge.learn.hierarchical.LearnedMerge`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from supermerge.learn.data import Task
from supermerge.learn.distill import attach_teachers, named_blocks
from supermerge.learn.hierarchical import LearnedMerge, State, merge_tree
from supermerge.learn.method import LearnedMethod, register, trained_run
from supermerge.learn.model import Head, TaskVectors, prepare_experts
from supermerge.learn.params import AdaMergingParams, SuperMergeParams
from supermerge.learn.train import (
    DataParallel,
    paired_bootstrap,
    prediction_loss,
    prediction_losses,
)
from supermerge.methods.primitives import (
    GlobalMagnitudeThreshold,
    elect_sign,
    magnitude_trim,
    threshold_trim_,
)
from supermerge.progress import Progress

log = logging.getLogger(__name__)

SURE = 0.95
"""How sure the held-out examples must be (the share of paired bootstrap resamples) that a
configuration beats the first one of :data:`~supermerge.learn.params.SELECTION` (TSV's
basis end to end, which starts from TSV-M) before it is kept instead: with 8 held-out
examples per task the lower loss alone picked the worse model on a mixed task set
(0.871 against 0.927, docs/supermerge.md)."""


def supermerge(
    module: nn.Module,
    base_state: State,
    experts: Mapping[str, State],
    tasks: Sequence[Task],
    *,
    head_prefix: str | None = None,
    heads: Mapping[str, Head] | None = None,
    progress: Progress | None = None,
    workdir: str | Path | None = None,
    parallel: DataParallel | None = None,
    **params: Any,
) -> LearnedMerge:
    """SuperMerge: W mapped by tanh, learned on the tasks' validation data.

    ``params`` are :class:`~supermerge.learn.params.SuperMergeParams` (``hierarchical``,
    ``fan_in``, ``steps``, ...); ``parallel`` shares each batch among torch.distributed
    ranks (see :mod:`supermerge.learn.distributed`). With ``select: auto`` (the default)
    each configuration the parameters leave open is fitted; the first is kept unless the one
    with the lowest held-out prediction loss (the objective without its block-state term,
    :func:`~supermerge.learn.train.prediction_loss`) is lower in at least :data:`SURE` of
    paired bootstrap resamples of the held-out examples; every configuration's loss is in
    ``selection``. Costs per configuration
    ``steps`` training steps over K task vectors (flat; per block with ``layerwise``), or
    per tree node over its ``fan_in`` children (hierarchical); the experts' outputs are
    computed once for all; two configurations' models are held at a time.
    """
    configurations = SUPERMERGE.validate(params).configurations()
    if parallel is not None or not named_blocks(module):
        # layerwise fitting runs in one process, on numbered blocks: among several
        # configurations it is left out (alone, it raises the error that says why)
        configurations = {k: c for k, c in configurations.items() if not c.layerwise} or \
            configurations
    if len(configurations) > 1 and any(c.fit_options()["objective"].needs_teacher
                                       for c in configurations.values()):
        names, all_heads = prepare_experts(module, base_state, experts, head_prefix, heads)
        tasks = attach_teachers(module, experts, names, all_heads, tasks)
    best: LearnedMerge | None = None
    selection: dict[str, float] = {}
    incumbent: list[torch.Tensor] | None = None  # the first configuration's per-example losses
    for index, (label, p) in enumerate(configurations.items()):
        if len(configurations) > 1:
            log.info("fitting configuration %d of %d: %s", index + 1, len(configurations), label)
        merge = merge_tree(
            module, base_state, experts, tasks,
            fan_in=p.fan_in if p.hierarchical else None,
            head_prefix=head_prefix, heads=heads,
            model_options={"coefficient_map": "tanh", **p.model_options()},
            fit_options={**p.fit_options(), "parallel": parallel},
            progress=_share(progress, index, len(configurations)), workdir=workdir,
        )
        merge.chosen = label
        if len(configurations) == 1:
            return merge
        objective = p.fit_options()["objective"]
        loss = prediction_loss(merge.model, tasks, objective, holdout=p.holdout, seed=p.seed)
        losses = prediction_losses(merge.model, tasks, objective, holdout=p.holdout,
                                   seed=p.seed)
        if best is None:
            best, incumbent = merge, losses
        elif loss < min(selection.values()):
            sure = paired_bootstrap(losses, incumbent, seed=p.seed)
            log.info("%s: held-out loss %.4f, lower than the first configuration's in %.1f %% "
                     "of resamples (%.0f %% needed)", label, loss, 100 * sure, 100 * SURE)
            if sure >= SURE:
                best = merge
        selection[label] = loss
        del merge  # a worse configuration's model is freed before the next is built
    assert best is not None
    if len(configurations) > 1:
        best.selection = selection
        log.info("kept %s: held-out loss %s", best.chosen,
                 ", ".join(f"{k} {v:.4f}" for k, v in selection.items()))
    return best


def _share(progress: Progress | None, index: int, parts: int) -> Progress | None:
    """Report one of ``parts`` runs' progress as its share of the whole (in thousandths
    per part), so the whole counts up once."""
    if progress is None or parts == 1:
        return progress
    return lambda stage, step, steps, loss=None: progress(
        stage, index * 1000 + step * 1000 // max(steps, 1), parts * 1000, loss)


def adamerging(
    module: nn.Module,
    base_state: State,
    experts: Mapping[str, State],
    tasks: Sequence[Task],
    *,
    head_prefix: str | None = None,
    heads: Mapping[str, Head] | None = None,
    progress: Progress | None = None,
    workdir: str | Path | None = None,
    parallel: DataParallel | None = None,
    **params: Any,
) -> LearnedMerge:
    """AdaMerging (AdaMerging++ with ``ties=True``): W clamped to [0, 1], entropy loss.

    Task-wise with ``granularity="task"``, layer-wise with ``"tensor"`` (default). The
    tasks' data needs no labels. ``params`` are
    :class:`~supermerge.learn.params.AdaMergingParams`. Costs ``steps`` training steps,
    plus two reads of every expert for AdaMerging++ with ``trim_scope="model"``.
    """
    p = ADAMERGING.validate(params)
    prepare = None
    if p.ties and p.trim_scope == "model":
        names, _ = prepare_experts(module, base_state, experts, head_prefix, heads)
        vectors = [TaskVectors(base_state, expert, names) for expert in experts.values()]
        prepare = partial(ties_prepare, thresholds=model_thresholds(vectors, p.density))
    elif p.ties:
        prepare = partial(ties_prepare, density=p.density)
    return merge_tree(
        module, base_state, experts, tasks,
        head_prefix=head_prefix, heads=heads,
        model_options={"coefficient_map": "clamp", "prepare": prepare, **p.model_options()},
        fit_options={**p.fit_options(), "parallel": parallel},
        progress=progress, workdir=workdir,
    )


def ties_prepare(
    stacked: torch.Tensor, density: float = 0.2, thresholds: Sequence[float] | None = None,
) -> torch.Tensor:
    """Return TIES-processed task vectors ``[K, *shape]`` of one tensor, for AdaMerging++.

    With ``density`` each expert's vector keeps its ``round(density * n)`` largest
    magnitudes (per tensor, mergekit's scope); with ``thresholds`` (one per expert, from
    :func:`model_thresholds`) the magnitudes at least its threshold instead (the paper's
    whole-model trim). Entries whose sign disagrees with the elected sign are then zeroed. Costs K
    trims and K + 1 temporaries.
    """
    if thresholds is None:
        trimmed = [magnitude_trim(vector, density) for vector in stacked]
    else:
        trimmed = [threshold_trim_(vector.clone(), threshold)
                   for vector, threshold in zip(stacked, thresholds, strict=True)]
    sign = elect_sign(trimmed)
    return torch.stack([torch.where(t.sign() == sign, t, 0.0) for t in trimmed])


def model_thresholds(vectors: Sequence[Mapping[str, torch.Tensor]], density: float
                     ) -> tuple[float, ...]:
    """Return, per expert, the magnitude of the ``round(density * n)``-th largest entry of
    its whole task vector (``n``: its entries over every tensor): the whole-model TIES trim
    keeps ``|tau| >= threshold``. Costs two reads of every task vector (exact, streaming:
    :class:`~supermerge.methods.primitives.GlobalMagnitudeThreshold`).
    """
    statistic = GlobalMagnitudeThreshold([density] * len(vectors))
    for pass_index in range(statistic.passes):
        for index, vector in enumerate(vectors):
            for name in vector:
                statistic.observe(pass_index, index, vector[name])
        statistic.finish_pass(pass_index)
    return statistic.result().thresholds


SUPERMERGE = register(LearnedMethod(
    name="supermerge",
    summary="learn a tanh coefficient per expert and tensor over TSV-M's decorrelated task "
    "vectors (or per row, block by block, over the task vectors: the held-out loss "
    "chooses), distilling each expert on its task's inputs (objective: labels reads labels)",
    paper="Yang, Zhang, Sathe 2024, SuperMerge: An Approach For Gradient-Based Model "
    "Merging (arXiv 2412.10416)",
    needs="unlabelled",
    params=SuperMergeParams,
    run=trained_run(supermerge),
    parallel=True,
))
ADAMERGING = register(LearnedMethod(
    name="adamerging",
    summary="learn coefficients in [0, 1] by minimising prediction entropy on unlabelled data",
    paper="Yang et al. 2024, AdaMerging: Adaptive Model Merging for Multi-Task Learning "
    "(arXiv 2310.02575)",
    needs="unlabelled",
    params=AdaMergingParams,
    run=trained_run(adamerging),
    parallel=True,
))
