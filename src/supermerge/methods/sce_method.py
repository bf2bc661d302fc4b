"""``sce``: Select, Calculate, Erase, FuseChat's matrix-level merge of task vectors.

Formula, per tensor, with ``tau_i = x_i - base`` of ``n`` entries and ``K`` experts::

    Select:    v = Var_i(tau_i) (population variance across the models, per entry);
               when select_topk < 1, keep in every tau_i only the round(select_topk * m)
               entries of largest v, m = #{v != 0}; zero the rest
    Calculate: w_i = mean(tau_i^2) / sum_j mean(tau_j^2)   (1 / K when every tau_i is 0)
    Erase:     gamma = sign(sum_i tau_i);  A = {i : sign(tau_i) = gamma}   per entry
    merged   = base + sum_{i in A} w_i tau_i / sum_{i in A} w_i

Paper: Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models" (arXiv 2408.07990),
section on merging: select the salient positions by their variance across the target
models, weight each model's matrix by its share of the squared task vectors, and erase
sign conflicts as TIES does. As in mergekit's ``sce`` (``mergekit/merge_methods/sce.py``),
whose parameter names and defaults are used: ``select_topk`` 1.0 (no selection),
``int8_mask`` false (accepted; it changes nothing here, where masks are boolean and the
computation is float32). Unweighted: the weights are computed.

With ``select_topk < 1`` and a single model (or identical ones) every variance is 0, so
nothing is selected and the result is the base, in mergekit as here.

Differences from mergekit:

* mergekit falls back to equal weights whenever ``sum_j mean(tau_j^2) < 1e-6``, i.e. for
  any tensor whose task vectors have an RMS below about 1e-3 / sqrt(K) (most of a
  fine-tuned LLM's); we fall back only when that sum is exactly 0, as the paper's
  formula needs, so the weights are the paper's at every scale;
* mergekit divides by ``max(sum_{i in A} w_i, 1e-6)``; we divide by the sum itself
  (where it is 0 no model agrees and the entry merges to 0 in both);
* mergekit turns a zero summed sign into +1; we leave it 0 (the entry merges to 0), as
  ``ties`` does; mergekit keeps ``int(select_topk * m)`` positions (floor), ties in
  ``torch.topk`` order; we round and keep ties lowest index first;
* a ``weight`` is accepted and ignored, as in mergekit (whose ``sce`` has none).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field

from supermerge.methods.primitives import (
    INT8_MASK_NOTE,
    Density,
    IgnoredWeightModelParams,
    keep_count,
    sign_consensus_,
    task_vectors,
    top_k_mask,
)
from supermerge.methods.registry import Method, Params, TensorContext, register


class SceParams(Params):
    """Global parameters of ``sce``."""

    select_topk: Density = Field(
        1.0,
        description="fraction of the positions of non-zero variance across the models kept "
        "(largest variance first); 1: no selection",
    )
    ignored: ClassVar[dict[str, str]] = {"int8_mask": INT8_MASK_NOTE}

    int8_mask: bool = Field(
        False,
        description="accepted for mergekit recipes; changes nothing (boolean masks, float32 "
        "compute)",
    )


def variance_across(taus: list[torch.Tensor]) -> torch.Tensor:
    """Return the population variance across ``taus`` of each entry, a new tensor.

    Cost: two temporaries (the mean and the result) and 2K passes.
    """
    mean = torch.zeros_like(taus[0])
    for tau in taus:
        mean.add_(tau)
    mean.div_(len(taus))
    total = torch.zeros_like(mean)
    for tau in taus:
        total.add_(torch.sub(tau, mean).square_())
    return total.div_(len(taus))


def sce_weights(taus: list[torch.Tensor]) -> list[float]:
    """Return ``mean(tau_i^2) / sum_j mean(tau_j^2)``, or ``1 / K`` each when all are 0."""
    energies = [float(torch.linalg.vector_norm(tau, dtype=torch.float64)) ** 2 for tau in taus]
    total = math.fsum(energies)
    if total == 0:
        return [1.0 / len(taus)] * len(taus)
    return [e / total for e in energies]


def merge_sce(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: SceParams,
    models: list[IgnoredWeightModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return the SCE merge.

    Cost: with selection, the variance (two temporaries), a top-k and a mask; then K norms
    and TIES's election and disjoint mean; in the experts' buffers when ``ctx.scratch``,
    else K new task vectors.
    """
    taus = list(task_vectors(base, experts, in_place=ctx.scratch))
    if params.select_topk < 1:
        variance = variance_across(taus)
        k = keep_count(params.select_topk, int(torch.count_nonzero(variance)))
        keep = top_k_mask(variance, k)
        del variance
        for tau in taus:
            tau.mul_(keep)
    weights = sce_weights(taus)  # the sum of squares: n * mean(tau^2), n cancels
    merged = sign_consensus_(taus, weights, normalize=True, sign_on_weighted=False)
    return torch.add(base, merged, out=merged)


sce = register(
    Method(
        name="sce",
        fn=merge_sce,
        params=SceParams,
        model_params=IgnoredWeightModelParams,
        summary="select high-variance positions, weight each model by its squared task "
        "vector's share, erase sign conflicts (TIES), average",
        paper="Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (SCE, "
        "arXiv 2408.07990)",
        needs="none",
    )
)
