"""A merge written as a PEFT LoRA adapter (``output: adapter``) instead of a whole model.

The merged update ``merged - base`` of each targeted tensor is factored by a truncated SVD
(:func:`supermerge.methods.primitives.low_rank`) into ``B @ A`` at the recipe's ``rank``
with ``lora_alpha = rank`` (scale 1), in peft's key names; the relative Frobenius norm of
the SVD tail is each tensor's exact error bound. Targets are the modules the input adapters
target, or, when no input is an adapter, every float ``.weight`` of two or more dimensions
(embeddings as embedding LoRA). A tensor that changed but is no target is stored whole
when every float tensor of its module changed (the module goes into ``modules_to_save``),
else it is left out and reported with the size of the change it loses.
``supermerge extract`` is this with the ``passthrough`` method: the fine-tune's own update.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch

from supermerge.engine.plan import tensor_seed
from supermerge.io import Checkpoint, CheckpointWriter
from supermerge.io.lora import (
    LoraTarget,
    adapter_config,
    lora_matrix,
    peft_factors,
    saved_key,
)
from supermerge.methods.primitives import low_rank

log = logging.getLogger(__name__)

_EMBEDDING_HINTS = ("embed", "wte", "wpe", "word_embeddings", "shared.weight")
_TRANSPOSED_MODELS = ("gpt2",)  # transformers' Conv1D: weights stored [in, out]


@dataclass(frozen=True)
class FactorReport:
    """One factored tensor: its update's Frobenius norm, the share of its energy the rank
    keeps and the exact relative error ``|dW - B A|_F / |dW|_F``."""

    name: str
    norm: float
    energy: float
    relative_error: float


@dataclass
class AdapterReport:
    """What an adapter output holds and what it loses (for the log, result and card)."""

    rank: int
    factored: list[FactorReport] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    dropped: list[tuple[str, float]] = field(default_factory=list)  # (name, |dW| / |W0|)

    @property
    def energy(self) -> float:
        """Share of the squared norm of all factored updates the adapter keeps (1.0 when
        nothing was factored)."""
        total = sum(f.norm**2 for f in self.factored)
        kept = sum(f.norm**2 * f.energy for f in self.factored)
        return kept / total if total else 1.0

    @property
    def worst(self) -> FactorReport | None:
        """The factored tensor with the largest relative error, or None."""
        return max(self.factored, key=lambda f: f.relative_error, default=None)

    def markdown(self) -> str:
        """The model card's section: the rank, captured energy and per-tensor bounds."""
        rows = "\n".join(f"| `{f.name}` | {f.energy:.4f} | {f.relative_error:.4f} |"
                         for f in self.factored)
        text = (f"## LoRA adapter\n\nThe merged update factored at rank {self.rank} "
                f"(lora_alpha = r) by truncated SVD: {len(self.factored)} tensor(s), "
                f"{self.energy:.4f} of the update's energy captured.\n\n"
                "| tensor | energy kept | relative error (SVD tail) |\n|---|---|---|\n"
                f"{rows}\n")
        if self.modules_to_save:
            text += ("\nStored whole (modules_to_save): "
                     f"{', '.join(f'`{m}`' for m in self.modules_to_save)}.\n")
        if self.dropped:
            text += "\nChanged but not representable in the adapter, left out (|dW|/|W0|): "
            text += ", ".join(f"`{n}` ({r:.3g})" for n, r in self.dropped) + ".\n"
        return text


def lora_targets(reference: Checkpoint, adapters: list[Checkpoint]) -> dict[str, LoraTarget]:
    """The tensors an adapter output factors, by name: the modules the input adapters
    target when any input is one, else every float ``.weight`` of 2+ dimensions of
    ``reference``. Costs nothing: names and headers."""
    targets: dict[str, LoraTarget] = {}
    for ckpt in adapters:
        if ckpt.adapter is not None:
            for name, module in ckpt.adapter.modules.items():
                targets[name] = LoraTarget(name, module.kind, module.fan_in_fan_out)
    if targets:
        return targets
    transposed = (reference.config or {}).get("model_type") in _TRANSPOSED_MODELS
    for name, info in reference.infos().items():
        if not (info.is_float and name.endswith(".weight") and len(info.shape) >= 2):
            continue
        if any(hint in name for hint in _EMBEDDING_HINTS):
            targets[name] = LoraTarget(name, "embedding")
        elif len(info.shape) > 2:
            targets[name] = LoraTarget(name, "conv")
        else:
            targets[name] = LoraTarget(name, "linear", transposed and "lm_head" not in name)
    return targets


class AdapterSink:
    """Turns merged tensors into a PEFT adapter in a CheckpointWriter (``single_file``
    ``adapter_model.safetensors``). :meth:`add` each merged tensor with its base, then
    :meth:`finish`.

    Memory: the factors (r (m + n) numbers per target) and the changed tensors that are no
    target until :meth:`finish` decides whether their modules are stored whole (1-D norms
    and biases, in practice). Cost: one thin SVD per changed target, or with
    ``svd="randomized"`` a randomized one seeded by ``seed`` and the tensor's name
    (:func:`~supermerge.methods.primitives.low_rank`).
    """

    def __init__(self, reference: Checkpoint, targets: dict[str, LoraTarget], rank: int,
                 base_model: str | None, *, svd: str = "exact", seed: int = 0) -> None:
        self.report = AdapterReport(rank=rank)
        self._svd = svd
        self._seed = seed
        self._targets = targets
        self._rank = rank
        self._base_model = base_model
        self._modules: dict[str, list[str]] = {}  # module -> its float tensors
        for name, info in reference.infos().items():
            if info.is_float:
                self._modules.setdefault(_module_of(name), []).append(name)
        self._written: list[LoraTarget] = []
        self._pending: dict[str, tuple[torch.Tensor, float]] = {}  # changed, no target

    def add(self, writer: CheckpointWriter, name: str, merged: torch.Tensor,
            base: torch.Tensor, dtype: torch.dtype) -> None:
        """Take one merged tensor: factor its update into ``writer`` (in ``dtype``) if it
        is a target, keep it for :meth:`finish` if not; nothing when it equals the base."""
        if merged.shape == base.shape and torch.equal(merged, base):
            return
        delta = merged - base
        target = self._targets.get(name)
        if target is None:
            self._pending[name] = (merged.to(dtype), _relative(delta, base))
            return
        generator = None
        if self._svd == "randomized":
            generator = torch.Generator().manual_seed(tensor_seed(self._seed, name))
        factors = low_rank(lora_matrix(delta, target), self._rank, generator=generator)
        del delta
        for key, tensor in peft_factors(target, factors.p, factors.q, tuple(base.shape)).items():
            writer.add(key, tensor.to(dtype))
        self._written.append(target)
        self.report.factored.append(FactorReport(name, factors.norm, factors.energy,
                                                 factors.relative_error))
        log.info("%s: rank %d keeps %.4f of the update's energy (relative error %.4f)", name,
                 self._rank, factors.energy, factors.relative_error)

    def finish(self, writer: CheckpointWriter) -> AdapterReport:
        """Store whole the modules all of whose float tensors changed (none a target),
        report the other changed tensors, write ``adapter_config.json``; returns the report.
        Raises OutputError (aborting the writer) when nothing changed at all."""
        from supermerge.errors import OutputError

        factored = {t.module for t in self._written}
        saved = []
        for module, names in self._modules.items():
            if module in factored or not all(n in self._pending for n in names):
                continue
            for name in names:
                writer.add(saved_key(name), self._pending.pop(name)[0])
            saved.append(module)
        self.report.modules_to_save = sorted(saved)
        self.report.dropped = [(n, rel) for n, (_, rel) in self._pending.items()]
        self._pending.clear()
        if not self._written and not saved:
            writer.abort()
            raise OutputError(
                "the merge leaves every tensor an adapter can hold equal to the base: the "
                "adapter would be empty", file=writer.out,
                fix="check the recipe's weights, or write a model (leave out `output: adapter`)")
        for name, rel in self.report.dropped:
            log.warning("%s changed (|dW|/|W0| = %.3g) but is neither a LoRA target nor part "
                        "of a module stored whole: the adapter leaves it out", name, rel)
        config = adapter_config(base_model=self._base_model, rank=self._rank,
                                targets=self._written, modules_to_save=saved)
        writer.write_text("adapter_config.json", json.dumps(config, indent=2) + "\n")
        return self.report


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _relative(delta: torch.Tensor, base: torch.Tensor) -> float:
    norm = float(torch.linalg.vector_norm(base.double()))
    change = float(torch.linalg.vector_norm(delta.double()))
    return change / norm if norm else float("inf")
