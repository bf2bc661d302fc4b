"""``pcb``: PCB-merging, balance parameter competition within and across tasks, keep the top.

Formula, per tensor of ``d`` entries, with ``tau_i = x_i - base`` and ``K`` experts (the
official code's formulas, see below)::

    a_i     = clip(|tau_i|)                  the floor(clip * d) smallest and largest
                                             magnitudes pulled in to their neighbours
    t_i     = sign(tau_i) * a_i
    intra_i = exp(K * minmax(a_i)^2)         intra-balancing (self-competition)
    inter_i = tanh(tau_i * sum_j tau_j)      inter-balancing (cross-task competition)
    s_i     = intra_i * inter_i              the balancing score
    q_i     = k-th largest of s_i,  k = max(1, round(ratio * d))
    g_i     = (max(s_i, q_i) - q_i) / (max(s_i) - q_i)    in [0, 1]; drop the rest
    merged  = base + lambda * sum_i w_i g_i t_i / sum_i g_i    (0 where sum_i g_i = 0)

``minmax(v) = (v - min v) / (max v - min v)`` over the tensor (0 for a constant tensor).

Paper: Du et al. 2024, "Parameter Competition Balancing for Model Merging" (NeurIPS 2024,
arXiv 2410.02396), Section 3: intra-balancing ``beta_intra,i = Softmax(N * Norm(tau_i *
tau_i))``, inter-balancing ``beta_inter,i = sum_j Softmax(Norm(tau_i * tau_j))``,
``beta_i = beta_intra,i * beta_inter,i``, drop ``m_i = beta_i >= sorted(beta_i)[(1 - r) D]``,
rescale ``tau_m = sum_i (m_i beta_i) tau_i / sum_i m_i beta_i``. (Equation numbers could
not be checked against the paper text here; the formulas above are as the paper writes
them, transcribed also in mergekit's PCB branch.)

Our reading: we implement the authors' released code (``pcb-merging.py``), which produced
the paper's numbers and differs from the equations as written: the softmax over all
entries becomes ``exp`` (the normaliser is a per-task constant), ``Norm`` is a min-max
normalisation of ``|tau|`` (then squared) rather than of ``tau * tau``; inter-balancing is
``tanh(tau_i * sum_j tau_j)`` rather than a sum of softmaxes; and the kept scores are
min-max normalised from the threshold (``g_i``) before the weighted mean, whose terms are
the clipped ``t_i``. Signs matter: a negative ``tanh`` (conflict with the summed direction)
lowers the score.

Defaults: ``ratio = 0.1`` (the code's default; its example uses 0.05), ``clip = 1e-4`` (the
code's outlier clip), ``lambda = 1.0`` (the code then searches per-task coefficients in
[0.8, 1.3] on validation data; ``weight`` plays that role here, multiplying a task's term in
the numerator only, as those coefficients do).

Differences from the released code:

* per tensor, not over the whole flattened model (min-max, thresholds and clipping all
  see one tensor);
* clipping pulls in ``floor(clip * d)`` entries at each end; the code indexes
  ``sorted[int(d * (1 - clip)) - 1]``, which for tensors under 10,000 entries clips the
  single largest magnitude to the second largest;
* when the kept scores of a task all tie at its maximum (``max(s_i) = q_i``: a 0-d tensor,
  an all-zero or constant task vector, or ``k = 1``) the code divides 0 by 0 (NaN); we give
  the entries at the maximum weight 1 and the others 0. A task whose vector is zero then
  still counts in the denominator (it pulls the mean toward 0, like a zero task vector in
  an average);
* the k-th largest score itself gets weight 0, as in the code (so ``k - 1`` entries carry
  positive weight, ties aside); ``ratio`` must be > 0 (the code fails at 0).

mergekit's ``pcb`` (where present) transcribes the equations as written (softmax over the
entries, L2 ``normalize``), so its weights differ from the released code's and ours.
"""

from __future__ import annotations

import torch
from pydantic import Field

from supermerge.methods.primitives import (
    TaskVectorParams,
    Weight,
    keep_count,
    kthvalue,
    task_vectors,
    weighted_sum,
)
from supermerge.methods.registry import Method, ModelParams, TensorContext, register


class PcbParams(TaskVectorParams):
    """Global parameters of ``pcb``."""

    ratio: float = Field(
        0.1,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="fraction of each task's entries kept, by balancing score",
    )
    clip: float = Field(
        1e-4,
        ge=0.0,
        lt=0.5,
        allow_inf_nan=False,
        description="fraction of the smallest and of the largest magnitudes of each task "
        "vector clipped to their neighbours before scoring (outlier control)",
    )


class PcbModelParams(ModelParams):
    """Per-model parameters of ``pcb``."""

    weight: Weight = Field(
        1.0, description="multiplies this model's term in the numerator of the weighted mean"
    )


def _clip_magnitudes_(a: torch.Tensor, fraction: float) -> torch.Tensor:
    """Clamp the ``floor(fraction * d)`` smallest and largest entries of ``a`` inward, in place."""
    d = a.numel()
    m = int(fraction * d)
    if m == 0:
        return a
    return a.clamp_(kthvalue(a, m + 1), kthvalue(a, d - m))


def _minmax_(v: torch.Tensor) -> torch.Tensor:
    """Map ``v`` to ``(v - min) / (max - min)`` in place; zeros when ``v`` is constant."""
    low, high = v.min(), v.max()
    if high == low:
        return v.zero_()
    return v.sub_(low).div_(high - low)


def _keep_weights_(score: torch.Tensor, k: int) -> torch.Tensor:
    """Map the scores to the min-max weights of those above the k-th largest, in place."""
    threshold = kthvalue(score, score.numel() - k + 1)
    top = score.max()
    if top == threshold:
        return score.ge_(top)
    return score.clamp_min_(threshold).sub_(threshold).div_(top - threshold)


def merge_pcb(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: PcbParams,
    models: list[PcbModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return the PCB merge.

    Cost: 3 k-th values per task; the sum, the denominator and two temporaries besides the
    task vectors, which are the experts' buffers when ``ctx.scratch`` (else K new tensors).
    """
    if base.numel() == 0:
        return base.clone()
    taus = [tau.view(-1) for tau in task_vectors(base, experts, in_place=ctx.scratch)]
    count, d = len(taus), taus[0].numel()
    k = max(1, keep_count(params.ratio, d))
    total = weighted_sum(taus, [1.0] * count)
    numerator: torch.Tensor | None = None
    denominator: torch.Tensor | None = None
    for tau, m in zip(taus, models, strict=True):
        magnitude = _clip_magnitudes_(tau.abs(), params.clip)
        inter = torch.mul(tau, total).tanh_()
        clipped = tau.sign_().mul_(magnitude)  # t_i, in tau's buffer
        # exp(K (x^2 - 1)) = exp(K x^2) / e^K: the same weights g_i, never overflows
        score = _minmax_(magnitude).square_().sub_(1).mul_(count).exp_().mul_(inter)
        del inter
        weight = _keep_weights_(score, k)
        term = clipped.mul_(weight)
        if numerator is None or denominator is None:
            numerator, denominator = term.mul_(m.weight), weight
        else:
            numerator.add_(term, alpha=m.weight)
            denominator.add_(weight)
    assert numerator is not None and denominator is not None  # at least one expert
    dropped = denominator <= 0
    merged = numerator.div_(denominator.clamp_min_(1e-12)).masked_fill_(dropped, 0.0)
    merged = merged.view(base.shape)
    return torch.add(base, merged, alpha=params.scale, out=merged)


pcb = register(
    Method(
        name="pcb",
        fn=merge_pcb,
        params=PcbParams,
        model_params=PcbModelParams,
        summary="score entries by intra- and inter-task competition, keep each task's top "
        "ratio, average weighted by the scores",
        paper="Du et al. 2024, Parameter Competition Balancing for Model Merging "
        "(arXiv 2410.02396)",
        needs="none",
    )
)
