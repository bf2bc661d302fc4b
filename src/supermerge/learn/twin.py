"""Twin-Merging (Lu et al. 2024, *Twin-Merging: Dynamic Integration of Modular Expertise in
Model Merging*, arXiv 2406.15479): a shared expert, each task's compressed exclusive
knowledge, and a router that mixes them per input.

Formula, per merged tensor ``p`` and task ``t`` (``tau_t = theta_t - base``)::

    shared[p]     = base[p] + lambda * sum_t tau_t[p]       task arithmetic (or TIES)
    v_t[p]        = theta_t[p] - shared[p]                  task t's exclusive knowledge
    v~_t[p]       = U_r diag(S_r) V_r^T of v_t[p]           truncated SVD, 2-D tensors
    w(x)          = softmax(R(h(x)))                        R: the router, h: shared features
    theta_x[p]    = shared[p] + sum_t w_t(x) v~_t[p]        the weights input x runs on

``h(x)`` is what the task head reads when the shared model runs on ``x`` (the first
token's state for a head that reads every position: the paper's [CLS] embedding). The
router is a two-layer MLP over the standardised features, trained by cross-entropy to
tell which task's validation set an input comes from (the paper's router training; its
inputs are unlabelled). Tensors that are not matrices (biases, norms) are kept whole, as
is a matrix whose rank ``r`` is at least its smaller side (the truncation would be
lossless).

Output (:func:`export_outcome`): the shared model (an ordinary model, usable without the
router), ``twin.safetensors`` (``u.<t>.<name>`` = ``U_r diag(S_r)`` and ``v.<t>.<name>`` =
``V_r^T``, or ``full.<t>.<name>``, per task index ``t``; ``router.*``) and ``twin.json``
(tasks, rank, where the features are read). :func:`load_twin` / :class:`TwinModel` rebuild
the routed model; :func:`supermerge.load_task_model` returns it for a task (the router
picks the backbone's mixture, the task picks the head).

Differences from the reference code (LZY-the-boys/Twin-Merging, discriminative/): it
sparsifies each exclusive part by magnitude; here, as the paper describes, each matrix is
compressed by truncated SVD. Its router reads the mean of the shared model's last hidden
states and is a deeper MLP (batch norm, dropout, width 2d) trained for 50 epochs; here the
router reads what the task head reads (the mean-pooled states for pooled encoders, the
pooler output for a BERT classifier), standardised, through one hidden layer. Both route
each input on its own and mix the parts by the softmax of the router's logits.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from safetensors.torch import save
from torch import nn
from torch.func import functional_call

from supermerge.engine.task_state import side_description
from supermerge.errors import CheckpointError
from supermerge.io import open_checkpoint
from supermerge.learn.data import Task
from supermerge.learn.errors import LearnError
from supermerge.learn.features import (
    StartParams,
    data_free_merge,
    feature_site,
    head_features,
    head_inputs,
    pooled_features,
)
from supermerge.learn.method import ClosedForm, LearnedMethod, closed_form_run, register
from supermerge.learn.model import Head, eval_mode
from supermerge.learn.objectives import logits_of
from supermerge.learn.statistics import State, finish_state, prepare_pairs
from supermerge.progress import Progress

TWIN_FILE = "twin.safetensors"
TWIN_JSON = "twin.json"
FORMAT = "supermerge.twin/1"

Part = tuple[torch.Tensor, ...]
"""A task's exclusive part of one tensor: ``(full,)`` or the factors ``(U_r S_r, V_r^T)``."""


class TwinParams(StartParams):
    """Parameters of ``twin``: the merge of its shared expert, the parts, the router."""

    rank: int = Field(16, ge=1, description="rank of each matrix's exclusive part (SVD)")
    steps: int = Field(200, ge=1, description="router training steps (Adam)")
    lr: float = Field(1e-3, gt=0, description="router learning rate")
    hidden: int = Field(64, ge=1, description="width of the router's hidden layer")
    batch_size: int = Field(32, ge=1, description="examples per router step")
    seed: int = Field(0, description="seed of the router's initialisation and batches")


def compress(delta: torch.Tensor, rank: int) -> Part:
    """Return ``delta``'s exclusive part: ``(U_r diag(S_r), V_r^T)`` (float32) of its
    truncated SVD for a matrix with ``rank`` below its smaller side, else ``(delta,)``.

    Cost: one SVD of the matrix (float32).
    """
    if delta.dim() != 2 or rank >= min(delta.shape):
        return (delta,)
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]).contiguous(), vh[:rank].contiguous())


def dense(part: Part) -> torch.Tensor:
    """Return the tensor a part stands for: the full tensor, or ``U_r S_r @ V_r^T``."""
    return part[0] if len(part) == 1 else part[0] @ part[1]


def routed_tensor(shared: torch.Tensor, parts: Sequence[Part],
                  weights: torch.Tensor) -> torch.Tensor:
    """Return ``shared + sum_t weights[t] * dense(parts[t])`` in ``shared``'s dtype
    (computed in float32). Cost: one temporary of the tensor per task."""
    total = shared.float().clone()
    for weight, part in zip(weights.tolist(), parts, strict=True):
        if weight:
            total.add_(dense(part).float(), alpha=weight)
    return total.to(shared.dtype)


class Router(nn.Module):
    """The router: standardised features -> Linear -> ReLU -> Linear -> one logit per task.

    ``mean`` and ``std`` (buffers) are the training features' statistics.
    """

    def __init__(self, features: int, hidden: int, tasks: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, tasks))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return the routing logits ``[batch, tasks]``."""
        return self.net((features.float() - self.mean) / self.std)


def train_router(features: torch.Tensor, labels: torch.Tensor, tasks: int, *,
                 hidden: int = 64, steps: int = 200, lr: float = 1e-3, batch_size: int = 32,
                 seed: int = 0, progress: Progress | None = None) -> Router:
    """Return a :class:`Router` trained by cross-entropy to map ``features`` ``[n, f]`` to
    their task index ``labels`` ``[n]`` (Adam, minibatches drawn with ``seed``).

    Cost: ``steps`` forward/backward passes of a ``f x hidden x tasks`` MLP.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    router = Router(features.shape[1], hidden, tasks)
    router.mean.copy_(features.mean(0))
    router.std.copy_(features.std(0, unbiased=False).clamp_min(1e-6))
    optimiser = torch.optim.Adam(router.parameters(), lr=lr)
    for step in range(1, steps + 1):
        index = torch.randperm(len(features), generator=generator)[:batch_size]
        loss = nn.functional.cross_entropy(router(features[index]), labels[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if progress is not None:
            progress("twin router", step, steps)
    return router.eval()


def twin_merge(
    module: nn.Module,
    experts: Mapping[str, State],
    tasks: Sequence[Task],
    *,
    head_prefix: str | None = None,
    heads: Mapping[str, Head] | None = None,
    progress: Progress | None = None,
    merge: str = "task_arithmetic",
    scale: float = 0.3,
    density: float = 0.2,
    rank: int = 16,
    steps: int = 200,
    lr: float = 1e-3,
    hidden: int = 64,
    batch_size: int = 32,
    seed: int = 0,
) -> ClosedForm:
    """Twin-Merging: the shared expert's tensors, and the compressed exclusive parts and
    router as ``twin.safetensors`` / ``twin.json`` (see the module docstring).

    Experts and tasks are paired as Fisher and RegMean pair them; the router's classes
    are the experts in that order. Raises LearnError for unfit experts or a task without
    inputs. Costs reading every expert once, one SVD per matrix and expert, one forward
    pass of the shared model per example and ``steps`` router steps; holds the shared
    model and the K compressed parts.
    """
    names, pairs, aliases = prepare_pairs(module, experts, tasks, head_prefix, heads)
    empty = [task.name for _e, task, _h in pairs if len(task.data) == 0]
    if empty:
        raise LearnError(f"task(s) {empty} have no inputs to train the router on",
                         fix="give each task some validation inputs")
    merged = data_free_merge(module, experts, [e for e, _t, _h in pairs], names, merge,
                             scale, density)
    parts = {name: [compress(experts[e][name].float() - merged[name].float(), rank)
                    for e, _t, _h in pairs] for name in names}
    features, labels = [], []
    with eval_mode(module):
        for index, (_e, task, head) in enumerate(pairs):
            found = head_features(module, merged, feature_site(module, head_prefix, head),
                                  head, task)
            features.append(found)
            labels.append(torch.full((len(found),), index, dtype=torch.long))
    router = train_router(torch.cat(features), torch.cat(labels), len(pairs), hidden=hidden,
                          steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                          progress=progress)
    state = finish_state(module, experts, pairs[0][0], merged, names, aliases, head_prefix)
    description = {"format": FORMAT, "method": "twin", "tasks": [e for e, _t, _h in pairs],
                   "rank": rank, "shared": merge, "lambda": scale, "head_prefix": head_prefix,
                   "router": {"features": router.net[0].in_features, "hidden": hidden}}
    return ClosedForm(state, files={TWIN_FILE: _twin_tensors(parts, router),
                                    TWIN_JSON: json.dumps(description, indent=2) + "\n"},
                      notes=_card_note(description))


def _twin_tensors(parts: Mapping[str, Sequence[Part]], router: Router) -> bytes:
    """``twin.safetensors`` as bytes: each task's parts and the router's tensors."""
    tensors: dict[str, torch.Tensor] = {}
    for name, per_task in parts.items():
        for t, part in enumerate(per_task):
            if len(part) == 1:
                tensors[f"full.{t}.{name}"] = part[0].contiguous()
            else:
                tensors[f"u.{t}.{name}"], tensors[f"v.{t}.{name}"] = part
    for name, tensor in router.state_dict().items():
        tensors[f"router.{name}"] = tensor.detach().float().contiguous()
    return save(tensors)


def _card_note(description: Mapping[str, Any]) -> str:
    return (
        "## Twin-Merging: this model routes each input\n\n"
        f"The weights here are the shared expert ({description['shared']}); each task's "
        f"exclusive part (rank {description['rank']}) and the router are in `{TWIN_FILE}` "
        f"(`{TWIN_JSON}` describes them). Load the routed model of a task with "
        "`supermerge.load_task_model(\"<this directory>\", task)`.\n")


@dataclass(frozen=True)
class TwinState:
    """What a Twin-Merging output holds beside the shared model: task names, each merged
    tensor's parts per task, the router and the head prefix the features are read at."""

    tasks: tuple[str, ...]
    parts: dict[str, list[Part]]
    router: Router
    head_prefix: str | None


def read_twin(out_dir: str | Path) -> TwinState:
    """Return the :class:`TwinState` of a Twin-Merging output directory.

    Raises CheckpointError naming the file if ``twin.json`` or ``twin.safetensors`` is
    missing, malformed or incomplete. Cost: reads both files (the K compressed parts).
    """
    with side_description(out_dir, TWIN_JSON, FORMAT, "Twin-Merging",
                          missing="not a Twin-Merging output",
                          fix="merge with `merge_method: twin`") as data:
        tasks = tuple(str(t) for t in data["tasks"])
        router = Router(int(data["router"]["features"]), int(data["router"]["hidden"]),
                        len(tasks))
        head_prefix = data.get("head_prefix")
    tensors_file = Path(out_dir) / TWIN_FILE
    with open_checkpoint(tensors_file) as checkpoint:
        tensors = {name: checkpoint.read(name) for name in checkpoint.names()}
    routers = {k.removeprefix("router."): v for k, v in tensors.items() if k.startswith("router.")}
    try:
        router.load_state_dict(routers)
    except RuntimeError as exc:
        raise CheckpointError(f"the router's tensors do not fit twin.json: {exc}",
                              file=tensors_file, fix="merge again: the files differ") from None
    parts: dict[str, list[Part | None]] = {}
    for key, tensor in tensors.items():
        kind, _, rest = key.partition(".")
        if kind not in ("full", "u"):
            continue
        index, _, name = rest.partition(".")
        slots = parts.setdefault(name, [None] * len(tasks))
        slots[int(index)] = (tensor,) if kind == "full" else (tensor, tensors[f"v.{rest}"])
    incomplete = [name for name, slots in parts.items() if any(s is None for s in slots)]
    if incomplete:
        raise CheckpointError("a tensor lacks some task's exclusive part", file=tensors_file,
                              tensor=incomplete[0], fix="merge again: the file is incomplete")
    return TwinState(tasks, parts, router.eval(), head_prefix)  # type: ignore[arg-type]


@dataclass
class RoutedOutput:
    """What :class:`TwinModel` returns: ``logits`` and the ``routing`` weights
    ``[batch, tasks]`` each input ran with."""

    logits: torch.Tensor
    routing: torch.Tensor


_HOOKED = (nn.Linear, nn.Embedding, nn.LayerNorm)
"""Modules whose routed output is computed in one batched pass (their weight and bias)."""


def _part_output(module: nn.Module, x: torch.Tensor, parts: Mapping[str, Part]) -> torch.Tensor:
    """Return what one task's exclusive parts of ``module``'s weight and bias add to its
    output on input ``x``, without forming a weight: ``x V^T U^T`` for a low-rank linear
    weight, ``U[ids] V`` for an embedding, ``normalised(x) * dw + db`` for a layer norm."""
    weight, bias = parts.get("weight"), parts.get("bias")
    if isinstance(module, nn.Embedding):
        return weight[0][x] if len(weight) == 1 else weight[0][x] @ weight[1]
    if isinstance(module, nn.LayerNorm):
        x = nn.functional.layer_norm(x, module.normalized_shape, None, None, module.eps)
        added = x * weight[0] if weight is not None else torch.zeros_like(x)
    elif weight is None:
        added = torch.zeros(*x.shape[:-1], module.out_features, dtype=x.dtype)
    else:
        added = x @ weight[0].T if len(weight) == 1 else (x @ weight[1].T) @ weight[0].T
    return added + bias[0] if bias is not None else added


class TwinModel(nn.Module):
    """A model whose forward routes each input: the wrapped model (holding the shared
    weights and a task's head) runs input ``x`` on ``shared + sum_t w_t(x) v~_t``.

    ``site`` is the submodule whose input is the router's features (None: the model's
    output); ``prefix`` what the merged tensor names carry inside the model (e.g.
    ``encoder.`` for a pooled classifier). ``config`` is the wrapped model's. When every
    routed tensor is the weight or bias of a Linear, Embedding or LayerNorm, a batch runs
    in one pass, each module adding ``sum_t w_t(x) * part_t(x)`` to its output (low-rank
    parts applied to the activations, never expanded); otherwise each input runs on its
    own combined weights.
    """

    def __init__(self, model: nn.Module, twin: TwinState, site: nn.Module | None,
                 prefix: str = "") -> None:
        super().__init__()
        self.model, self.router, self.twin_tasks = model, twin.router, twin.tasks
        self._parts, self._site, self._prefix = twin.parts, site, prefix
        owned = dict(model.state_dict())
        missing = [n for n in twin.parts if prefix + n not in owned]
        if missing:
            raise CheckpointError(f"the model has no tensor {missing[0]!r} that the "
                                  "Twin-Merging parts name", tensor=missing[0],
                                  fix="load the model the merge produced")
        self._hooked: dict[nn.Module, dict[str, list[Part]]] | None = {}
        for name, parts in twin.parts.items():
            path, _, attribute = (prefix + name).rpartition(".")
            module = model.get_submodule(path)
            if not isinstance(module, _HOOKED) or attribute not in ("weight", "bias"):
                self._hooked = None
                break
            self._hooked.setdefault(module, {})[attribute] = parts

    @property
    def config(self) -> Any:
        """The wrapped model's config (labels, classes)."""
        return self.model.config

    def routing(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Return the routing weights ``[batch, tasks]`` (softmax of the router) of the
        inputs. Cost: one forward pass of the shared model."""
        found: list[torch.Tensor] = []
        with torch.no_grad(), head_inputs(self._site, found):
            output = self.model(*args, **kwargs)
        features = found[-1] if found else pooled_features(logits_of(output))
        return torch.softmax(self.router(features), dim=-1)

    def forward(self, *args: Any, **kwargs: Any) -> RoutedOutput:
        """Return each input's logits on its own routed weights, and the routing.

        Cost: the routing pass, then one pass with K low-rank corrections per routed
        module (or, for other modules, per input one pass and one combination of every
        routed tensor)."""
        weights = self.routing(*args, **kwargs)
        if self._hooked is None:
            return RoutedOutput(self._one_by_one(weights, args, kwargs), weights)
        handles = [module.register_forward_hook(self._hook(parts, weights))
                   for module, parts in self._hooked.items()]
        try:
            output = self.model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return RoutedOutput(logits_of(output), weights)

    @staticmethod
    def _hook(parts: Mapping[str, list[Part]], weights: torch.Tensor):  # noqa: ANN205
        """A forward hook adding ``sum_t w_t * part_t(x)``, each input its own ``w``."""

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor
                 ) -> torch.Tensor:
            shape = (len(weights),) + (1,) * (output.dim() - 1)
            for t in range(weights.shape[1]):
                task = {name: per_task[t] for name, per_task in parts.items()}
                added = _part_output(module, inputs[0], task)
                output = output + weights[:, t].reshape(shape).to(output.dtype) * added
            return output

        return hook

    def _one_by_one(self, weights: torch.Tensor, args: Sequence[Any],
                    kwargs: Mapping[str, Any]) -> torch.Tensor:
        """The logits of each input run on its own combined weights."""
        owned = dict(self.model.state_dict())
        logits = []
        for row in range(len(weights)):
            merged = {self._prefix + name: routed_tensor(owned[self._prefix + name], parts,
                                                         weights[row])
                      for name, parts in self._parts.items()}
            one = [a[row:row + 1] if isinstance(a, torch.Tensor) else a for a in args]
            named = {k: v[row:row + 1] if isinstance(v, torch.Tensor) else v
                     for k, v in kwargs.items()}
            logits.append(logits_of(functional_call(self.model, merged, tuple(one), named)))
        return torch.cat(logits)


def load_twin(model: nn.Module, out_dir: str | Path, *, head: nn.Module | None = None,
              prefix: str = "") -> TwinModel:
    """Return ``model`` (loaded with the shared weights of the Twin-Merging output at
    ``out_dir``) wrapped to route each input. ``head``: the submodule holding the task
    head when the merge had no head prefix (a pooled classifier's ``head``); ``prefix``:
    what the merged names carry inside ``model``. Cost: reading the parts and router."""
    twin = read_twin(out_dir)
    site = head if head is not None else feature_site(model, twin.head_prefix, None)
    return TwinModel(model, twin, site, prefix).eval()


TWIN = register(LearnedMethod(
    name="twin",
    summary="shared merged expert plus each task's SVD-compressed exclusive part, mixed per "
    "input by a router trained on validation inputs",
    paper="Lu et al. 2024, Twin-Merging: Dynamic Integration of Modular Expertise in Model "
    "Merging (arXiv 2406.15479)",
    needs="unlabelled",
    params=TwinParams,
    run=closed_form_run("twin", twin_merge, TwinParams),
    trains=True,
))
