"""What the engine is asked to do: a merge specification, independent of any file format.

Recipes (YAML, mergekit's format) are parsed in ``supermerge.recipes`` into a
:class:`MergeSpec`; Python users may also build one directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from supermerge.errors import RecipeError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(name: str | None, where: str) -> torch.dtype | None:
    """Return the torch dtype for a recipe dtype name (None stays None); RecipeError if unknown."""
    if name is None:
        return None
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise RecipeError(
            f"unknown dtype {name!r} in {where}",
            fix=f"use one of: {', '.join(sorted(DTYPES))}",
        ) from None


@dataclass
class ModelSpec:
    """One input model and its own parameters (values may be per-tensor specs).

    ``prefix`` maps a prefix of this model's tensor names to the reference's (``{"bert.":
    ""}``: its ``bert.encoder...`` is the base's ``encoder...``); None aligns a consistent
    prefix automatically. ``task`` names its task's head under ``heads/`` (default: the
    folder's name).
    """

    path: str
    parameters: dict[str, Any] = field(default_factory=dict)
    prefix: dict[str, str] | None = None
    task: str | None = None

    @property
    def task_name(self) -> str:
        """The task's name: ``task``, else the model's folder (or file stem) name."""
        path = Path(self.path)
        return self.task or (path.stem if path.suffix in (".safetensors", ".bin", ".pt")
                             else path.name)


@dataclass(frozen=True)
class TokenSource:
    """Where a token's embedding row comes from (mergekit's ``tokens: {T: {source: ...}}``):
    ``model`` (the row of the same token in the model at ``model``), ``model_token`` (the
    row of ``token`` or of row ``token_id`` in ``model``) or ``zero`` (a row of zeros)."""

    kind: Literal["model", "model_token", "zero"]
    model: str | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenSpec:
    """One token's embedding rule: its ``source`` (None: the automatic rule), and ``force``
    (every model gets that row, even the models that have the token)."""

    source: TokenSource | None = None
    force: bool = False


@dataclass
class TokenizerSpec:
    """The output vocabulary (mergekit's ``tokenizer_source`` / ``tokenizer:``): ``source``
    is ``union``, ``base`` or a model path; ``tokens`` set rows of single tokens (added to
    the vocabulary when it lacks them); rows are padded to a multiple of
    ``pad_to_multiple_of``. See :mod:`supermerge.engine.vocab`."""

    source: str = "union"
    tokens: dict[str, TokenSpec] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


@dataclass
class SliceSource:
    """One input of an output slice: layers ``layer_range[0]`` to ``layer_range[1] - 1`` of
    the model at ``path`` (mergekit's half-open ``layer_range``), with its own parameters."""

    path: str
    layer_range: list[int]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceSpec:
    """One output slice (mergekit's ``slices:`` entry): its sources' layers merged position
    by position; ``parameters`` sit between each source's own and the recipe's, and
    ``base_model`` (else the recipe's) is the base of this slice's merge."""

    sources: list[SliceSource]
    parameters: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None


@dataclass
class MergeSpec:
    """A data-free merge: method, inputs, parameters and the policies for awkward inputs.

    ``out_dtype`` None keeps each tensor's dtype from the reference model (the base, or the
    first model when there is no base). ``on_missing`` says what to do when an expert lacks
    a tensor the reference has: ``refuse`` (default) or ``base`` (use the base's tensor,
    i.e. a zero task vector). ``vocab`` says what to do with embeddings whose vocabulary
    sizes differ: ``common_rows`` (merge the rows all models share, keep the reference's
    extra rows) or ``refuse``. ``on_nonfinite``: ``refuse`` or ``warn`` on NaN/Inf inputs.
    ``output``: ``model`` (a whole model folder) or ``adapter`` (the merged update as a PEFT
    LoRA adapter of rank ``rank``; needs a base model, see :mod:`supermerge.engine.adapter`),
    factored by an ``exact`` or a seeded ``randomized`` SVD (``svd``). ``resume`` is the
    folder of a previous merge that this one continues (``models[0]``, whose
    ``merge_state.json`` gave its parameters; see :mod:`supermerge.engine.merge_state`).
    ``tokenizer`` builds an output vocabulary and maps every model's embedding rows onto it
    (None: the reference's tokenizer is copied and ``vocab`` applies).

    ``slices`` (mergekit's): the output's numbered blocks are the slices' layers in order,
    renumbered, each slice merging its sources position by position
    (:mod:`supermerge.engine.slices`); ``models`` then lists each source model once, filled
    from the slices (RecipeError if given otherwise).
    """

    method: str
    models: list[ModelSpec]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    out_dtype: str | None = None
    compute_dtype: str = "float32"
    seed: int = 0
    on_missing: Literal["refuse", "base"] = "refuse"
    vocab: Literal["common_rows", "refuse"] = "common_rows"
    on_nonfinite: Literal["refuse", "warn"] = "refuse"
    output: Literal["model", "adapter"] = "model"
    rank: int | None = None
    svd: Literal["exact", "randomized"] = "exact"
    heads: list[str] = field(default_factory=list)
    resume: str | None = None
    slices: list[SliceSpec] | None = None
    tokenizer: TokenizerSpec | None = None

    def __post_init__(self) -> None:
        if not self.slices:
            return
        paths = list(dict.fromkeys(s.path for piece in self.slices for s in piece.sources))
        if self.models and [m.path for m in self.models] != paths:
            raise RecipeError("with `slices`, `models` lists each slice source's model once, "
                              "in order of first use", fix="leave `models` empty: it is "
                              "filled from the slices")
        self.models = [ModelSpec(path) for path in paths]

    def is_head(self, name: str) -> bool:
        """Whether tensor ``name`` belongs to a task head (``heads``)."""
        return any(name.startswith(prefix) for prefix in self.heads)
