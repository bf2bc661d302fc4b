"""``della``: DELLA-Merging, magnitude-ranked drop (MagPrune), sign election, fuse.

Formula, per tensor, with ``tau_i = x_i - base`` and MagPrune as in
:func:`supermerge.methods.primitives.magprune`::

    rank r of each entry within its row by |tau_i| (r = 0: the largest), m entries a row
    p_r    = (1 - density_i) - epsilon_i / 2 + epsilon_i * r / (m - 1)   drop probability
    d_i    = tau_i * Bernoulli(1 - p_r) / (1 - p_r)                        drop and rescale
    A      = {i : sign(d_i) = sign(sum_j d_j)}                             elect, per entry
    merged = base + lambda * sum_{i in A} w_i d_i / sum_{i in A} w_i         fuse

Paper: Deep, Bhardwaj & Poria 2024, "DELLA-Merging: Reducing Interference in Model Merging
through Magnitude-Based Sampling" (arXiv 2406.11617): Drop (MagPrune), Elect (the TIES sign
election), Fuse (mean of the agreeing deltas), then scale by lambda. Larger magnitudes get
smaller drop probabilities; the rescale ``1 / (1 - p_r)`` keeps each entry's expectation.
``della_linear`` is the same without the election (a DARE-like sum with MagPrune's
probabilities; mergekit's name for it). Seeded like DARE: the masks come from a
``torch.Generator`` seeded by (the tensor's seed, the model's index), reproducible and
independent of thread order.
The election options (``normalize``, ``sign_on_weighted``) and tie rules are those of
``ties``.

Reading of the paper: ranks are taken within each row of a matrix (the paper ranks the
deltas feeding each node; rows here are ``shape[0]``, the output units; 0-d and 1-D tensors
are one row); the drop probabilities run *exactly* from ``p - epsilon/2`` (the largest
entry) to ``p + epsilon/2`` (the smallest), so their mean is ``p`` (the paper steps by
``epsilon / m`` from ``p - epsilon/2``, a mean smaller by ``epsilon / 2m``). Magnitude ties
rank the lower index first.

Defaults are choices (the paper tunes ``p`` and ``epsilon`` per merge): density 0.5 as for
``dare_linear``, epsilon 0.1, lambda 1.0. ``epsilon / 2`` must not exceed ``density`` or
``1 - density`` (every keep probability in [0, 1]); at density 1 set epsilon 0.

Differences from mergekit's ``della`` / ``della_linear``:

* mergekit's ``epsilon`` is the half-width (keep probabilities in
  ``[density - epsilon, density + epsilon]``); ours is the paper's full width: mergekit's
  epsilon e is our 2e;
* mergekit (recent versions) does not divide kept entries by their keep probability
  unless asked to match a norm (``rescale_norm``); we rescale by ``1 / (1 - p_r)`` as in
  the paper (``rescale: false`` keeps kept entries unscaled in both; mergekit's
  ``rescale: true`` matches the L1 norm); ``int8_mask`` is accepted and changes nothing;
* mergekit ranks along dimension 1 of the tensor as stored, draws from the global
  generator, defaults density to 1.0 and turns a zero summed sign into +1 (see ``ties``).
"""

from __future__ import annotations

import torch

from supermerge.methods.primitives import (
    DropSignConsensusParams,
    MagPruneModelParams,
    add_sign_consensus_,
    magprune_task_vectors,
)
from supermerge.methods.registry import Method, TensorContext, register


def merge_della(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: DropSignConsensusParams,
    models: list[MagPruneModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Return the DELLA merge (MagPrune, elect, fuse).

    Cost: K row sorts and draws, then the sign and one accumulator; in place in the
    experts' buffers when ``ctx.scratch``, else K new task vectors; on up to
    ``ctx.threads`` threads.
    """
    densities, epsilons = [m.density for m in models], [m.epsilon for m in models]
    pruned = list(
        magprune_task_vectors(base, experts, densities, epsilons, ctx.seed, in_place=ctx.scratch,
                              rescale=params.rescale, threads=ctx.threads)
    )
    return add_sign_consensus_(base, pruned, models, params, threads=ctx.threads)


della = register(
    Method(
        name="della",
        fn=merge_della,
        params=DropSignConsensusParams,
        model_params=MagPruneModelParams,
        summary="drop task-vector entries with magnitude-ranked probabilities, rescale, "
        "then TIES sign election and mean",
        paper="Deep et al. 2024, DELLA-Merging (arXiv 2406.11617)",
        needs="none",
    )
)
