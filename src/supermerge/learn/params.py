"""Parameters of the learned methods (typed, validated; `supermerge methods` lists them).

Each method's description and run live in its own module (:mod:`supermerge.learn.method`,
:mod:`supermerge.learn.registry`); the parameter types are here, shared options in
:class:`LearnParams`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, ValidationError, model_validator

from supermerge.learn.bases import PREPARE, Basis
from supermerge.learn.groups import Granularity
from supermerge.learn.objectives import make_objective
from supermerge.methods.primitives import Density
from supermerge.methods.registry import Params

VECTOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class LearnParams(Params):
    """Parameters shared by the learned methods."""

    granularity: Granularity = Field(
        "tensor",
        description="one coefficient per expert and tensor, per transformer block, per "
        "whole model (task), or per output row of every tensor (row)",
    )
    init: float = Field(0.3, description="initial mapped coefficient of every entry")
    steps: int = Field(200, ge=1, description="optimisation steps (Adam)")
    lr: float = Field(1e-2, gt=0, description="Adam learning rate")
    batch_size: int = Field(16, ge=1, description="examples per task in each step")
    holdout: float = Field(
        0.25, ge=0, lt=1, description="fraction of each task's examples held out to pick the "
        "best coefficients (0: keep the last)",
    )
    eval_every: int = Field(10, ge=1, description="steps between held-out evaluations")
    seed: int = Field(0, description="seed of the split and the batches")
    vector_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype the task vectors are held in (bfloat16 halves memory)"
    )
    memory: Literal["in_memory", "stream"] = Field(
        "in_memory", description="in_memory: hold the K task vectors (K model sizes); "
        "stream: keep them in a temporary file and build each transformer block's merged "
        "weights when it runs (the base, one block's merged weights, the tensors outside "
        "the blocks; each block runs twice per task and step; same coefficients)",
    )
    stream_gradients: bool = Field(
        False, description="reduce each merged tensor's gradient as soon as it is computed: "
        "one weight set less memory, slower steps (the task vectors are read once per task)",
    )
    feature_weight: float = Field(
        1.0, ge=0, description="with a distilling objective: weight of the distance between "
        "the merged model's and the expert's block states (0: match predictions only)",
    )
    reg: float = Field(
        0.0, ge=0, description="L2 pull of the mapped coefficients toward their start",
    )
    patience: int = Field(
        0, ge=0, description="stop after this many held-out evaluations in a row without a "
        "better loss (0: run every step)",
    )
    objective: str = "labels"  # each method narrows it to the objectives it offers

    def model_options(self) -> dict[str, Any]:
        """Keyword options for :class:`~supermerge.learn.model.MergedModel`."""
        return {
            "granularity": self.granularity,
            "init": self.init,
            "vector_dtype": VECTOR_DTYPES[self.vector_dtype],
            "memory": self.memory,
        }

    def fit_options(self) -> dict[str, Any]:
        """Keyword options for :func:`~supermerge.learn.train.learn_coefficients`."""
        return {
            "steps": self.steps,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "holdout": self.holdout,
            "eval_every": self.eval_every,
            "seed": self.seed,
            "stream_gradients": self.stream_gradients,
            "reg": self.reg,
            "patience": self.patience,
            "objective": make_objective(self.objective, feature_weight=self.feature_weight),
        }


class SuperMergeParams(LearnParams):
    """Parameters of ``supermerge`` (coefficients mapped by tanh).

    Defaults from the 8-task ablation (docs/supermerge.md): distillation over TSV-M's basis,
    40 steps of 8 examples per task at lr 0.05. The paper's configuration is
    ``objective: labels, basis: task_vectors``.
    """

    steps: int = Field(40, ge=1, description="optimisation steps (Adam)")
    lr: float = Field(5e-2, gt=0, description="Adam learning rate")
    batch_size: int = Field(8, ge=1, description="examples per task in each step")
    objective: Literal["labels", "distill", "labels+distill"] = Field(
        "distill", description="labels: cross-entropy on the labels (the paper); distill: "
        "match each task's expert (its predictions and block states) on the task's inputs, "
        "no labels needed; labels+distill: both",
    )
    basis: Basis = Field(
        "tsv", description="what the coefficients weight: the task vectors (the "
        "paper), or per matrix each task's part of the TSV-M merge (starts from TSV-M)",
    )

    layerwise: bool = Field(
        False, description="fit one transformer block at a time to the experts' block "
        "states on cached inputs (ProDistill's schedule; needs objective distill with "
        "feature_weight > 0); steps then count per block",
    )

    @model_validator(mode="after")
    def _layerwise_distils(self) -> SuperMergeParams:
        if self.layerwise and (self.objective != "distill" or self.feature_weight <= 0):
            raise ValueError("layerwise fits the experts' block states: it needs objective "
                             "distill with feature_weight > 0")
        if self.layerwise and self.memory == "stream":
            raise ValueError("layerwise fitting holds the task vectors in memory: use memory "
                             "stream with layerwise false (end to end), or memory in_memory")
        return self

    def model_options(self) -> dict[str, Any]:
        return {**super().model_options(), "prepare": PREPARE[self.basis]}

    def fit_options(self) -> dict[str, Any]:
        return {**super().fit_options(), "layerwise": self.layerwise}

    hierarchical: bool = Field(
        False, description="merge groups of similar experts first, level by level, to bound "
        "memory (each task must be named like its expert)",
    )
    fan_in: int = Field(2, ge=2, description="experts per group when hierarchical")
    select: Literal["auto", "off"] = Field(
        "auto", description="auto: fit each configuration of SELECTION (basis, layerwise, "
        "granularity) that the options given leave open and keep the one with the lowest "
        "held-out loss; off: fit the options as given (their defaults where not given)",
    )

    def configurations(self) -> dict[str, SuperMergeParams]:
        """Return the configurations to fit, by label: with ``select: auto`` each entry of
        :data:`SELECTION` with the options set explicitly kept as set (invalid
        combinations, e.g. layerwise with the labels objective, and repeats dropped);
        otherwise these parameters alone."""
        if self.select == "off":
            return {self.label(): self}
        pinned = self.model_fields_set
        found: dict[str, SuperMergeParams] = {}
        for options in SELECTION:
            merged = {**self.model_dump(), **{k: v for k, v in options.items()
                                               if k not in pinned}, "select": "off"}
            try:
                candidate = SuperMergeParams.model_validate(merged)
            except ValidationError:
                continue
            found.setdefault(candidate.label(), candidate)
        return found

    def label(self) -> str:
        """Return the configuration :data:`SELECTION` varies, as words."""
        schedule = "layerwise" if self.layerwise else "end to end"
        return f"basis {self.basis}, {schedule}, granularity {self.granularity}"


SELECTION: tuple[dict[str, Any], ...] = (
    {"basis": "tsv", "layerwise": False, "granularity": "tensor"},
    {"basis": "task_vectors", "layerwise": True, "granularity": "row"},
)
"""The configurations ``supermerge`` chooses among by held-out prediction loss, each the
best of the ablation on one task set (docs/supermerge.md): distillation end to end over
TSV-M's basis with 8 tasks (0.840 normalised), rows fitted block by block over the raw task
vectors with 4 (0.943). Distillation end to end over the raw task vectors, best on neither
set, is left out: with it the held-out loss picked it on 8 tasks (0.812)."""


class AdaMergingParams(LearnParams):
    """Parameters of ``adamerging`` (coefficients clamped to [0, 1], entropy loss)."""

    steps: int = Field(500, ge=1, description="optimisation steps (Adam; the paper's 500)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (the paper's 1e-3)")
    ties: bool = Field(
        False, description="AdaMerging++: learn on TIES-trimmed, sign-elected task vectors"
    )
    density: Density = Field(
        0.2, description="with ties: fraction of each task vector's entries kept"
    )
    objective: Literal["entropy", "distill"] = Field(
        "entropy", description="entropy: minimise the prediction entropy (the paper); "
        "distill: match each task's expert (its predictions and block states)",
    )
    trim_scope: Literal["tensor", "model"] = Field(
        "tensor", description="with ties: keep the top entries of each tensor, or of each "
        "expert's whole task vector (the paper's; costs two extra reads of the experts)",
    )


class FisherParams(Params):
    """Parameters of ``fisher`` (Fisher-weighted averaging, no training); named like
    :func:`~supermerge.learn.fisher.fisher_merge`'s keywords."""

    examples: int = Field(256, ge=1, description="unlabelled inputs per expert for its Fisher")
    floor: float = Field(
        1e-6, ge=0, description="added to every Fisher entry (all-zero Fishers: plain average)"
    )
    normalize: bool = Field(
        False, description="divide each expert's Fisher by its L2 norm first (MergeLM, "
        "FusionBench): a confident expert, small Fisher overall, is not outvoted",
    )
    labels: Literal["sampled", "exact"] = Field(
        "sampled", description="labels of the Fisher: sampled from the expert (one backward "
        "pass per example), or the exact expectation over the classes (classification only; "
        "one backward pass per class)",
    )
    seed: int = Field(0, description="seed of the labels sampled from each expert")


class RegMeanParams(Params):
    """Parameters of ``regmean`` (closed form per linear layer, no training); named like
    :func:`~supermerge.learn.regmean.regmean_merge`'s keywords."""

    alpha: float = Field(
        0.9, ge=0, le=1, description="scale of the Gram matrices' off-diagonal (1: exact)"
    )
    examples: int = Field(256, ge=1, description="unlabelled inputs per expert for its Grams")


class FisherModelParams(Params):
    """Per-expert parameter of ``fisher`` (an expert's ``weight`` in a learn recipe)."""

    weight: float = Field(1.0, gt=0, description="the expert's weight in the average")
