"""MergedModel: merged weights as a differentiable function of learned coefficients.

For every merged tensor ``p`` in merge group ``j``::

    merged[p] = base[p] + sum_i map(W[i, j]) * tau[i][p],    tau[i] = expert_i - base

``W`` (K experts x J groups) is the only trainable parameter. The wrapped module is run
with ``torch.func.functional_call`` on the merged tensors, so gradients flow into ``W``
alone; the base, the task vectors and the module's own parameters stay frozen.

Memory (``memory="in_memory"``): the base (shared with the module when ``base_state`` is
``module.state_dict()``), the K task vectors stacked per tensor (in ``vector_dtype``;
bfloat16 halves them) and, for each forward pass, one merged copy computed tensor by
tensor. No per-expert merged copy is ever materialised. ``memory="stream"`` keeps the
task vectors in a file and builds each transformer block's merged weights when the block
runs (:mod:`supermerge.learn.stream`): the base, one block's merged weights, one task
vector, the tensors outside the blocks merged, and the blocks' boundary activations.

Heads: a task may have its own head, never merged. Either a mapping of parameter
overrides (e.g. the ``classifier.*`` tensors of that task's expert, swapped into the module
for that task) or an ``nn.Module`` applied to the module's output.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from supermerge.io import Checkpoint
from supermerge.learn.errors import LearnError
from supermerge.learn.groups import Granularity, assign_groups
from supermerge.learn.stream import SpilledVectors, named_blocks, streamed_blocks

log = logging.getLogger(__name__)

CoefficientMap = Literal["tanh", "clamp", "identity"]
Head = Mapping[str, torch.Tensor] | nn.Module
Prepare = Callable[[torch.Tensor], torch.Tensor]
Memory = Literal["in_memory", "stream"]

# map name -> (map applied to W, inverse used to initialise W from a mapped value)
_MAPS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[float], float]]] = {
    "tanh": (torch.tanh, math.atanh),
    "clamp": (lambda w: w.clamp(0.0, 1.0), float),
    "identity": (lambda w: w, float),
}


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run with dropout off; restores every submodule's training flag as it was."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training


def _start(coefficient_map: str, init: float) -> float:
    """Return the raw W whose mapped value is ``init``; LearnError outside the map's range."""
    forward, inverse = _MAPS[coefficient_map]
    try:
        start = inverse(init)
    except ValueError:  # atanh outside (-1, 1)
        start = math.nan
    if not math.isclose(float(forward(torch.tensor(start, dtype=torch.float64))), init):
        raise LearnError(
            f"init {init} is outside the range of the {coefficient_map!r} map",
            fix="tanh takes -1 < init < 1, clamp 0 <= init <= 1",
        )
    return start


def wide_float(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 if it already is."""
    return t if t.dtype == torch.float64 else t.float()


def _preview(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(list(names)[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


class CheckpointState(Mapping[str, torch.Tensor]):
    """A :class:`supermerge.io.Checkpoint` as a lazy mapping: each lookup reads one tensor."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.checkpoint:
            raise KeyError(name)
        return self.checkpoint.read(name)

    def __contains__(self, name: object) -> bool:
        return name in self.checkpoint

    def __iter__(self) -> Iterator[str]:
        return iter(self.checkpoint.names())

    def __len__(self) -> int:
        return len(self.checkpoint.names())


class TaskVectors(Mapping[str, torch.Tensor]):
    """Lazy ``expert - base`` over ``names``; each lookup reads one tensor of each side.

    ``expert`` may itself be lazy (a checkpoint view): then only one tensor is resident
    per lookup. Values are float32 (float64 if the inputs are).
    """

    def __init__(
        self,
        base: Mapping[str, torch.Tensor],
        expert: Mapping[str, torch.Tensor],
        names: Sequence[str],
    ) -> None:
        self._base, self._expert, self._names = base, expert, list(names)
        self._known = set(self._names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        return wide_float(self._expert[name]) - wide_float(self._base[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def module_tensors(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return (primary name -> tensor in state-dict order, tied alias -> primary name)."""
    primary: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    named = chain(
        module.named_parameters(remove_duplicate=False),
        module.named_buffers(remove_duplicate=False),
    )
    for name, tensor in named:
        if id(tensor) in primary:
            aliases[name] = primary[id(tensor)]
        else:
            primary[id(tensor)] = name
            tensors[name] = tensor
    order = {name: i for i, name in enumerate(module.state_dict(keep_vars=True))}
    ordered = sorted(tensors, key=lambda n: order.get(n, len(order)))
    return {n: tensors[n] for n in ordered}, aliases


def _shape(state: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """A tensor's shape, from the header alone for a checkpoint."""
    if isinstance(state, CheckpointState):
        return state.checkpoint.info(name).shape
    return tuple(state[name].shape)


def prepare_experts(
    module: nn.Module,
    base_state: Mapping[str, torch.Tensor],
    experts: Mapping[str, Mapping[str, torch.Tensor]],
    head_prefix: str | None = None,
    heads: Mapping[str, Head] | None = None,
) -> tuple[list[str], dict[str, Head]]:
    """Check the experts against the module; returns (names to merge, heads by task).

    Merged: the module's floating tensors present in the base, outside ``head_prefix``
    (tied aliases merge through their primary name; integer buffers are never merged).
    With ``head_prefix`` each expert's tensors under it become the head of the task named
    like the expert (an expert without any may serve no task; a task without a head is
    refused when training starts); otherwise ``heads`` are used as given. Raises LearnError
    if an expert lacks a tensor, has tensors the base lacks, or a shape differs. Reads only
    the head tensors (shapes of checkpoints come from their headers).
    """
    if head_prefix and heads:
        raise LearnError("give head_prefix or heads, not both")
    reference = {
        n: t
        for n, t in module_tensors(module)[0].items()
        if t.is_floating_point() and n in base_state
        and not (head_prefix and n.startswith(head_prefix))
    }
    for expert_name, expert in experts.items():
        missing = [n for n in reference if n not in expert]
        extra = [
            n for n in expert
            if n not in base_state and not (head_prefix and n.startswith(head_prefix))
        ]
        if missing:
            raise LearnError(
                f"expert {expert_name!r} lacks {len(missing)} tensor(s) of the base: "
                f"{_preview(missing)}",
                fix="merge only fine-tunes of the same architecture as the base",
            )
        if extra:
            raise LearnError(
                f"expert {expert_name!r} has {len(extra)} tensor(s) the base lacks: "
                f"{_preview(extra)}",
                fix="if these are the task's head, name its prefix (head_prefix, e.g. "
                "'classifier.'); otherwise merge only fine-tunes of the base's architecture",
            )
        for name, tensor in reference.items():
            if _shape(expert, name) != tuple(tensor.shape):
                raise _shape_error(expert_name, name, _shape(expert, name), tensor.shape)
    if head_prefix:
        heads = expert_heads(experts, head_prefix)
    return list(reference), dict(heads or {})


def check_task_experts(experts: Mapping[str, object], tasks: Sequence[Any], purpose: str,
                       fix: str) -> None:
    """Raise LearnError, saying ``purpose``, unless every task has an expert of its name."""
    orphans = [t.name for t in tasks if t.name not in experts]
    if orphans:
        raise LearnError(f"{purpose}, but no expert is named like task(s) {orphans}", fix=fix)


def expert_heads(
    experts: Mapping[str, Mapping[str, torch.Tensor]], head_prefix: str,
) -> dict[str, dict[str, torch.Tensor]]:
    """Return each expert's tensors under ``head_prefix`` (experts without any are left
    out), keyed by expert name. Reads only those tensors."""
    heads = {}
    for name, expert in experts.items():
        head = {k: expert[k] for k in expert if k.startswith(head_prefix)}
        if head:
            heads[name] = head
    return heads


def run_with_head(
    module: nn.Module, weights: Mapping[str, torch.Tensor], head: Head | None,
    args: Sequence[Any], kwargs: Mapping[str, Any],
) -> Any:
    """Run ``module`` on ``weights`` with a task's head; returns the output.

    A tensor head overrides its tensors in ``weights``; a module head is applied to the
    module's output; ``None`` runs the module as it is.
    """
    if isinstance(head, nn.Module):
        return head(functional_call(module, dict(weights), tuple(args), dict(kwargs)))
    params = {**weights, **head} if head else dict(weights)
    return functional_call(module, params, tuple(args), dict(kwargs))


class MergedLeaves:
    """Merged tensors as autograd leaves and the gradient of map(W) gathered from them
    (see :meth:`MergedModel.merged_leaves`)."""

    def __init__(self, model: MergedModel, weights: dict[str, torch.Tensor]) -> None:
        self.model, self.weights = model, weights
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._index = {name: i for i, name in enumerate(model.names)}
        self._gradient = torch.zeros_like(model.weight, requires_grad=False)

    def reduce(self, name: str, leaf: torch.Tensor) -> None:
        """Add ``tau @ leaf.grad`` (one value per expert) to the gradient of map(W) at the
        leaf's group, and free the leaf's gradient: the chain rule of
        ``base + sum_i c_i tau_i`` for ``c``, in the task vectors' dtype as the merge uses."""
        self._reduce(name, leaf.grad)
        leaf.grad = None

    def _reduce(self, name: str, gradient: torch.Tensor) -> None:
        index = self._index[name]
        group = self.model._group_of[index]
        rows = group.stop - group.start if isinstance(group, slice) else None
        vectors = self.model._vectors
        if isinstance(vectors, SpilledVectors):
            product = vectors.products(index, gradient, rows)
        elif rows is not None:  # one coefficient per row: K x rows products
            stacked = vectors[index]
            product = torch.einsum("krc,rc->kr", stacked.reshape(len(stacked), rows, -1),
                                   gradient.reshape(rows, -1).to(stacked.dtype))
        else:
            flat = vectors[index].reshape(self.model.weight.shape[0], -1)
            product = torch.mv(flat, gradient.reshape(-1).to(flat.dtype))
        self._gradient[:, group] += product.to(self._gradient.dtype)

    def backward(self) -> None:
        """Reduce the gradients the leaves still hold, then add ``d loss / d W`` to the
        model's ``weight.grad`` (through the coefficient map). Releases the leaves: the
        hooks referring back to this object are removed, so the weight set is freed as soon
        as the caller drops it, not at the next garbage collection. Each leaf is dropped
        before its gradient is reduced, so a tensor's merged value, gradient and task vectors
        are not all resident at once."""
        for name in list(self.weights):
            gradient = self.weights.pop(name).grad
            if gradient is not None:
                self._reduce(name, gradient)
        for hook in self.hooks:
            hook.remove()
        self.hooks, self.weights = [], {}
        self.model.coefficients().backward(self._gradient)


def _shape_error(expert: str, tensor: str, shape: Sequence[int], base: Sequence[int]) -> LearnError:
    return LearnError(
        f"expert {expert!r} has shape {tuple(shape)}, the base {tuple(base)}",
        tensor=tensor,
        fix="merge only fine-tunes of the same architecture",
    )


class MergedModel(nn.Module):
    """One module run with ``base + sum_i map(W[i, group]) * tau[i]`` as its weights.

    ``task_vectors`` are K mappings name -> ``expert - base`` with the same names (lazy
    ones such as :class:`TaskVectors` are read one tensor at a time). ``heads`` maps a
    task name to its head. ``prepare`` is applied once to each tensor's stacked task
    vectors ``[K, *shape]`` (AdaMerging++ trims them here). ``init`` is the starting
    map(W), one value for every expert or one per expert. Construction reads every task
    vector once and holds K stacked copies in ``vector_dtype``, on the base's device: build
    it where it will run (``.to()`` moves W and the module, not the stacked vectors). With
    ``memory="stream"`` it writes them to a temporary file under ``workdir`` instead and
    holds none (:mod:`supermerge.learn.stream`; same coefficients up to float rounding,
    each block run twice per task and step).
    """

    def __init__(
        self,
        module: nn.Module,
        base_state: Mapping[str, torch.Tensor],
        task_vectors: Sequence[Mapping[str, torch.Tensor]],
        *,
        expert_names: Sequence[str] | None = None,
        heads: Mapping[str, Head] | None = None,
        granularity: Granularity = "tensor",
        coefficient_map: CoefficientMap = "tanh",
        init: float | Sequence[float] = 0.3,
        vector_dtype: torch.dtype = torch.float32,
        prepare: Prepare | None = None,
        memory: Memory = "in_memory",
        workdir: str | Path | None = None,
    ) -> None:
        super().__init__()
        if not task_vectors:
            raise LearnError("no task vectors to merge", fix="pass at least one expert")
        if coefficient_map not in _MAPS:
            raise LearnError(
                f"unknown coefficient map {coefficient_map!r}", fix=f"use one of {list(_MAPS)}"
            )
        k = len(task_vectors)
        inits = [float(init)] * k if isinstance(init, int | float) else [float(i) for i in init]
        if len(inits) != k:
            raise LearnError(f"{len(inits)} initial coefficients for {k} task vectors")
        starts = [_start(coefficient_map, value) for value in inits]
        self.expert_names = list(expert_names or (f"expert{i}" for i in range(k)))
        if len(self.expert_names) != k:
            raise LearnError(f"{len(self.expert_names)} expert names for {k} task vectors")
        self.module = module.requires_grad_(False)
        self.coefficient_map = coefficient_map
        tensors, self._aliases = module_tensors(module)
        self.names = self._check_names(tensors, base_state, task_vectors)
        self._base = [base_state[n].detach() for n in self.names]
        self.group_names, self._group_of = assign_groups(
            self.names, granularity, [b.shape[0] if b.dim() else 1 for b in self._base])
        self.memory = memory
        pairs = list(zip(self.names, self._base, strict=True))
        self._vectors: list[torch.Tensor] | SpilledVectors
        if memory == "in_memory":
            self._vectors = [self._stack(n, b, task_vectors, vector_dtype, prepare)
                             for n, b in pairs]
            self._blocks, self._rest = [], list(self.names)
        elif memory == "stream":  # without prepare, one task vector resident at a time
            self._vectors = SpilledVectors(
                [(n, tuple(b.shape)) for n, b in pairs], k, vector_dtype,
                (self._vectors_of(n, b, task_vectors) if prepare is None
                 else self._stack(n, b, task_vectors, vector_dtype, prepare) for n, b in pairs),
                device=self._base[0].device, workdir=workdir)
            self._blocks, self._rest = self._block_plan()
        else:
            raise LearnError(f"unknown memory mode {memory!r}", fix="use in_memory or stream")
        w_dtype = torch.promote_types(torch.float32, vector_dtype)
        self.weight = nn.Parameter(
            torch.tensor(starts, dtype=w_dtype, device=self._base[0].device)
            .unsqueeze(1).repeat(1, len(self.group_names)))
        self._tensor_heads: dict[str, dict[str, torch.Tensor]] = {}
        self.head_modules = nn.ModuleDict()
        for task, head in (heads or {}).items():
            self._add_head(task, head)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_experts(
        cls,
        module: nn.Module,
        base_state: Mapping[str, torch.Tensor],
        experts: Mapping[str, Mapping[str, torch.Tensor]],
        *,
        head_prefix: str | None = None,
        heads: Mapping[str, Head] | None = None,
        **options: Any,
    ) -> MergedModel:
        """Build from named expert state dicts (lazy mappings welcome); returns the model.

        With ``head_prefix`` (e.g. ``"classifier."``) each expert's tensors under it become
        the head of the task named like the expert and are excluded from merging; or pass
        ``heads`` (task -> head) yourself (see :func:`prepare_experts`). Costs one read of
        every expert tensor.
        """
        names, heads = prepare_experts(module, base_state, experts, head_prefix, heads)
        vectors = [TaskVectors(base_state, e, names) for e in experts.values()]
        return cls(
            module, base_state, vectors, expert_names=list(experts), heads=heads, **options
        )

    def _check_names(
        self,
        primary: Mapping[str, torch.Tensor],
        base_state: Mapping[str, torch.Tensor],
        task_vectors: Sequence[Mapping[str, torch.Tensor]],
    ) -> list[str]:
        first = list(task_vectors[0])
        for expert, vectors in zip(self.expert_names[1:], task_vectors[1:], strict=True):
            if set(vectors) != set(first):
                diff = sorted(set(vectors) ^ set(first))
                raise LearnError(
                    f"task vectors of {expert!r} and {self.expert_names[0]!r} name different "
                    f"tensors: {_preview(diff)}",
                    fix="merge only fine-tunes of the same architecture",
                )
        unknown = [n for n in first if n not in primary and n not in self._aliases]
        if unknown:
            raise LearnError(
                f"the task vectors name {len(unknown)} tensor(s) the module lacks: "
                f"{_preview(unknown)}",
                fix="build the module with the experts' architecture",
            )
        absent = [n for n in first if n in primary and n not in base_state]
        if absent:
            raise LearnError(
                f"the base lacks {len(absent)} tensor(s) of the task vectors: {_preview(absent)}"
            )
        # tied aliases are merged through their primary; integer tensors are never merged
        names = [n for n in first if n in primary and primary[n].is_floating_point()]
        if not names:
            raise LearnError("the task vectors hold no floating-point tensor of the module",
                             fix="check head_prefix: it may cover the whole model")
        return names

    def _stack(
        self,
        name: str,
        base: torch.Tensor,
        task_vectors: Sequence[Mapping[str, torch.Tensor]],
        dtype: torch.dtype,
        prepare: Prepare | None,
    ) -> torch.Tensor:
        wide = torch.promote_types(base.dtype, torch.float32)
        stacked = torch.empty((len(task_vectors), *base.shape), dtype=wide)
        for i, vector in enumerate(self._vectors_of(name, base, task_vectors)):
            stacked[i] = vector
        if prepare is not None:
            stacked = prepare(stacked)
        return stacked.to(device=base.device, dtype=dtype)

    def _block_plan(self) -> tuple[list[tuple[nn.Module, str, list[int]]], list[str]]:
        """Return (each numbered block, its name prefix, the indices of the merged tensors
        it owns) and the names of the merged tensors no block owns. A block owns a tensor
        whose name and tied aliases all lie inside it."""
        outside: dict[str, list[str]] = {}
        for alias, primary in self._aliases.items():
            outside.setdefault(primary, []).append(alias)
        blocks, owned = [], set()
        for name, block in named_blocks(self.module):
            prefix = name + "."
            indices = [i for i, n in enumerate(self.names) if n.startswith(prefix)
                       and all(a.startswith(prefix) for a in outside.get(n, []))]
            blocks.append((block, prefix, indices))
            owned.update(indices)
        return blocks, [n for i, n in enumerate(self.names) if i not in owned]

    def _vectors_of(self, name: str, base: torch.Tensor,
                    task_vectors: Sequence[Mapping[str, torch.Tensor]]) -> Iterator[torch.Tensor]:
        """Yield tensor ``name``'s task vector of each expert in turn, read as it is asked
        for; LearnError if one's shape is not the base's."""
        for expert, vectors in zip(self.expert_names, task_vectors, strict=True):
            vector = vectors[name]
            if vector.shape != base.shape:
                raise _shape_error(expert, name, vector.shape, base.shape)
            yield vector

    def _add_head(self, task: str, head: Head) -> None:
        if isinstance(head, nn.Module):
            self.head_modules[task] = head.requires_grad_(False)
            return
        merged = set(self.names)
        clash = [n for n in head if n in merged]
        if clash:
            raise LearnError(
                f"head of task {task!r} overrides merged tensor(s) {_preview(clash)}",
                fix="a head holds only task-specific tensors; check head_prefix",
            )
        self._tensor_heads[task] = {k: v.detach() for k, v in head.items()}

    # -- coefficients -------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        """Names of the tasks that have a head (empty: the module's output serves all)."""
        return [*self._tensor_heads, *self.head_modules]

    def coefficients(self) -> torch.Tensor:
        """Return map(W), K x J, differentiable."""
        return _MAPS[self.coefficient_map][0](self.weight)

    @torch.no_grad()
    def set_weight(self, raw: torch.Tensor) -> None:
        """Overwrite W (K x J) in place, e.g. with the best W found while training."""
        self.weight.copy_(raw)

    def groups_of(self, names: Sequence[str]) -> list[int]:
        """Return the indices of W's columns (groups) that the tensors ``names`` use."""
        index = {name: i for i, name in enumerate(self.names)}
        columns: set[int] = set()
        for name in names:
            group = self._group_of[index[name]]
            columns.update(range(group.start, group.stop) if isinstance(group, slice)
                           else (group,))
        return sorted(columns)

    # -- forward ------------------------------------------------------------------------
    def merged_parameters(self, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Return the merged tensors (differentiable w.r.t. W): one full weight set, or
        only the tensors in ``names``.

        Costs one read of every stacked task vector it merges (a K-row matrix-vector
        product per tensor).
        """
        coefficients = self.coefficients()
        wanted = None if names is None else set(names)
        return {name: self._merged(index, coefficients) for index, name in enumerate(self.names)
                if wanted is None or name in wanted}

    def _merged(self, index: int, coefficients: torch.Tensor) -> torch.Tensor:
        """Return merged tensor ``index`` under ``coefficients`` (map(W)), differentiable
        w.r.t. them; reads its stacked task vectors (from the file when streamed)."""
        base, group = self._base[index], self._group_of[index]
        if isinstance(self._vectors, SpilledVectors):
            return self._vectors.merge(index, base, coefficients[:, group])
        vectors = self._vectors[index]
        c = coefficients[:, group].to(vectors.dtype)
        if isinstance(group, slice):  # a coefficient per row: K row-scaled additions
            rows = c.shape[1]
            delta = torch.zeros((rows, base.numel() // rows), dtype=vectors.dtype,
                                device=base.device)
            for row_scale, vector in zip(c, vectors.reshape(len(c), rows, -1), strict=True):
                delta.addcmul_(row_scale.unsqueeze(-1), vector)
            return (base.reshape(rows, -1) + delta.to(base.dtype)).reshape(base.shape)
        flat = vectors.reshape(len(c), -1)
        if vectors.dtype == base.dtype:  # one fused op, no temporary delta
            return torch.addmv(base.reshape(-1), flat.T, c).reshape(base.shape)
        return base + (c @ flat).reshape(base.shape).to(base.dtype)

    def run_weights(self) -> dict[str, torch.Tensor]:
        """Return the merged tensors :meth:`forward` takes as ``weights``: all of them in
        memory; streamed, those outside the blocks (the blocks build theirs as they run).
        Costs a read of the stacked task vectors of the tensors it merges."""
        return self.merged_parameters(None if not self._blocks else self._rest)

    def merged_leaves(self, *, streamed: bool = False) -> MergedLeaves:
        """Return the merged tensors as leaves that require grad, for a backward pass.

        Run the module on ``leaves.weights`` and back-propagate any number of losses, then
        call :meth:`MergedLeaves.backward` to add ``d loss / d W`` to ``weight.grad``.
        Each leaf's gradient is reduced to K numbers (one product with its K task vectors);
        ``streamed=False`` reduces once, after the last loss, so the leaves' gradients are
        held meanwhile (one weight set); ``streamed=True`` reduces each leaf's gradient as
        soon as a backward pass computes it and frees it, holding none, at the cost of one
        read of the task vectors per backward pass instead of one in all. Costs one merged
        weight set; streamed, the leaves are only the tensors outside the blocks (the blocks'
        gradients reach W through :meth:`forward`).
        """
        with torch.no_grad():
            merged = self.run_weights()
        leaves = MergedLeaves(self, merged)
        for name, tensor in merged.items():
            tensor.requires_grad_()
            if streamed:
                leaves.hooks.append(
                    tensor.register_post_accumulate_grad_hook(partial(leaves.reduce, name)))
        return leaves

    def forward(
        self,
        *args: Any,
        task: str | None = None,
        weights: Mapping[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the module with merged weights and ``task``'s head; returns the module's output.

        ``weights`` (from :meth:`run_weights`) lets several tasks share one merge. Streamed,
        each block builds its merged tensors from the current W as it runs (entries of
        ``weights`` inside a block it owns are ignored).
        """
        weights = self.run_weights() if weights is None else weights
        if self.tasks and task not in self.tasks:
            raise LearnError(
                f"no head for task {task!r}", fix=f"tasks with a head: {', '.join(self.tasks)}"
            )
        head = self.head_modules[task] if task in self.head_modules else \
            self._tensor_heads.get(task)
        if not self._blocks:
            return run_with_head(self.module, weights, head, args, kwargs)
        given = {**weights, **head} if isinstance(head, Mapping) else weights
        coefficients = self.coefficients()
        builds = [(block, partial(self._block_weights, prefix, indices,
                                  {n[len(prefix):]: t for n, t in given.items()
                                   if n.startswith(prefix)}))
                  for block, prefix, indices in self._blocks]
        with streamed_blocks(builds, coefficients):
            return run_with_head(self.module, weights, head, args, kwargs)

    def _block_weights(self, prefix: str, indices: Sequence[int],
                       given: Mapping[str, torch.Tensor], coefficients: torch.Tensor,
                       ) -> dict[str, torch.Tensor]:
        """Return a block's tensors by their names in it: those ``given`` (merged outside,
        or a head's), then the ones it owns merged under ``coefficients``."""
        built = {self.names[i][len(prefix):]: self._merged(i, coefficients) for i in indices}
        return {**given, **built}

    # -- results ------------------------------------------------------------------------
    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the module's state dict with every merged tensor (and its tied aliases)
        replaced by its detached merged value; other entries share the module's storage.

        Heads in it are the module's own; task heads come from :meth:`head_state_dicts`.
        """
        state = {k: v.detach() for k, v in self.module.state_dict().items()}
        merged = self.merged_parameters()
        state.update(merged)
        for alias, primary in self._aliases.items():
            if primary in merged and alias in state:
                state[alias] = merged[primary]
        return state

    def head_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Return each task's head tensors: overrides as given, head modules' state dicts."""
        heads = dict(self._tensor_heads)
        heads.update({task: dict(h.state_dict()) for task, h in self.head_modules.items()})
        return heads
