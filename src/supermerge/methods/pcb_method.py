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


def _clip_magnitudes(a: torch.Tensor, fraction: float) -> torch.Tensor:
    """Clamp the ``floor(fraction * d)`` smallest and largest entries of ``a`` inward."""
    d = a.numel()
    m = int(fraction * d)
    if m == 0:
        return a
    low = torch.kthvalue(a, m + 1).values
    high = torch.kthvalue(a, d - m).values
    return a.clamp(low, high)


def _minmax(v: torch.Tensor) -> torch.Tensor:
    """Return ``(v - min) / (max - min)``; zeros when ``v`` is constant."""
    low, high = v.min(), v.max()
    if high == low:
        return torch.zeros_like(v)
    return (v - low) / (high - low)


def _keep_weights(score: torch.Tensor, k: int) -> torch.Tensor:
    """Return the min-max weights of the scores above the k-th largest (see the module)."""
    d = score.numel()
    threshold = torch.kthvalue(score, d - k + 1).values
    top = score.max()
    if top == threshold:
        return (score >= top).to(score.dtype)
    return (score.clamp_min(threshold) - threshold) / (top - threshold)


def merge_pcb(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: PcbParams,
    models: list[PcbModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return the PCB merge. Cost: K task vectors, 2 kthvalue calls per task, ~5 temporaries."""
    if base.numel() == 0:
        return base.clone()
    taus = [tau.reshape(-1) for tau in task_vectors(base, experts)]
    count, d = len(taus), taus[0].numel()
    k = max(1, keep_count(params.ratio, d))
    total = weighted_sum(taus, [1.0] * count)
    numerator = torch.zeros_like(total)
    denominator = torch.zeros_like(total)
    for tau, m in zip(taus, models, strict=True):
        magnitude = _clip_magnitudes(tau.abs(), params.clip)
        # exp(K (x^2 - 1)) = exp(K x^2) / e^K: the same weights g_i, never overflows
        intra = torch.exp(count * (_minmax(magnitude).square() - 1))
        score = intra * torch.tanh(tau * total)
        weight = _keep_weights(score, k)
        numerator.add_(weight * tau.sign() * magnitude, alpha=m.weight)
        denominator.add_(weight)
    merged = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-12), 0.0)
    return torch.add(base, merged.reshape(base.shape), alpha=params.scale)


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
