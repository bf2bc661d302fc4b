"""``emr``: EMR-merging, one elected task vector plus a mask and a rescaler per task.

Formula, per tensor, with ``tau_i = x_i - base``::

    gamma    = sign(sum_i tau_i)                                   elected sign
    tau_uni  = gamma * max_{i: sign(tau_i) = gamma} |tau_i|        elect: the unified vector
    shared   = base + tau_uni                                      serves every task
    M_i      = tau_i * tau_uni > 0                                 mask: where task i agrees
    lambda_i = sum |tau_i| / sum |M_i * tau_uni|                   rescaler, over the WHOLE model
    theta_i  = base + lambda_i * M_i * tau_uni                     task i's model (needs the id)

Paper: Huang, Ye, Li, Luo, Fu, Ouyang & Wang 2024, "EMR-Merging: Tuning-Free
High-Performance Model Merging" (NeurIPS 2024, arXiv 2405.17461). Elect, Mask, Rescale:
the masks align the unified vector's direction with each task's, the rescaler its average
magnitude. The rescalers are whole-model sums, computed by :class:`EmrRescalers` in one
extra reading pass before the merge (the engine's :class:`ModelStatistic` mechanism);
called on one tensor from Python they are that tensor's. The engine writes the shared
model and the K masks (1 bit per entry) and records the rescalers in ``task_state.json``;
:func:`supermerge.engine.task_state.load_task_state` rebuilds task i's model.

Tuning-free: no parameters and no weights (the paper's method is unweighted).

Edge cases: where ``sum_i tau_i`` is exactly 0 the elected sign is 0 (as in TIES), so
``tau_uni`` and every mask are 0 there. A task whose mask is empty everywhere (an all-zero
task vector) gets rescaler 1 and the base as its model; never a NaN.

Differences from the reference code (and FusionBench, which copies it): it turns a zero
summed sign into -1; it computes each rescaler from the sum over tensors of per-tensor
MEAN magnitudes (each tensor weighted by 1 / its size), where the paper's formula and this
implementation sum over every entry of the model. mergekit has no EMR-merging.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from supermerge.errors import MethodError
from supermerge.methods.primitives import UnweightedModelParams, task_vectors
from supermerge.methods.registry import Method, Params, TaskSpecific, TensorContext, register


class EmrParams(Params):
    """EMR-merging has no global parameters (tuning-free)."""


class UnifiedVector:
    """The elected unified task vector, accumulated from task vectors given one at a time.

    Keeps the running sum, the running maximum of the positive parts and of the negative
    parts, and each task vector's sign (int8), so memory is three float tensors plus K
    bytes per entry whatever K, and the task vectors themselves need not be kept.
    """

    def __init__(self) -> None:
        self._total: torch.Tensor | None = None
        self._high: torch.Tensor | None = None  # max(0, max_i tau_i)
        self._low: torch.Tensor | None = None  # min(0, min_i tau_i)
        self._signs: list[torch.Tensor] = []

    def add(self, tau: torch.Tensor) -> None:
        """Account for one task vector (not modified, not kept). Cost: three in-place updates."""
        if self._total is None:
            self._total, self._high, self._low = tau.clone(), tau.clamp(min=0), tau.clamp(max=0)
        else:
            self._total.add_(tau)
            torch.maximum(self._high, tau, out=self._high)
            torch.minimum(self._low, tau, out=self._low)
        self._signs.append(tau.sign().to(torch.int8))

    def result(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return ``(tau_uni, masks)``: the unified vector and each task's boolean mask.

        ``tau_uni = gamma * max |tau_i|`` over the tasks whose sign is the elected
        ``gamma = sign(sum tau_i)`` (0 where the sum is 0); ``masks[i] = tau_i * tau_uni > 0``.
        Frees the accumulators. Cost: one temporary and K boolean masks.
        """
        if self._total is None:
            raise ValueError("UnifiedVector.result() needs at least one task vector")
        gamma = self._total.sign_()
        unified = torch.where(gamma > 0, self._high, self._low).mul_(gamma.abs())
        elected = unified.sign().to(torch.int8)
        elected.masked_fill_(elected == 0, 2)  # no sign is 2: no task agrees where tau_uni = 0
        masks = [sign == elected for sign in self._signs]
        self._total = self._high = self._low = None
        self._signs = []
        return unified, masks


def elect(taus: Iterable[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Return ``(tau_uni, masks)`` of the task vectors (see :meth:`UnifiedVector.result`).

    ``taus`` may be a lazy iterable: each task vector is dropped once accounted for.
    Cost: three accumulators, K int8 signs, K boolean masks.
    """
    unified = UnifiedVector()
    for tau in taus:
        unified.add(tau)
    return unified.result()


class EmrRescalers:
    """Whole-model rescalers ``lambda_i = sum |tau_i| / sum |M_i * tau_uni|`` in one pass.

    Each tensor's K task vectors arrive back to back; they are folded into a
    :class:`UnifiedVector` as they come, and once the K-th has arrived the tensor's
    ``tau_uni`` and masks give its share of both sums (accumulated in float64). Memory:
    that of one tensor's :class:`UnifiedVector`. A task whose masked sum is 0 gets
    rescaler 1. Implements :class:`~supermerge.methods.registry.ModelStatistic`.
    """

    passes = 1

    def __init__(self, count: int) -> None:
        self._count = count
        self._unified = UnifiedVector()
        self._magnitude = [0.0] * count  # sum |tau_i|
        self._masked = [0.0] * count  # sum |M_i * tau_uni|

    def observe(self, pass_index: int, model_index: int, task_vector: torch.Tensor) -> None:
        """Fold in one task vector; after the K-th of a tensor, add the tensor's sums."""
        self._magnitude[model_index] += float(task_vector.abs().sum(dtype=torch.float64))
        self._unified.add(task_vector)
        if model_index < self._count - 1:
            return
        unified, masks = self._unified.result()
        magnitude = unified.abs_()
        for i, mask in enumerate(masks):
            self._masked[i] += float(torch.where(mask, magnitude, 0.0).sum(dtype=torch.float64))

    def finish_pass(self, pass_index: int) -> None:
        """Nothing to do between tensors or passes."""

    def result(self) -> tuple[float, ...]:
        """Return the K rescalers (1.0 where a task's masked sum is 0)."""
        return tuple(
            m / d if d > 0 else 1.0 for m, d in zip(self._magnitude, self._masked, strict=True)
        )


def emr_statistic(params: EmrParams, models: list[UnweightedModelParams]) -> EmrRescalers:
    """Return the whole-model rescaler statistic for ``len(models)`` tasks."""
    return EmrRescalers(len(models))


def merge_emr(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: EmrParams,
    models: list[UnweightedModelParams],
    ctx: TensorContext,
) -> TaskSpecific:
    """Return ``base + tau_uni`` with each task's mask and whole-model rescaler.

    ``ctx.statistic`` must hold the K rescalers (:class:`EmrRescalers`). Cost: one task
    vector at a time (in place on the experts when ``ctx.scratch``), three accumulators,
    K int8 signs and K boolean masks.
    """
    scales = ctx.statistic
    if not isinstance(scales, tuple) or len(scales) != len(experts):
        raise MethodError(
            "emr needs the whole-model rescalers",
            tensor=ctx.name or None,
            fix="run the merge through the engine (or Method.__call__), which computes them",
        )
    unified, masks = elect(task_vectors(base, experts, in_place=ctx.scratch))
    return TaskSpecific(shared=unified.add_(base), masks=masks, scales=scales)


emr = register(
    Method(
        name="emr",
        fn=merge_emr,
        params=EmrParams,
        model_params=UnweightedModelParams,
        summary="elect one unified task vector, plus a mask and a rescaler per task; "
        "evaluated with the task id (tuning-free)",
        paper="Huang et al. 2024, EMR-Merging: Tuning-Free High-Performance Model Merging "
        "(arXiv 2405.17461)",
        needs="task id",
        statistic=emr_statistic,
        per_task=True,
    )
)
