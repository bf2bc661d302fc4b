"""``lines``: LiNeS, scale a merged task vector linearly with layer depth.

Formula, per tensor at relative depth ``position`` (``ctx.position``: 0 at the first block,
1 at the last; 0 for every tensor outside the numbered blocks, as in the reference code),
with ``inner`` one of ``task_arithmetic``, ``ties``, ``consensus`` run with its own
parameters::

    tau_MTL = inner(base, experts) - base          the inner method's merged task vector
    merged  = base + (alpha + beta * position) * tau_MTL

Paper: Wang, Dimitriadis, Favero, Ortiz-Jimenez, Fleuret & Frossard 2024, "LiNeS:
Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging" (arXiv
2410.17146): ``lambda(l) = alpha + beta (l - 1) / (L - 1)`` for block ``l`` of ``L``. For
multi-task merging the paper scales the *merged* task vector (as here), with the inner
method's own scaling set to 1, and sets

    alpha = (|sum_t tau_t| / |tau_MTL|) / T        norms over the whole model, T tasks

so that shallow layers get a vector as large as the average task vector whatever the inner
method's overall scale (for task arithmetic exactly the average: alpha = 1/T); ``beta`` is
tuned on validation data (a grid in (0, 1]). The reference code's comment speaks of "the
sum of the norms of the tvs" while its variable is the norm of the summed task vectors; we
read the latter (L2 norms), which makes task arithmetic's alpha exactly 1/T. ``alpha: auto``
(the default) computes that ratio in one extra reading pass (a whole-model statistic that
runs the inner merge once per tensor); give a number to skip the pass. ``beta`` defaults to
0.5, the middle of the paper's grid. ``alpha = 1, beta = 0`` is the inner method unchanged.

For these three inner methods scaling the merged vector and scaling every task vector
before merging give the same result (task arithmetic is linear; TIES's trim, election and
disjoint mean, and the TALL masks, are unchanged by a common positive scale), so the
choice the paper leaves open for them does not matter.

Parameters of the inner method: its global ones (and defaults for its per-model ones) go in
``inner_params`` (validated against the inner method, unknown keys are errors); per-model
values go on each model as for the inner method itself: ``weight``, ``density`` (ties),
``tall_lambda`` (consensus). A per-model key the inner method does not have is an error at
the first tensor.

Like the reference code, every tensor outside the numbered blocks (embeddings, final norm,
head; :func:`supermerge.names.layer_index` finds no block in its name) gets ``alpha``,
whatever depth the engine gives it (the engine's own rule, for gradients, puts the final
norm and the head at 1); a call without a tensor name uses ``ctx.position`` as given.
Ratio with a zero merged norm: 1 (alpha = 1/T). mergekit has no LiNeS method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal, Self

import torch
from pydantic import Field, model_validator

from supermerge.errors import MethodError
from supermerge.methods.consensus_method import consensus
from supermerge.methods.primitives import Weight, weighted_sum
from supermerge.methods.registry import (
    Method,
    ModelParams,
    ModelStatistic,
    Params,
    TensorContext,
    register,
)
from supermerge.methods.task_arithmetic_method import task_arithmetic
from supermerge.methods.ties_method import ties
from supermerge.names import layer_index

InnerName = Literal["task_arithmetic", "ties", "consensus"]
INNER: dict[str, Method] = {m.name: m for m in (task_arithmetic, ties, consensus)}


class LinesParams(Params):
    """Global parameters of ``lines``."""

    inner: InnerName = Field(
        "task_arithmetic", description="the merge whose task vector is scaled by depth"
    )
    alpha: float | Literal["auto"] = Field(
        "auto",
        description="scale at depth 0; auto: (|sum of task vectors| / |merged task "
        "vector|) / number of models over the whole model, the paper's multi-task rule "
        "(one extra reading pass)",
    )
    beta: float = Field(
        0.5,
        allow_inf_nan=False,
        description="added scale at depth 1 (the last block): alpha + beta * depth",
    )
    inner_params: dict[str, Any] = Field(
        default_factory=dict,
        description="the inner method's parameters (its global ones and defaults for its "
        "per-model ones), e.g. {density: 0.2} for ties",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if isinstance(self.alpha, float) and not math.isfinite(self.alpha):
            raise ValueError("alpha must be a finite number or 'auto'")
        if "weight" in self.inner_params:
            raise ValueError("inner_params: set `weight` on the models, not in inner_params")
        try:
            inner_parameters(self, [LinesModelParams()])
        except MethodError as err:
            raise ValueError(f"inner_params: {err.message} ({err.fix})") from None
        return self


class LinesModelParams(ModelParams):
    """Per-model parameters of ``lines``: passed to the inner method."""

    weight: Weight = Field(1.0, description="this model's weight in the inner method")
    density: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="ties only: fraction of the task vector's entries kept",
    )
    tall_lambda: float | None = Field(
        None,
        ge=0.0,
        allow_inf_nan=False,
        description="consensus only: TALL mask threshold lambda_t",
    )


def inner_parameters(params: LinesParams, models: list[LinesModelParams]) -> tuple[Any, list[Any]]:
    """Return the inner method's typed (global, per-model) parameters; MethodError if invalid."""
    method = INNER[params.inner]
    glob, defaults = method.split_defaults(params.inner_params, where="inner_params")
    _, allowed = method.parameter_names()
    rows = []
    for i, m in enumerate(models):
        own = m.model_dump(exclude_none=True, exclude_defaults=False)
        extra = sorted(set(own) - allowed)
        if extra:
            raise MethodError(
                f"models[{i}]: parameter(s) {', '.join(extra)} do not apply to the inner "
                f"method '{method.name}'",
                fix=f"its per-model parameters are: {', '.join(sorted(allowed))}",
            )
        rows.append({**defaults, **own})
    return method.validate(glob, rows)


@dataclass(frozen=True)
class LinesStatistic:
    """Result of :class:`MergedNormRatio`: the auto alpha and the inner method's statistic."""

    alpha: float
    inner: Any = None


class MergedNormRatio:
    """Whole-model ``|sum_t tau_t| / |tau_MTL|`` for ``alpha: auto``; wraps the inner statistic.

    The inner method's own statistic (TIES with ``trim_scope: model``) runs first; in the
    last pass each tensor's K task vectors are buffered (they arrive model 0 to K - 1) and
    merged by the inner method on a zero base. Memory: K task vectors of one tensor.
    Implements :class:`~supermerge.methods.registry.ModelStatistic`.
    """

    def __init__(self, inner: Method, glob: Any, models: list[Any]) -> None:
        self._inner, self._glob, self._models = inner, glob, models
        self._inner_stat: ModelStatistic | None = (
            inner.statistic(glob, models) if inner.statistic is not None else None
        )
        self._inner_passes = self._inner_stat.passes if self._inner_stat is not None else 0
        self.passes = self._inner_passes + 1
        self._inner_result: Any = None
        self._buffer: list[torch.Tensor] = []
        self._summed_sq = 0.0
        self._merged_sq = 0.0

    def observe(self, pass_index: int, model_index: int, task_vector: torch.Tensor) -> None:
        """Feed the inner statistic, or buffer and merge one tensor's task vectors."""
        if pass_index < self._inner_passes:
            assert self._inner_stat is not None
            self._inner_stat.observe(pass_index, model_index, task_vector)
            return
        self._buffer.append(task_vector.float())
        if len(self._buffer) < len(self._models):
            return
        taus, self._buffer = self._buffer, []
        zero = torch.zeros_like(taus[0])
        ctx = TensorContext(statistic=self._inner_result)
        merged = self._inner.fn(zero, taus, self._glob, self._models, ctx)
        summed = weighted_sum(taus, [1.0] * len(taus))
        self._summed_sq += float(summed.double().square().sum())
        self._merged_sq += float(merged.double().square().sum())

    def finish_pass(self, pass_index: int) -> None:
        """Finish the inner statistic's passes and keep its result."""
        if pass_index < self._inner_passes:
            assert self._inner_stat is not None
            self._inner_stat.finish_pass(pass_index)
            if pass_index == self._inner_passes - 1:
                self._inner_result = self._inner_stat.result()

    def result(self) -> LinesStatistic:
        """Return the auto alpha (ratio 1 when the merged norm is 0) and the inner result."""
        ratio = 1.0 if self._merged_sq == 0 else math.sqrt(self._summed_sq / self._merged_sq)
        return LinesStatistic(alpha=ratio / len(self._models), inner=self._inner_result)


def lines_statistic(
    params: LinesParams, models: list[LinesModelParams]
) -> ModelStatistic | None:
    """Return the statistic ``lines`` needs: the auto alpha's, else the inner method's."""
    inner = INNER[params.inner]
    glob, inner_models = inner_parameters(params, models)
    if params.alpha == "auto":
        return MergedNormRatio(inner, glob, inner_models)
    return inner.statistic(glob, inner_models) if inner.statistic is not None else None


def merge_lines(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: LinesParams,
    models: list[LinesModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return ``base + (alpha + beta * position) * (inner merge - base)``.

    Cost: the inner method's, plus one subtraction and one multiply-add in its result's
    buffer (the inner methods return a buffer of their own, never the base).
    """
    inner = INNER[params.inner]
    try:
        glob, inner_models = inner_parameters(params, models)
    except MethodError as err:
        raise MethodError(err.message, tensor=ctx.name or None, fix=err.fix) from None
    alpha = params.alpha
    if alpha == "auto":
        stat = ctx.statistic
        if not isinstance(stat, LinesStatistic):
            raise MethodError(
                "lines with alpha: auto needs the whole-model norm ratio",
                tensor=ctx.name or None,
                fix="run the merge through the engine (or Method.__call__), which computes "
                "it, or give alpha a number",
            )
        alpha, ctx = stat.alpha, replace(ctx, statistic=stat.inner)
    merged = inner.fn(base, experts, glob, inner_models, ctx)
    outside_blocks = bool(ctx.name) and layer_index(ctx.name) is None
    scale = alpha + params.beta * (0.0 if outside_blocks else ctx.position)
    if scale == 1:
        return merged
    return torch.add(base, merged.sub_(base), alpha=scale, out=merged)


lines = register(
    Method(
        name="lines",
        fn=merge_lines,
        params=LinesParams,
        model_params=LinesModelParams,
        summary="scale the task vector of task arithmetic, TIES or Consensus linearly with "
        "layer depth (alpha + beta * depth)",
        paper="Wang et al. 2024, LiNeS: Post-training Layer Scaling Prevents Forgetting and "
        "Enhances Model Merging (arXiv 2410.17146)",
        needs="none",
        statistic=lines_statistic,
    )
)
