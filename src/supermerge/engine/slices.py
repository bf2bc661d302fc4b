"""Slices (mergekit's ``slices:``): which input tensors make each output tensor.

The output's numbered blocks are the slices' layers in order, renumbered from 0. Output
slice s of L layers merges, at its k-th layer, layer ``a_j + k`` of each source j
(``layer_range: [a_j, b_j]``, half-open as in mergekit), tensor by tensor with the recipe's
method, at relative depth k / (L - 1) (0 when L = 1) for gradients: a gradient runs across
each slice, as in mergekit. Tensors outside the numbered blocks are merged from the first
slice's sources when they embed (depth 0) and from the last slice's otherwise (final
norm, output head; depth 1), as mergekit merges its pre- and post-weights. A slice with one
source under ``passthrough`` is a copy of that source's layers, bit for bit.

Parameters are looked up as mergekit looks them up: a source's own, then its slice's
``parameters``, then the recipe's. Filters match the output tensor's name.

The output config's layer count (``num_hidden_layers``, ``n_layer``, ...) and per-layer
lists (``layer_types``) follow the output's blocks. Everything here reads names only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from supermerge.engine.params import LayerPositions, TensorParameters
from supermerge.engine.spec import MergeSpec, SliceSpec
from supermerge.errors import MethodError, Problem
from supermerge.io import Checkpoint, tied_aliases
from supermerge.methods import Method
from supermerge.names import layer_stack, with_layer_index

log = logging.getLogger(__name__)

T = TypeVar("T")

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
"""Config keys holding the number of blocks (Llama/Mistral/Qwen/BERT, GPT-2, others)."""

PER_LAYER_KEYS = ("layer_types",)
"""Config keys holding one entry per block (Qwen2/3, Gemma, recent Llama configs)."""


@dataclass(frozen=True)
class SlicedTensor:
    """One output tensor of a sliced merge: its name in the output and where its inputs
    live, as (checkpoint, name) pairs in the method's order."""

    name: str
    experts: list[tuple[Checkpoint, str]]
    base: tuple[Checkpoint, str] | None
    resolver: TensorParameters
    position: float


@dataclass
class SliceLayout:
    """Every output tensor of a sliced merge in output order, and the config keys that
    change (the layer count)."""

    tensors: list[SlicedTensor] = field(default_factory=list)
    config_changes: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def order_for_method(method: Method, items: Sequence[T], is_base: Callable[[T], bool]
                     ) -> tuple[list[T], T | None]:
    """Return ``(merged, base)``: the items a method merges, in its order, and the first
    item that is the base model (or None). A method that needs a base merges the others
    (the base's task vector is zero); one whose ``t = 0`` is the base (slerp) puts it
    first; any other merges every item as listed."""
    base = next((item for item in items if is_base(item)), None)
    if base is not None and method.needs_base:
        return [item for item in items if not is_base(item)], base
    if base is not None and method.base_first:
        return sorted(items, key=lambda item: not is_base(item)), base
    return list(items), base


def same_path(a: str, b: str) -> bool:
    """Whether two spellings name the same file or folder."""
    return Path(a).resolve() == Path(b).resolve()


def layer_count(checkpoint: Checkpoint) -> tuple[str | None, int, list[str]]:
    """Return ``(stack, count, other stacks)``: the prefix of the checkpoint's numbered
    blocks (``model.layers.``), their count (highest number + 1) and the prefixes of any
    further stacks (a vision tower beside a language model). Costs nothing: names only."""
    counts: dict[str, int] = {}
    for name in checkpoint.names():
        found = layer_stack(name)
        if found is not None:
            counts[found[0]] = max(counts.get(found[0], 0), found[1] + 1)
    if not counts:
        return None, 0, []
    stack = max(counts, key=lambda s: counts[s])
    return stack, counts[stack], sorted(s for s in counts if s != stack)


def slice_layout(spec: MergeSpec, method: Method, opened: dict[str, Checkpoint],
                 reference: Checkpoint, problems: list[Problem]) -> SliceLayout:
    """Return the layout of the sliced merge ``spec.slices`` over the checkpoints
    ``opened`` (by path), the output config's changes taken from ``reference``'s config,
    appending to ``problems`` every range, count and name that does not fit (each naming
    the slice, the model and the fix) before any weight is read. Costs nothing: names and
    headers only."""
    layout = SliceLayout()
    stacks = _stacks(opened, problems)
    if not _ranges_fit(spec.slices or [], opened, stacks, problems):
        return layout
    pieces = [_SlicePlan.build(index, piece, spec, method, opened, problems)
              for index, piece in enumerate(spec.slices or [])]
    if any(piece is None for piece in pieces):
        return layout
    positions = LayerPositions(reference.names())
    outside = [n for n in reference.names() if layer_stack(n) is None]
    pre = [n for n in outside if positions.position(n) == 0.0]
    post = [n for n in outside if positions.position(n) != 0.0]
    layout.tensors.extend(pieces[0].outside(pre, 0.0, problems))
    sources_of_layers: list[int] = []
    for piece in pieces:
        for offset in range(piece.length):
            layout.tensors.extend(piece.layer(offset, len(sources_of_layers), problems))
            sources_of_layers.append(piece.start + offset)
    layout.tensors.extend(pieces[-1].outside(post, 1.0, problems))
    _config_changes(layout, reference, sources_of_layers)
    return layout


def _stacks(opened: dict[str, Checkpoint], problems: list[Problem]) -> dict[str, tuple[str, int]]:
    """Each model's block stack and layer count; a problem for a model with none or with
    several (slices cut one stack; mergekit asks for its `modules:` syntax there)."""
    stacks = {}
    for path, checkpoint in opened.items():
        stack, count, others = layer_count(checkpoint)
        if stack is None:
            problems.append(Problem("no numbered blocks (layers.N., h.N., layer.N., ...) in "
                                    "this model's tensor names, so it has no layers to slice",
                                    file=path, fix="merge it with `models:` instead of "
                                    "`slices:`"))
        elif others:
            problems.append(Problem(
                f"this model has several numbered block stacks ({stack}N and "
                f"{', '.join(o + 'N' for o in others)}): a slice's layer_range would be "
                "ambiguous", file=path, fix="merge it with `models:` instead of `slices:`"))
        else:
            stacks[path] = (stack, count)
    return stacks


def _ranges_fit(slices: list[SliceSpec], opened: dict[str, Checkpoint],
                stacks: dict[str, tuple[str, int]], problems: list[Problem]) -> bool:
    """Check every layer_range against its model's layer count and each slice's sources
    for equal lengths; False (with problems) when any does not fit."""
    fits = True
    for i, piece in enumerate(slices):
        lengths = set()
        for j, source in enumerate(piece.sources):
            if source.path not in stacks:
                fits = False
                continue
            count = stacks[source.path][1]
            start, end = source.layer_range
            lengths.add(end - start)
            if not 0 <= start < end <= count:
                fits = False
                problems.append(Problem(
                    f"slices[{i}].sources[{j}]: layer_range [{start}, {end}] does not fit "
                    f"this model's {count} layers", file=str(opened[source.path].path),
                    fix=f"use 0 <= start < end <= {count} (the range is half-open: "
                    f"[0, {count}] takes every layer)"))
        if len(lengths) > 1:
            fits = False
            problems.append(Problem(
                f"slices[{i}]: its sources' layer ranges hold different numbers of layers "
                f"({', '.join(str(list(s.layer_range)) for s in piece.sources)}), but a slice "
                "merges its sources layer by layer",
                fix="give every source of a slice a range of the same length"))
    return fits


@dataclass
class _SlicePlan:
    """One output slice, checked: the sources the method merges (in its order), its
    base among them, its parameter resolver."""

    index: int
    experts: list[tuple[Checkpoint, int]]  # checkpoint, first layer
    base: tuple[Checkpoint, int] | None
    resolver: TensorParameters
    length: int

    @property
    def start(self) -> int:
        """The first layer of the first source (whose layer kinds the output keeps)."""
        return (self.base or self.experts[0])[1]

    @classmethod
    def build(cls, index: int, piece: SliceSpec, spec: MergeSpec, method: Method,
              opened: dict[str, Checkpoint], problems: list[Problem]) -> _SlicePlan | None:
        where = f"slices[{index}]"
        base_path = piece.base_model or spec.base_model
        merged, base = order_for_method(
            method, piece.sources,
            lambda s: base_path is not None and same_path(s.path, base_path))
        if method.needs_base and base is None:
            problems.append(Problem(
                f"{where}: method '{method.name}' needs a base model among the slice's "
                "sources (each tensor of a slice comes from its sources, as in mergekit)",
                file=base_path, fix="list the base model under the slice's `sources` with a "
                "layer_range (and set `base_model:`)"))
            return None
        try:
            method.check_count(len(merged))
        except MethodError as err:
            problems.append(Problem(f"{where}: {err.message}", fix=err.fix))
            return None
        resolver, found = TensorParameters.from_recipe(
            method, spec.parameters, [s.parameters for s in merged], [s.path for s in merged],
            over=(piece.parameters, f"{where}.parameters"), models_key=f"{where}.sources")
        problems.extend(found)
        start_of = {id(s): s.layer_range[0] for s in piece.sources}
        experts = [(opened[s.path], start_of[id(s)]) for s in merged]
        based = (opened[base.path], start_of[id(base)]) if base is not None else None
        length = piece.sources[0].layer_range[1] - piece.sources[0].layer_range[0]
        return cls(index, experts, based, resolver, length)

    def layer(self, offset: int, out_index: int,
              problems: list[Problem]) -> list[SlicedTensor]:
        """The tensors of the slice's ``offset``-th layer, named as output block
        ``out_index``; a problem for each one a source lacks."""
        position = offset / (self.length - 1) if self.length > 1 else 0.0
        first, start = self.base or self.experts[0]
        template = [n for n in first.names()
                    if (found := layer_stack(n)) is not None and found[1] == start + offset]
        tensors = []
        for name in template:
            def at(source: tuple[Checkpoint, int], name: str = name) -> tuple[Checkpoint, str]:
                return source[0], with_layer_index(name, source[1] + offset)

            inputs = [at(s) for s in self.experts] + ([at(self.base)] if self.base else [])
            if self._missing(inputs, problems):
                continue
            tensors.append(SlicedTensor(
                with_layer_index(name, out_index), [at(s) for s in self.experts],
                at(self.base) if self.base else None, self.resolver, position))
        return tensors

    def outside(self, names: list[str], position: float,
                problems: list[Problem]) -> list[SlicedTensor]:
        """The tensors outside the numbered blocks, from this slice's sources (a tied
        output embedding read as its input embedding where a source omits it)."""
        tensors = []
        for name in names:
            def at(source: tuple[Checkpoint, int], name: str = name) -> tuple[Checkpoint, str]:
                checkpoint = source[0]
                return checkpoint, (name if name in checkpoint
                                    else tied_aliases(checkpoint).get(name, name))

            inputs = [at(s) for s in self.experts] + ([at(self.base)] if self.base else [])
            if self._missing(inputs, problems):
                continue
            tensors.append(SlicedTensor(name, [at(s) for s in self.experts],
                                        at(self.base) if self.base else None, self.resolver,
                                        position))
        return tensors

    def _missing(self, inputs: list[tuple[Checkpoint, str]], problems: list[Problem]) -> bool:
        missing = [(c, n) for c, n in inputs if n not in c]
        for checkpoint, name in missing:
            problems.append(Problem(f"slices[{self.index}]: tensor missing in a source",
                                    file=str(checkpoint.path), tensor=name,
                                    fix="slice models of the same architecture"))
        return bool(missing)


def _config_changes(layout: SliceLayout, reference: Checkpoint, sources: list[int]) -> None:
    """Set the output config's layer count and per-layer lists (each output block takes
    the entry of the layer it came from); a warning where the config has no known key."""
    config = reference.config or {}
    key = next((k for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)
    if key is None:
        layout.warnings.append(
            f"{reference.path}: its config has none of {', '.join(LAYER_COUNT_KEYS)}, so the "
            f"output config's layer count was not set to {len(sources)}; set it by hand")
        return
    layout.config_changes[key] = len(sources)
    for per_layer in PER_LAYER_KEYS:
        entries = config.get(per_layer)
        if isinstance(entries, list) and len(entries) == config[key]:
            layout.config_changes[per_layer] = [entries[i] for i in sources]
