"""Losses for learning merge coefficients, summed over tasks by the training loop.

``supervised`` (SuperMerge): cross-entropy on class labels, or the token-level language
modelling loss (next-token cross-entropy over positions whose label is not -100).
``entropy`` (AdaMerging): Shannon entropy of the predicted distribution, needing no labels;
for language models averaged over the scored token positions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from supermerge.learn.data import IGNORE_INDEX, TaskKind
from supermerge.learn.model import wide_float

Objective = Callable[[Any, "torch.Tensor | None", TaskKind], torch.Tensor]


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
    return F.cross_entropy(logits, labels)


def entropy_loss(output: Any, labels: torch.Tensor | None, kind: TaskKind) -> torch.Tensor:
    """Return the mean entropy of the predictions (scalar); labels only mask LM padding."""
    logits = wide_float(logits_of(output))
    if kind == "causal_lm":
        logits = logits[:, :-1]
        if labels is not None:
            logits = logits[labels[:, 1:] != IGNORE_INDEX]
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


OBJECTIVES: dict[str, Objective] = {"supervised": supervised_loss, "entropy": entropy_loss}
