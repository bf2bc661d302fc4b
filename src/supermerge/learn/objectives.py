"""Losses for learning merge coefficients, summed over tasks by the training loop.

An :class:`Objective` scores one task's batch: the merged model's output, the batch (its
labels, and the expert's cached outputs when the objective distils), the task kind and
the hidden states of the model's numbered blocks (captured only when the objective asks).

- ``labels`` (SuperMerge's paper): cross-entropy on class labels, or the token-level
  language-modelling loss (next-token cross-entropy over positions whose label is not -100).
- ``entropy`` (AdaMerging): Shannon entropy of the predicted distribution, no labels; for
  language models averaged over the scored token positions.
- ``distill``: KL(expert || merged) of the predictive distributions through the task's
  head (for language models per scored token), plus ``feature_weight`` times the mean over
  blocks of the squared distance between the merged model's and the expert's hidden
  states, padding masked, relative to the expert's mean squared state (so the weight
  means the same for every model). Needs no labels: the targets are the expert's outputs,
  computed once (:func:`~supermerge.learn.distill.attach_teachers`). After ProDistill
  (arXiv 2502.12706) and Expert Merging (arXiv 2509.25712), which fit merge coefficients
  to the experts' features and logits from a few unlabelled inputs per task.
- ``labels+distill``: the sum of both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from supermerge.learn.data import IGNORE_INDEX, TaskData, TaskKind
from supermerge.learn.model import wide_float

ObjectiveName = Literal["labels", "distill", "labels+distill", "entropy"]
LabelLoss = Callable[[Any, "torch.Tensor | None", TaskKind], torch.Tensor]
"""A loss from the output and the labels alone, such as :func:`supervised_loss`."""


def logits_of(output: Any) -> torch.Tensor:
    """Return the logits in a module's output: the tensor itself, ``.logits`` or ``[0]``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output[0]


def supervised_loss(output: Any, labels: torch.Tensor | None, kind: TaskKind) -> torch.Tensor:
    """Return the mean cross-entropy of the output against ``labels`` (scalar)."""
    if labels is None:
        raise ValueError("the supervised objective needs labels")
    logits = wide_float(logits_of(output))
    if kind == "causal_lm":
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
    if not bool((labels != IGNORE_INDEX).any()):  # only unlabelled inputs in this batch
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels)


def scored_positions(logits: torch.Tensor, batch: TaskData, kind: TaskKind) -> torch.Tensor:
    """Return the logits that predict a scored token: every row for classification; for a
    language model the positions followed by a labelled token (real tokens when unlabelled).
    """
    if kind != "causal_lm":
        return logits
    logits = logits[:, :-1]
    if batch.labels is not None:
        return logits[batch.labels[:, 1:] != IGNORE_INDEX]
    mask = token_mask(batch)
    return logits.flatten(0, 1) if mask is None else logits[mask[:, 1:].bool()]


def token_mask(batch: TaskData) -> torch.Tensor | None:
    """Return the batch's attention mask ``[B, T]`` (None for inputs without one)."""
    return batch.inputs.get("attention_mask") if isinstance(batch.inputs, dict) else None


def entropy_loss(output: Any, labels: torch.Tensor | None, kind: TaskKind) -> torch.Tensor:
    """Return the mean entropy of the predictions (scalar); labels only mask LM padding."""
    logits = wide_float(logits_of(output))
    if kind == "causal_lm":
        logits = logits[:, :-1]
        if labels is not None:
            logits = logits[labels[:, 1:] != IGNORE_INDEX]
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def kl_to_teacher(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Return the mean over rows of KL(teacher || student) for ``[N, classes]`` logits."""
    if len(logits) == 0:
        return logits.sum() * 0.0
    return F.kl_div(F.log_softmax(wide_float(logits), -1), F.log_softmax(wide_float(teacher), -1),
                    log_target=True, reduction="batchmean")


def feature_distance(hidden: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                     mask: torch.Tensor | None) -> torch.Tensor:
    """Return the mean over blocks and examples of ``||h - h_expert||^2 / ||h_expert||^2``,
    each example summed over its real tokens (``mask`` ``[B, T]``; states ``[B, T, H]`` or
    ``[B, H]``). A mean over examples, so shards of a batch average to the whole batch's."""
    distances = [torch.zeros(())]  # a module without numbered blocks: nothing to match
    for student, target in zip(hidden, teacher, strict=True):
        student, target = wide_float(student), wide_float(target)
        weight = (mask.to(student.dtype).unsqueeze(-1) if mask is not None and student.dim() == 3
                  else torch.ones((), dtype=student.dtype))
        dims = tuple(range(1, student.dim()))
        error = ((student - target).square() * weight).sum(dims)
        scale = (target.square() * weight).sum(dims).clamp_min(torch.finfo(student.dtype).tiny)
        distances.append((error / scale).mean())
    return torch.stack(distances[1:]).mean() if len(distances) > 1 else distances[0]


@dataclass(frozen=True)
class Objective:
    """A loss for learned merges, scored per task batch and summed over tasks.

    ``label_weight`` scales the supervised loss (0: unused), ``distill_weight`` the KL to
    the expert, ``feature_weight`` the hidden-state distance, ``entropy_weight`` the
    prediction entropy. ``needs_labels`` and ``needs_teacher`` tell the training loop what
    each batch must carry; ``needs_hidden`` whether to capture the blocks' states.
    """

    name: str
    label_weight: float = 0.0
    distill_weight: float = 0.0
    feature_weight: float = 0.0
    entropy_weight: float = 0.0
    custom: LabelLoss | None = None

    @property
    def needs_labels(self) -> bool:
        return self.label_weight > 0

    @property
    def needs_teacher(self) -> bool:
        return self.distill_weight > 0 or self.feature_weight > 0

    @property
    def needs_hidden(self) -> bool:
        return self.feature_weight > 0

    def __call__(self, output: Any, batch: TaskData, kind: TaskKind,
                 hidden: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Return the objective on one batch (scalar)."""
        if self.custom is not None:
            return self.custom(output, batch.labels, kind)
        total = torch.zeros((), dtype=torch.float32)
        if self.label_weight:
            total = total + self.label_weight * supervised_loss(output, batch.labels, kind)
        if self.entropy_weight:
            total = total + self.entropy_weight * entropy_loss(output, batch.labels, kind)
        if self.needs_teacher:
            if batch.teacher is None:
                raise ValueError(f"the {self.name} objective needs the experts' outputs")
            teacher_logits, *teacher_hidden = batch.teacher
            if self.distill_weight:
                student = scored_positions(logits_of(output), batch, kind)
                target = scored_positions(teacher_logits, batch, kind)
                total = total + self.distill_weight * kl_to_teacher(student, target)
            if self.feature_weight:
                total = total + self.feature_weight * feature_distance(
                    hidden, teacher_hidden, token_mask(batch))
        return total


def make_objective(name: ObjectiveName | str, *, feature_weight: float = 1.0) -> Objective:
    """Return the named objective (``feature_weight``: the distillation's hidden-state term).

    Raises ValueError for an unknown name.
    """
    if name in ("labels", "supervised"):
        return Objective(name, label_weight=1.0)
    if name == "entropy":
        return Objective(name, entropy_weight=1.0)
    if name == "distill":
        return Objective(name, distill_weight=1.0, feature_weight=feature_weight)
    if name == "labels+distill":
        return Objective(name, label_weight=1.0, distill_weight=1.0,
                         feature_weight=feature_weight)
    raise ValueError(f"unknown objective {name!r}: use labels, distill, labels+distill or entropy")


def as_objective(objective: str | Objective | LabelLoss) -> Objective:
    """Return ``objective`` as an :class:`Objective` (a name, one already, or a plain loss of
    the output and the labels, which is then taken to need labels only if it is
    :func:`supervised_loss`)."""
    if isinstance(objective, Objective):
        return objective
    if isinstance(objective, str):
        return make_objective(objective)
    return Objective(getattr(objective, "__name__", "custom"),
                     label_weight=1.0 if objective is supervised_loss else 0.0,
                     custom=objective)
