"""``opcm``: OPCM, continual merging by orthogonal projection and adaptive scaling.

The experts are merged one at a time, in the order listed, with ``tau_t = w_t (x_t - base)``
and norms taken over the whole model (every merged tensor, flattened into one vector)::

    S_1      = tau_1
    S_t      = S_t-1 + P_t-1(tau_t)                          t = 2 .. K
    lambda_t = ||S_t|| / ((1/t) sum_{i <= t} ||tau_i||)
    merged_t = base + S_t / lambda_t

which is the paper's ``theta_t = theta_0 + (lambda_t-1 dtheta_t-1 + P(dtheta_t)) / lambda_t``
with ``dtheta_t = merged_t - base`` (so ``S_t = lambda_t dtheta_t``): the merged task vector
keeps the average norm of the task vectors merged so far. ``P_t-1`` projects a 2-D tensor
away from the running update's principal subspace; with ``S_t-1 = U diag(s) V^T`` (its c
non-zero singular components, ``s`` descending)::

    A        = U^T tau V                                      (c x c)
    r_alpha  = #{k : sum_{i <= k} s_i <= alpha sum_i s_i}     (the principal directions)
    R_ij     = A_ij  if i = j, or i < r_alpha and j < r_alpha; else 0
    P(tau)   = tau - U R V^T

Dropping the diagonal makes ``<P(tau), S_t-1>_F = 0`` exactly (the new update is orthogonal
to the merged one); dropping the top-left block removes the new task's components inside
the subspace the merged tasks rely on most. Every other tensor (0-d, 1-D, 3-D and up) is
not projected: ``S_t = S_t-1 + tau_t``, scaled by the same ``1 / lambda_t``, so it is a sum
rescaled to the average norm, not a running average (with mutually orthogonal task vectors
of equal norms ``lambda_t = sqrt(t)``).

Paper: Tang, Yang, Shen, Luo, Hu, Du & Tao 2025, "Merging Models on the Fly Without
Retraining: A Sequential Approach to Scalable Continual Model Merging" (NeurIPS 2025,
arXiv 2501.09522). Only the paper's abstract and the update rule above (as later papers
quote it) could be read here; the projection, the split rank, the whole-model norms and the
treatment of non-matrix tensors follow the authors' code (FusionBench's ``OPCMForCLIP``),
with ``alpha`` 0.5 as in their configurations. Where we differ from that code:

* the code projects only ``nn.Linear`` weights and sums embeddings like biases; here, as
  in every subspace method of this library, every 2-D tensor is projected;
* the code zeroes the diagonal of the full ``U^T tau V``, including directions where the
  running update is zero, whose singular vectors are arbitrary (they depend on the SVD
  routine); here only the non-zero components are used, which is the same whenever the
  running update has full rank (the usual case) and deterministic otherwise;
* the code's split rank with ``alpha = 1`` comes out 0 (a floating-point comparison);
  here ``alpha = 1`` removes the whole principal block, as the definition says;
* a running update of norm 0 (all task vectors zero) gives the base, where the code
  divides by zero.

Continual use: a merge records ``tasks`` (K), ``norm_sum`` (``sum_i ||tau_i||``) and
``lambda`` (``lambda_K``) in its ``merge_state.json``; a later merge enters that output
first with those as its per-model parameters (``running_scale`` = ``lambda_K``), so
``S_K = lambda_K (merged_K - base)`` is rebuilt from the merged model and experts 1..K are
never read again. The result equals merging all experts at once in the same order up to
the rounding of the stored merged model (none beyond float32 rounding for float32 models).

Properties: one expert gives ``base + tau_1`` (``lambda_1 = 1``); K copies of one expert
give it back exactly on the matrices' share only: ``P(tau) = 0`` against itself, while its
other tensors add up K times before the whole model is rescaled. The result depends on the
order (benchmarks/opcm_order.py measures how much). Cost: the running sum is computed twice
(once for the whole-model norm, once to write): per matrix ``2 (K - 1)`` thin SVDs of an
m x n matrix; memory, the running sum and one task vector of one tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from supermerge.errors import MethodError
from supermerge.methods.primitives import Weight, nonzero_svd, task_vectors
from supermerge.methods.registry import Method, ModelParams, Params, TensorContext, register


class OpcmParams(Params):
    """Global parameters of ``opcm``."""

    alpha: float = Field(
        0.5, ge=0.0, le=1.0,
        description="share of the running update's singular-value mass whose directions "
        "the next task vector is projected away from (paper's code: 0.5)")


class OpcmModelParams(ModelParams):
    """Per-model parameters of ``opcm``; the last three describe a merged model continued."""

    weight: Weight = Field(1.0, description="scales this model's task vector before the merge")
    tasks: int = Field(1, ge=1, description="experts this model holds (a previous opcm "
                       "merge, entered first; from its merge_state.json)")
    norm_sum: float | None = Field(
        None, ge=0.0, allow_inf_nan=False,
        description="sum of the whole-model task-vector norms of the experts it holds "
        "(None: its own task vector's norm)")
    running_scale: float = Field(
        1.0, gt=0.0, allow_inf_nan=False,
        description="lambda of the merge it came from: running sum = this x its task vector")


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """Return ``r_alpha``: how many leading singular values (``s`` descending) keep their
    cumulative sum within ``alpha`` of the total. Cost: one cumulative sum."""
    if s.numel() == 0:
        return 0
    cumulative = s.double().cumsum(0)
    return int((cumulative / cumulative[-1] <= alpha).sum())


def orthogonal_part(running: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """Return ``P(tau)``: ``tau`` without its components on the running update's diagonal
    directions ``u_i v_i^T`` and on its top ``r_alpha`` x ``r_alpha`` block ``u_i v_j^T``.

    A zero ``running`` leaves ``tau`` as it is (returned, not copied). Cost: one thin SVD
    of ``running`` and three products through its c non-zero components.
    """
    u, s, vh = nonzero_svd(running)
    if s.numel() == 0:
        return tau
    inner = u.T @ tau @ vh.T
    r = split_rank(s, alpha)
    removed = torch.diag_embed(inner.diagonal())
    removed[:r, :r] = inner[:r, :r]
    return tau - u @ removed @ vh


def add_task_(running: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """Return ``running + P(tau)`` in ``running``'s buffer (no projection unless 2-D)."""
    return running.add_(orthogonal_part(running, tau, alpha) if tau.dim() == 2 else tau)


def running_sum(taus: Iterable[torch.Tensor], models: list[OpcmModelParams],
                alpha: float) -> torch.Tensor:
    """Return ``S_K`` of one tensor from its task vectors in merge order (each overwritten).

    The first model's task vector is scaled by its ``weight`` and ``running_scale`` (a
    continued merge's ``lambda``), the others by their weights. Cost: K - 1 projections.
    """
    total: torch.Tensor | None = None
    for tau, model in zip(taus, models, strict=True):
        if total is None:
            total = tau.mul_(model.weight * model.running_scale)
        else:
            total = add_task_(total, tau.mul_(model.weight), alpha)
    assert total is not None
    return total


@dataclass(frozen=True)
class OpcmState:
    """The whole-model quantities of an OPCM merge: what its ``merge_state.json`` records."""

    tasks: int  # experts merged, K
    norm_sum: float  # sum_i ||tau_i|| over them
    running_norm: float  # ||S_K||

    @property
    def lam(self) -> float:
        """``lambda_K = ||S_K|| / mean_i ||tau_i||`` (1 when nothing moved)."""
        if self.running_norm == 0 or self.norm_sum == 0:
            return 1.0
        return self.running_norm / (self.norm_sum / self.tasks)

    @property
    def factor(self) -> float:
        """``1 / lambda_K``, 0 when ``S_K`` is zero (the merge is then the base)."""
        return 0.0 if self.running_norm == 0 else 1.0 / self.lam


class OpcmNorms:
    """Whole-model statistic of ``opcm``: the task-vector norms and ``||S_K||`` in one pass.

    Each tensor's task vectors arrive model 0 to K - 1: the running sum of that tensor is
    folded as they come, its squared norm added once the last has arrived. Memory: the
    running sum and one task vector of one tensor. Implements ModelStatistic.
    """

    passes = 1

    def __init__(self, params: OpcmParams, models: list[OpcmModelParams]) -> None:
        self._alpha = params.alpha
        self._models = models
        self._squares = [0.0] * len(models)
        self._running_sq = 0.0
        self._total: torch.Tensor | None = None

    def observe(self, pass_index: int, model_index: int, task_vector: torch.Tensor) -> None:
        """Fold one task vector into the tensor's running sum (and its model's norm)."""
        model = self._models[model_index]
        tau = task_vector.float() * model.weight  # a new tensor: the input is not kept
        self._squares[model_index] += _square(tau)
        if model_index == 0:
            self._total = tau.mul_(model.running_scale)
        else:
            assert self._total is not None
            self._total = add_task_(self._total, tau, self._alpha)
        if model_index == len(self._models) - 1:
            self._running_sq += _square(self._total)
            self._total = None

    def finish_pass(self, pass_index: int) -> None:
        """Nothing to do: one pass."""

    def result(self) -> OpcmState:
        """Return the merged count, the summed task-vector norms and ``||S_K||``."""
        norms = [abs(m.weight) * m.norm_sum if m.norm_sum is not None else math.sqrt(sq)
                 for m, sq in zip(self._models, self._squares, strict=True)]
        return OpcmState(tasks=sum(m.tasks for m in self._models), norm_sum=math.fsum(norms),
                         running_norm=math.sqrt(self._running_sq))


def _square(x: torch.Tensor) -> float:
    return float(x.double().square().sum())


def opcm_statistic(params: OpcmParams, models: list[OpcmModelParams]) -> OpcmNorms:
    """Return the statistic; MethodError if a model other than the first is a merged one."""
    for i, model in enumerate(models[1:], start=1):
        if model.tasks != 1 or model.norm_sum is not None or model.running_scale != 1:
            raise MethodError(
                f"models[{i}] carries the state of a merged model (tasks, norm_sum or "
                "running_scale): only the first model can be a merge that is continued",
                fix="enter the merged model first (`continual:` in the recipe, or "
                "`supermerge merge --into MERGED`), the new experts after it")
    return OpcmNorms(params, models)


def merge_opcm(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: OpcmParams,
    models: list[OpcmModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return ``base + S_K / lambda_K`` for one tensor (``ctx.statistic``: OpcmState).

    Cost: :func:`running_sum` (K - 1 thin SVDs for a matrix), in the experts' buffers when
    ``ctx.scratch`` (else K new task vectors, one alive at a time besides the sum).
    """
    state = ctx.statistic
    if not isinstance(state, OpcmState):
        raise MethodError("opcm needs its whole-model norms (OpcmState) in ctx.statistic",
                          tensor=ctx.name or None,
                          fix="merge through the engine or call the method object, which "
                          "compute them")
    total = running_sum(task_vectors(base, experts, in_place=ctx.scratch), models, params.alpha)
    return torch.add(base, total, alpha=state.factor, out=total)


def opcm_record(state: OpcmState) -> dict[str, Any]:
    """The ``merge_state.json`` record of an OPCM merge (what continuing it needs)."""
    return {"tasks": state.tasks, "norm_sum": state.norm_sum, "lambda": state.lam,
            "running_norm": state.running_norm}


def opcm_resume(record: Mapping[str, Any]) -> dict[str, Any]:
    """The per-model parameters of a merged model entered first, from its record."""
    return {"tasks": record["tasks"], "norm_sum": record["norm_sum"],
            "running_scale": record["lambda"]}


opcm = register(
    Method(
        name="opcm",
        fn=merge_opcm,
        params=OpcmParams,
        model_params=OpcmModelParams,
        summary="continual: experts one at a time in the listed order, each matrix's task "
        "vector projected off the running update's principal subspace, the sum rescaled to "
        "the mean task-vector norm (OPCM); `--into` continues a merge",
        paper="Tang et al. 2025, Merging Models on the Fly Without Retraining: A Sequential "
        "Approach to Scalable Continual Model Merging (arXiv 2501.09522)",
        needs="none",
        statistic=opcm_statistic,
        state=opcm_record,
        resume=opcm_resume,
    )
)
