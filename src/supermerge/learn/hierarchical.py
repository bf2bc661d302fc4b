"""The merge tree: flat or hierarchical learned merging with measured peak memory.

Flat: one node learns W over all K experts (K task vectors resident). Hierarchical (fan-in
g < K): experts are grouped by agglomerative clustering on the cosine similarity of their
task vectors, at most g per group; each group is learned on the validation data of the
tasks below it, and its merged weights become a new expert one level up (written to a
temporary safetensors file and read back lazily), until one root remains. A node holds the
base, its g children's task vectors and one merged copy, so the resident weight sets per
level are about g + 2 instead of K + 2. Experts given as lazy mappings (e.g.
:class:`~supermerge.learn.model.CheckpointState`) keep that bound; in-memory dicts are
resident anyway. Each task must be named like the expert fine-tuned on it.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from supermerge.io import open_checkpoint
from supermerge.learn.data import Task
from supermerge.learn.distill import attach_teachers
from supermerge.learn.errors import LearnError
from supermerge.learn.layerwise import learn_layerwise
from supermerge.learn.memory import PeakRSS
from supermerge.learn.model import (
    CheckpointState,
    Head,
    MergedModel,
    TaskVectors,
    check_task_experts,
    prepare_experts,
    wide_float,
)
from supermerge.learn.objectives import as_objective
from supermerge.learn.train import LearnResult, learn_coefficients
from supermerge.progress import Progress

log = logging.getLogger(__name__)

State = Mapping[str, torch.Tensor]


@dataclass
class MergeNode:
    """One node of the merge tree. Leaves are the experts; internal nodes hold their fit.

    ``peak_rss`` is the measured RSS rise (bytes) while the node was built and learned.
    """

    name: str
    tasks: list[str]
    children: list[MergeNode] = field(default_factory=list)
    fit: LearnResult | None = None
    level: int = 0
    peak_rss: int = 0

    def internal_nodes(self) -> Iterator[MergeNode]:
        """The learned nodes below and including this one, children before parents."""
        for child in self.children:
            yield from child.internal_nodes()
        if self.children:
            yield self

    def render(self, indent: str = "") -> str:
        """Return the tree as indented text, one node per line."""
        label = self.name if not self.children else (
            f"{self.name} (level {self.level}, peak RSS {self.peak_rss / 2**20:.1f} MiB)"
        )
        lines = [indent + label]
        lines += [child.render(indent + "  ") for child in self.children]
        return "\n".join(lines)


@dataclass
class LearnedMerge:
    """The result of a learned merge: the root model (best W loaded), the tree, the memory.

    ``peak_rss`` is the measured RSS rise (bytes) over the whole merge.
    """

    model: MergedModel
    tree: MergeNode
    peak_rss: int
    selection: dict[str, float] = field(default_factory=dict)
    """Each configuration fitted and its held-out prediction loss, when several were (the
    kept one has the lowest; see :func:`~supermerge.learn.merge.supermerge`)."""
    chosen: str | None = None

    @property
    def fits(self) -> dict[str, LearnResult]:
        """Each learned node's fit, by node name (one entry, ``root``, for a flat merge)."""
        return {node.name: node.fit for node in self.tree.internal_nodes() if node.fit}

    def level_peaks(self) -> dict[int, int]:
        """Largest measured node peak RSS (bytes) per tree level."""
        peaks: dict[int, int] = {}
        for node in self.tree.internal_nodes():
            peaks[node.level] = max(peaks.get(node.level, 0), node.peak_rss)
        return peaks


def cosine_similarities(
    base_state: State,
    experts: Sequence[State],
    names: Sequence[str],
    *,
    sample: int = 2**16,
    seed: int = 0,
) -> torch.Tensor:
    """Return the K x K cosine similarities of the experts' task vectors over ``names``.

    Exact for models of at most ``sample`` entries; larger ones are compared on a seeded
    uniform sample of about ``sample`` coordinates (the same for every expert; the
    estimates err by about 1/sqrt(sample)), so the pass holds one tensor plus K samples.
    Costs one read of every expert tensor.
    """
    sizes = [base_state[n].numel() for n in names]
    total = sum(sizes)
    generator = torch.Generator().manual_seed(seed)
    takes = [
        None if total <= sample
        else torch.randint(size, (max(1, round(size * sample / total)),), generator=generator)
        for size in sizes
    ]
    widths = [size if take is None else len(take) for size, take in zip(sizes, takes, strict=True)]
    vectors = torch.empty(len(experts), sum(widths))
    offset = 0
    for name, take, width in zip(names, takes, widths, strict=True):
        base = wide_float(base_state[name]).reshape(-1)
        base = base if take is None else base[take]
        for row, expert in zip(vectors, experts, strict=True):
            values = wide_float(expert[name]).reshape(-1)
            row[offset:offset + width] = (values if take is None else values[take]) - base
        offset += width
    gram = (vectors @ vectors.T).double()
    norms = gram.diagonal().sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    return gram / torch.outer(norms, norms)


def cluster_experts(similarity: torch.Tensor, fan_in: int) -> list[list[int]]:
    """Group K items by average-linkage agglomerative clustering, at most ``fan_in`` each.

    Repeatedly joins the two most similar groups whose sizes sum to at most ``fan_in``
    (ties: lowest indices first). Returns the groups (sorted indices) ordered by their
    first member. Costs O(K^3) similarity lookups.
    """
    clusters = [[i] for i in range(len(similarity))]
    while True:
        pairs = [
            (similarity[a][:, b].mean().item(), -i, -j)
            for (i, a), (j, b) in combinations(enumerate(clusters), 2)
            if len(a) + len(b) <= fan_in
        ]
        if not pairs:
            return clusters
        best = max(pairs)  # most similar; on ties the lowest indices (stored negated)
        i, j = -best[1], -best[2]
        clusters[i] = sorted(clusters[i] + clusters[j])
        del clusters[j]


MERGED_CHILD_INIT = 0.9
"""Starting coefficient of a child that is itself a learned merge: its task vector already
carries its subtree's coefficients, so an upper node starts near their sum (tanh cannot
reach 1) instead of shrinking them again by ``init`` at every level."""


def merge_tree(
    module: nn.Module,
    base_state: State,
    experts: Mapping[str, State],
    tasks: Sequence[Task],
    *,
    fan_in: int | None = None,
    head_prefix: str | None = None,
    heads: Mapping[str, Head] | None = None,
    model_options: Mapping[str, Any] | None = None,
    fit_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    workdir: str | Path | None = None,
) -> LearnedMerge:
    """Learn a merge of ``experts`` flat (``fan_in`` None or >= K) or hierarchically.

    ``model_options`` go to :class:`MergedModel`, ``fit_options`` to
    :func:`learn_coefficients`. ``progress`` gets (steps done, steps planned so far, loss);
    the plan grows as levels are clustered. Intermediate merges are written under
    ``workdir`` (default: the system's temporary directory) and removed at the end. A
    distilling objective learns every node from the original experts' outputs, computed
    once up front. Raises LearnError before any training if experts, heads or tasks do not
    fit.
    """
    names, all_heads = prepare_experts(module, base_state, experts, head_prefix, heads)
    flat = fan_in is None or fan_in >= len(experts)
    if not flat:
        _check_owners(experts, tasks)
    fit_options = dict(fit_options or {})
    fit = learn_layerwise if fit_options.pop("layerwise", False) else learn_coefficients
    objective = fit_options["objective"] = as_objective(fit_options.get("objective", "labels"))
    if objective.needs_teacher and any(t.data.teacher is None for t in tasks):
        tasks = attach_teachers(module, experts, names, all_heads, tasks,
                                hidden=objective.needs_hidden)
    task_names = {t.name for t in tasks}
    nodes = [MergeNode(name, [name] if name in task_names else []) for name in experts]
    sources: dict[str, State] = dict(experts)
    counter = _StepCounter(progress)

    def learn(group: list[MergeNode], name: str, level: int) -> tuple[MergeNode, MergedModel]:
        below = {t for child in group for t in child.tasks}
        node_tasks = list(tasks) if flat else [t for t in tasks if t.name in below]
        options = dict(model_options or {})
        if any(c.children for c in group):
            start = options.get("init", 0.3)
            options["init"] = [MERGED_CHILD_INIT if c.children else start for c in group]
        with PeakRSS() as rss:
            model = MergedModel(
                module,
                base_state,
                [TaskVectors(base_state, sources[c.name], names) for c in group],
                expert_names=[c.name for c in group],
                heads={t.name: all_heads[t.name] for t in node_tasks if t.name in all_heads},
                workdir=workdir,
                **options,
            )
            result = fit(model, node_tasks, progress=counter.callback(), **fit_options)
        log.info("learned node %s over %s", name, ", ".join(c.name for c in group))
        node = MergeNode(name, [t.name for t in node_tasks], group, result, level, rss.peak)
        return node, model

    with PeakRSS() as total, ExitStack() as stack:
        spill = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=workdir)))
        level = 0
        while True:
            level += 1
            if flat or len(nodes) <= fan_in:
                groups = [list(range(len(nodes)))]
            else:
                similarity = cosine_similarities(
                    base_state, [sources[n.name] for n in nodes], names
                )
                groups = cluster_experts(similarity, fan_in)
            counter.plan(sum(len(g) > 1 for g in groups))
            if len(groups) == 1:
                root, model = learn([nodes[i] for i in groups[0]], "root", level)
                break
            next_nodes = []
            for index, group in enumerate(groups):
                if len(group) == 1:
                    next_nodes.append(nodes[group[0]])
                    continue
                node, model = learn([nodes[i] for i in group], f"level{level}.{index}", level)
                path = spill / f"{node.name}.safetensors"
                with torch.no_grad():
                    save_file(model.merged_parameters(), path)
                sources[node.name] = CheckpointState(stack.enter_context(open_checkpoint(path)))
                del model  # free its task vectors before the next node stacks its own
                next_nodes.append(node)
            nodes = next_nodes
    return LearnedMerge(model, root, total.peak)


def _check_owners(experts: Mapping[str, State], tasks: Sequence[Task]) -> None:
    check_task_experts(
        experts, tasks, "hierarchical merging learns each node on the tasks of the experts "
        "below it", fix="name each task like the expert fine-tuned on it")
    idle = [name for name in experts if name not in {t.name for t in tasks}]
    if idle:
        raise LearnError(
            f"expert(s) {idle} have no task: hierarchical merging needs validation data for "
            "every expert",
            fix="give each expert a task of its name, or merge flat",
        )


class _StepCounter:
    """Turns per-node progress into the whole tree's: steps done of the steps planned so far."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.nodes = 0
        self.finished = 0

    def plan(self, nodes: int) -> None:
        self.nodes += nodes

    def callback(self) -> Progress | None:
        if self.progress is None:
            return None
        report = self.progress

        def node_progress(stage: str, step: int, steps: int, loss: float | None = None, /
                          ) -> None:
            report(stage, self.finished + step, self.nodes * steps, loss)
            if step == steps:
                self.finished += steps

        return node_progress
