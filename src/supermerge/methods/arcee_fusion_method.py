"""``arcee_fusion``: keep only the changes of one model whose importance is an outlier.

Formula, per tensor, with ``x`` the one expert, ``tau = x - base`` and rows taken along the
last dimension (a 0-d tensor is one row of one entry)::

    p_r        = softmax(x_r) + 1e-8,   q_r = softmax(base_r) + 1e-8
    kl_r       = sum_j p_rj log(p_rj / q_rj)                  how much row r's softmax moved
    s          = |tau| * kl_(row)                             importance of each entry
    Q(a)       = the floor(a (n - 1)) + 1-th smallest of the n entries of s
    threshold  = Q(0.5) + 1.5 (Q(0.75) - Q(0.25))             median + 1.5 IQR
    merged     = base + tau * [s >= threshold]

Only the entries whose importance lies beyond Tukey's upper fence are taken from the
expert; every other entry keeps the base's value. When every importance is equal (a zero
task vector, or rows whose softmax did not move) the fence is that value and the whole
expert is taken (it equals the base where ``tau`` is 0).

Method: mergekit's ``arcee_fusion`` (``mergekit/merge_methods/arcee_fusion.py``; Arcee's
"Meet mergekit v0.1: Arcee Fusion" blog post); no paper, no parameters. Differences from
mergekit: it estimates the quartiles of tensors above 10^6 entries from a random sample of
10^6 (so its result varies from run to run); we take the exact order statistics
(:func:`~supermerge.methods.primitives.kthvalue`, linear time). mergekit takes the
softmax of a 0-d tensor along its only "dimension" and broadcasts to shape ``(1,)``; we
keep the tensor's shape. A ``weight`` is accepted and ignored, as in mergekit.
"""

from __future__ import annotations

import math

import torch

from supermerge.methods.primitives import IgnoredWeightModelParams, kthvalue
from supermerge.methods.registry import Method, Params, TensorContext, register

_EPS = 1e-8  # mergekit's: added to both softmaxes before the logarithm
_FENCE = 1.5  # Tukey's upper fence: median + 1.5 IQR


def fusion_importance(base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """Return ``|expert - base| * KL(softmax(expert) || softmax(base))`` per row.

    Rows run along the last dimension (a 0-d tensor is one row); both softmaxes get 1e-8
    added before the logarithm, as in mergekit. Cost: four temporaries of the tensor.
    """
    x, b = (t.reshape(1) if t.dim() == 0 else t for t in (expert, base))
    p = torch.softmax(x, dim=-1).add_(_EPS)
    q = torch.softmax(b, dim=-1).add_(_EPS)
    kl = torch.div(p, q).log_().mul_(p).sum(dim=-1, keepdim=True)
    return torch.sub(x, b).abs_().mul_(kl).view(expert.shape)


def fusion_threshold(importance: torch.Tensor) -> float:
    """Return ``median + 1.5 IQR`` of ``importance``, each quantile ``a`` the
    ``floor(a (n - 1)) + 1``-th smallest entry (mergekit's index rule). Cost: three exact
    order statistics."""
    n = importance.numel()

    def quantile(a: float) -> float:
        return float(kthvalue(importance, math.floor(a * (n - 1)) + 1))

    low, median, high = quantile(0.25), quantile(0.5), quantile(0.75)
    return median + _FENCE * (high - low)


def merge_arcee_fusion(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: Params,
    models: list[IgnoredWeightModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return ``base + tau * [importance >= median + 1.5 IQR]``.

    Cost: :func:`fusion_importance`, three order statistics and one mask; a new tensor.
    """
    (expert,) = experts
    importance = fusion_importance(base, expert)
    keep = importance >= fusion_threshold(importance)
    return torch.sub(expert, base).mul_(keep).add_(base)


arcee_fusion = register(
    Method(
        name="arcee_fusion",
        fn=merge_arcee_fusion,
        params=Params,
        model_params=IgnoredWeightModelParams,
        summary="take one model's changes only where |change| x the row's softmax KL "
        "divergence is above median + 1.5 IQR",
        paper="mergekit's arcee_fusion (Arcee, Meet mergekit v0.1: Arcee Fusion; no paper)",
        needs="none",
        min_models=1,
        max_models=1,
    )
)
