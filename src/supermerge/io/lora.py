"""PEFT LoRA adapters seen through their base model, and the names PEFT gives their tensors.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``)
opens as a :class:`~supermerge.io.checkpoint.Checkpoint` with the base's tensors, where
each module the adapter targets reads as ``W0 + scale * B @ A`` (computed on read, one
tensor at a time) and each tensor the adapter saves whole (``modules_to_save``, trained
biases) replaces the base's. mergekit's ``BASE+ADAPTER`` spelling names the base
explicitly. Everything is checked from the JSON config and the tensor headers when the
adapter is opened: no weight is read before a tensor is asked for.

PEFT's conventions, as ``peft`` 0.x saves them:

- keys ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (the adapter-name
  segment ``lora_A.<adapter>.weight`` appears when state dicts are saved by hand);
  embeddings ``<module>.lora_embedding_A`` / ``lora_embedding_B``; a trained LoRA bias
  ``<module>.lora_B.bias``; whole tensors ``base_model.model.<name>``, possibly with a
  ``modules_to_save.<adapter>.`` segment before the parameter name;
- shapes: linear ``A [r, in]``, ``B [out, r]`` (``fan_in_fan_out``: the base weight is
  ``[in, out]``); embedding ``A [r, num]``, ``B [dim, r]``, weight ``[num, dim]``;
  convolution ``A [r, in, *k]``, ``B [out, r, 1...]``;
- scale ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), with ``r`` and
  ``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern`` (regular expressions
  matched at the end of the module name, as peft's ``get_pattern_key`` does).
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from supermerge.errors import CheckpointError
from supermerge.io.checkpoint import (
    Checkpoint,
    TensorInfo,
    _member,
    _read_json,
    _SafetensorsStore,
    _Store,
    _TorchStore,
)
from supermerge.io.hub import resolve_cached

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFE_WEIGHTS = "adapter_model.safetensors"
ADAPTER_TORCH_WEIGHTS = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

Kind = Literal["linear", "embedding", "conv"]

_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")
_EMBEDDING_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?$")
# modules_to_save copies (``.modules_to_save.<adapter>.``) and the base layer peft saves
# with an adapted embedding (``.base_layer.``, save_embedding_layers) name the base's tensor
_SAVED_SEGMENT = re.compile(r"\.(?:modules_to_save\.[^.]+|base_layer)\.")
_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B",
                 ".lora_magnitude_vector")
# adapter_config.json keys whose non-default values change what the adapter computes in a
# way this reader does not reproduce: refused rather than merged wrongly.
_UNSUPPORTED_CONFIG = {
    "use_dora": "DoRA rescales each column by a learned magnitude",
    "layer_replication": "layer replication changes the base's architecture",
    "target_parameters": "LoRA on bare parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable tokens are not supported",
    "use_qalora": "QA-LoRA pools inputs before A",
    "use_bdlora": "block-diagonal LoRA is not supported",
}


@dataclass(frozen=True)
class LoraModule:
    """One module the adapter targets: ``target += scale * B @ A`` (in the kind's layout).

    ``a`` and ``b`` are the adapter's tensor names; ``bias`` the name of a trained LoRA
    bias (``lora_B.bias``, added to ``target_bias`` times ``scale``), else None.
    """

    module: str
    target: str
    kind: Kind
    a: str
    b: str
    rank: int
    scale: float
    fan_in_fan_out: bool = False
    bias: str | None = None
    target_bias: str | None = None


@dataclass
class Adapter:
    """A parsed PEFT LoRA adapter: its files, config and modules (names and shapes only).

    ``modules`` maps each targeted base tensor (``<module>.weight``) to its LoraModule;
    ``saved`` maps base tensor names the adapter stores whole to the adapter's key.
    """

    directory: Path
    weights: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(default_factory=dict)
    saved: dict[str, str] = field(default_factory=dict)

    @property
    def base_name(self) -> str | None:
        """``base_model_name_or_path`` of the config (a hub id or a path), else None."""
        value = self.config.get("base_model_name_or_path")
        return value if isinstance(value, str) and value else None


def is_adapter_dir(path: Path) -> bool:
    """True for a folder with ``adapter_config.json``; costs one stat."""
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def split_base_adapter(spelling: str) -> tuple[str, str] | None:
    """mergekit's ``BASE+ADAPTER``: (base, adapter) when ``spelling`` splits at a ``+``
    into an existing (or hub-cached) base and an existing adapter folder, else None.
    Costs a few stats."""
    for i, char in enumerate(spelling):
        if char != "+" or i in (0, len(spelling) - 1):
            continue
        base, adapter = spelling[:i], spelling[i + 1:]
        base_found = Path(base).exists() or resolve_cached(base) is not None
        if base_found and Path(adapter).exists():
            return base, adapter
    return None


def input_paths(spelling: str) -> list[str]:
    """The paths a model spelling reads: ``[base, adapter]`` for ``BASE+ADAPTER``, else
    ``[spelling]`` (for the output guard)."""
    pair = None if Path(spelling).exists() else split_base_adapter(spelling)
    return list(pair) if pair else [spelling]


def looks_like_lora_weights(names: Iterable[str]) -> bool:
    """True when tensor names are a LoRA adapter's (``...lora_A...``); names only."""
    return any(marker in name for name in names for marker in _LORA_MARKERS)


def bare_adapter_file_error(file: Path) -> CheckpointError:
    """The refusal of an adapter's weights file passed as a model (it is not one)."""
    folder = file.parent
    if (folder / ADAPTER_CONFIG).is_file():
        fix = (f"pass the adapter's folder {folder} (its base comes from adapter_config.json or "
               f"the recipe's base_model), or spell it BASE+{folder}")
    else:
        fix = ("put it in a folder with its adapter_config.json (as peft's save_pretrained "
               "writes it) and pass that folder, or BASE+FOLDER")
    return CheckpointError(
        "this file holds the weights of a LoRA adapter (lora_A/lora_B), not a model: merged "
        "as a model its tensors would match nothing and the base would come out unchanged",
        file=file, fix=fix)


def open_adapter(
    directory: str | Path, *, base: str | None = None, explicit_base: bool = False
) -> Checkpoint:
    """Open an adapter folder as a lazy view of its base with the adapter applied.

    The base is ``base`` when given (the recipe's ``base_model``, or the BASE of
    ``BASE+ADAPTER`` with ``explicit_base``), else the config's
    ``base_model_name_or_path`` (a local path or a hub id in the local cache). When both
    exist and name different models, a warning names both and ``base`` is used.

    Returns a Checkpoint whose ``adapter`` is the parsed :class:`Adapter`, whose config and
    model folder are the base's. Costs the base's and the adapter's headers; reading a
    targeted tensor costs one base read plus one rank-r product added in place (float32 or
    wider: the header keeps the base's dtype, the values are not rounded back to it).
    Raises CheckpointError naming the file, the tensor and the fix for anything the
    adapter holds that this reader would not merge exactly as peft does.
    """
    from supermerge.io.checkpoint import open_checkpoint

    directory = Path(directory)
    adapter = read_adapter(directory)
    base_path = _choose_base(adapter, base, explicit_base)
    base_ckpt = open_checkpoint(base_path)
    weights = None
    try:
        if base_ckpt.adapter is not None:
            raise CheckpointError(
                f"the base {base_path} is itself a LoRA adapter", file=directory,
                fix="pass the base model the adapter was trained on")
        weights = _open_weights(adapter.weights)
        _bind(adapter, base_ckpt, weights.infos)
        store = _LoraStore(adapter, base_ckpt, weights)
    except BaseException:
        if weights is not None:
            weights.close()
        base_ckpt.close()
        raise
    view = Checkpoint(directory, base_ckpt.model_dir, base_ckpt.config, store)
    view.adapter = adapter
    log.info("%s: LoRA adapter over %s (%d modules, %d saved tensors)", directory, base_path,
             len(adapter.modules), len(adapter.saved))
    return view


def read_adapter(directory: Path) -> Adapter:
    """Parse ``adapter_config.json`` and the weights' header (no weight is read); returns
    the Adapter with its tensor keys sorted into LoRA pairs and saved tensors, not yet bound
    to a base (no module has its target or scale). Raises CheckpointError for a non-LoRA
    or unsupported adapter, naming the config key or tensor."""
    config_file = _member(directory, ADAPTER_CONFIG)
    config = _read_json(config_file, "adapter config")
    if not isinstance(config, dict):
        raise CheckpointError("adapter_config.json is not a JSON object", file=config_file,
                              fix="repair it or save the adapter again with save_pretrained")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(
            f"a {peft_type} adapter: only LoRA adapters can be merged", file=config_file,
            fix="merge it into its base with peft (merge_and_unload) and pass that model")
    for key, why in _UNSUPPORTED_CONFIG.items():
        if config.get(key) not in (None, False, [], {}):
            raise CheckpointError(
                f"`{key}` is set: {why}", file=config_file,
                fix="merge the adapter into its base with peft (merge_and_unload, then "
                "save_pretrained) and pass that model folder")
    if (directory / ADAPTER_SAFE_WEIGHTS).is_file():
        weights = _member(directory, ADAPTER_SAFE_WEIGHTS)
    elif (directory / ADAPTER_TORCH_WEIGHTS).is_file():
        weights = _member(directory, ADAPTER_TORCH_WEIGHTS)
    else:
        raise CheckpointError(
            f"the adapter folder has no {ADAPTER_SAFE_WEIGHTS} (or {ADAPTER_TORCH_WEIGHTS})",
            file=directory, fix="the adapter is incomplete: save it again with save_pretrained")
    return Adapter(directory=directory, weights=weights, config=config)


def _choose_base(adapter: Adapter, base: str | None, explicit: bool) -> str:
    """The base to open: ``base`` if given (warning when the config names another model
    found on this machine), else the config's; CheckpointError when neither names one."""
    named = adapter.base_name
    if base is None:
        if named is None:
            raise CheckpointError(
                "the adapter names no base model (base_model_name_or_path is empty)",
                file=adapter.directory / ADAPTER_CONFIG,
                fix="set `base_model:` in the recipe, or spell the model BASE+ADAPTER")
        return named
    if named is not None and named != base:
        found = _local(named)
        where = "BASE+ADAPTER names" if explicit else "the recipe's base_model is"
        if found is not None and found != _local(base):
            log.warning("%s: the adapter was trained on %s (base_model_name_or_path) but %s "
                        "%s; using %s", adapter.directory, named, where, base, base)
        elif found is None:
            log.info("%s: base_model_name_or_path %s is not on this machine; using %s",
                     adapter.directory, named, base)
    return base


def _local(name: str) -> Path | None:
    """Where ``name`` (a path or a cached hub id) lives on this machine, resolved."""
    if Path(name).exists():
        return Path(name).resolve()
    cached = resolve_cached(name)
    return cached.resolve() if cached is not None else None


def _open_weights(file: Path) -> _Store:
    if file.suffix == ".safetensors":
        return _SafetensorsStore({file: None})
    return _TorchStore({file: None})


def _bind(adapter: Adapter, base: Checkpoint, infos: dict[str, TensorInfo]) -> None:
    """Sort the adapter's keys (``infos``, its weights' headers) into modules over ``base``
    and saved tensors, checking every name and shape against the base's headers; fills
    ``adapter.modules`` and ``adapter.saved``."""
    pairs: dict[str, dict[str, str]] = {}  # module -> {"A" / "B" / "bias": key}
    kinds: dict[str, Kind] = {}
    adapter_names: set[str] = set()
    for key in infos:
        name = key.removeprefix(PEFT_PREFIX)
        match = _LORA_KEY.match(name) or _EMBEDDING_KEY.match(name)
        if match is None:
            if "lora_magnitude_vector" in name:
                raise _refuse(adapter, key, "a DoRA magnitude vector: DoRA adapters are not "
                              "supported")
            if any(marker in f".{name}" for marker in _LORA_MARKERS) or ".lora_" in name:
                raise _refuse(adapter, key, "a LoRA tensor of a kind this reader does not know")
            target = _SAVED_SEGMENT.sub(".", name)
            if target not in base:
                raise _missing(adapter, key, target, base)
            adapter.saved[target] = key
            continue
        if match["adapter"]:
            adapter_names.add(match["adapter"])
        part = match["part"]
        slot = part[-1]  # "A" or "B"
        if match.groupdict().get("param") == "bias":
            if part != "lora_B":
                raise _refuse(adapter, key, "a bias on lora_A, which peft never trains")
            slot = "bias"
        kinds[match["module"]] = "embedding" if part.startswith("lora_embedding") else "linear"
        pairs.setdefault(match["module"], {})[slot] = key
    if len(adapter_names) > 1:
        raise CheckpointError(
            f"the weights hold {len(adapter_names)} adapters ({', '.join(sorted(adapter_names))})",
            file=adapter.weights, fix="save each adapter to its own folder and pass them as "
            "separate models")
    shapes = {name: info.shape for name, info in base.infos().items()}
    shapes.update({target: infos[key].shape for target, key in adapter.saved.items()})
    for module, keys in pairs.items():
        lora = _module(adapter, base, module, kinds[module], keys, infos, shapes)
        adapter.modules[lora.target] = lora


def _module(adapter: Adapter, base: Checkpoint, module: str, kind: Kind,
            keys: dict[str, str], infos: dict[str, TensorInfo],
            shapes: dict[str, tuple[int, ...]]) -> LoraModule:
    """One module's LoraModule, its shapes checked against the weight it updates (the
    base's, or the one the adapter saves whole), from headers."""
    for slot in ("A", "B"):
        if slot not in keys:
            other = keys.get("B" if slot == "A" else "A") or keys["bias"]
            raise _refuse(adapter, other, f"lora_{slot} of this module is missing")
    a, b = infos[keys["A"]], infos[keys["B"]]
    for info in (a, b):
        if not info.is_float:
            raise _refuse(adapter, info.name, f"dtype {info.dtype} is not a float dtype")
    target = f"{module}.weight"
    if target not in base:
        raise _missing(adapter, keys["A"], target, base)
    w_shape = shapes[target]
    config = adapter.config
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False)) and kind == "linear"
    if kind == "linear" and len(a.shape) > 2:
        kind = "conv"
    rank = a.shape[0] if a.shape else 0
    if len(b.shape) < 2 or b.shape[1] != rank:
        raise _refuse(adapter, b.name, f"rank mismatch: lora_A is {list(a.shape)} (rank "
                      f"{rank}) but lora_B is {list(b.shape)}")
    expected = _shape(kind, fan_in_fan_out, a.shape, b.shape)
    if fan_in_fan_out and expected != tuple(w_shape) and _shape(
            kind, False, a.shape, b.shape) == tuple(w_shape):
        # peft applies fan_in_fan_out to Conv1D layers only: an nn.Linear (GPT-2's lm_head)
        # in the same adapter keeps the usual layout, as its shapes show
        fan_in_fan_out = False
        expected = tuple(w_shape)
    if expected is None or tuple(w_shape) != expected:
        layout = "fan_in_fan_out " if fan_in_fan_out else ""
        raise CheckpointError(
            f"{layout}{kind} LoRA A {list(a.shape)}, B {list(b.shape)} gives a "
            f"{list(expected) if expected else '(malformed)'} update, but the base's "
            f"{target} is {list(w_shape)}", file=adapter.weights, tensor=keys["A"],
            fix="pass the base model this adapter was trained on"
            + (" (or set fan_in_fan_out as it was trained)" if kind == "linear" else ""))
    r = _pattern_value(config.get("rank_pattern"), module, config.get("r", rank))
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
    if not _is_positive(r) or not _is_positive(alpha) or int(r) != rank:
        raise _refuse(adapter, keys["A"], f"the config gives this module r = {r!r} and "
                      f"lora_alpha = {alpha!r}, but lora_A has rank {rank}",
                      fix="repair r / rank_pattern in adapter_config.json (or save the "
                      "adapter again with save_pretrained)")
    scale = float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)
    bias = keys.get("bias")
    target_bias = f"{module}.bias" if bias else None
    if bias and target_bias not in base:
        raise _missing(adapter, bias, target_bias, base)
    return LoraModule(module=module, target=target, kind=kind, a=keys["A"], b=keys["B"],
                      rank=rank, scale=scale, fan_in_fan_out=fan_in_fan_out, bias=bias,
                      target_bias=target_bias)


def _shape(kind: Kind, fan_in_fan_out: bool, a: tuple[int, ...],
           b: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape of the base weight that B @ A updates, or None for malformed factors."""
    if kind == "embedding":
        return (a[1], b[0]) if len(a) == 2 and len(b) == 2 else None
    if kind == "conv":
        ones = all(d == 1 for d in b[2:]) and len(b) == len(a)
        return (b[0], *a[1:]) if ones else None
    if len(a) != 2 or len(b) != 2:
        return None
    return (a[1], b[0]) if fan_in_fan_out else (b[0], a[1])


def _pattern_value(patterns: Any, module: str, default: Any) -> Any:
    """peft's get_pattern_key: the first pattern matching the end of ``module``'s name."""
    if not isinstance(patterns, dict):
        return default
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _is_positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _refuse(adapter: Adapter, key: str, problem: str, fix: str | None = None) -> CheckpointError:
    return CheckpointError(
        problem, file=adapter.weights, tensor=key,
        fix=fix or "merge the adapter into its base with peft (merge_and_unload, then "
        "save_pretrained) and pass that model folder")


def _missing(adapter: Adapter, key: str, target: str, base: Checkpoint) -> CheckpointError:
    close = difflib.get_close_matches(target, base.names(), n=2)
    return CheckpointError(
        f"the adapter updates {target}, which the base {base.path} does not have",
        file=adapter.weights, tensor=key,
        fix="pass the base model the adapter was trained on"
        + (f" (the base has {', '.join(close)})" if close else ""))


class _LoraStore:
    """The base's tensors, with each LoRA module's update added on read and saved tensors
    read from the adapter."""

    def __init__(self, adapter: Adapter, base: Checkpoint, weights: _Store) -> None:
        self._adapter = adapter
        self._base = base
        self._weights = weights
        self._biases = {m.target_bias: m for m in adapter.modules.values() if m.bias}
        self.infos = base.infos()
        for target, key in adapter.saved.items():
            stored = self._weights.infos[key]
            self.infos[target] = TensorInfo(target, stored.shape, stored.dtype, stored.file)

    def load(self, info: TensorInfo) -> torch.Tensor:
        name = info.name
        saved = self._adapter.saved.get(name)
        tensor = self._read(saved) if saved is not None else self._base.read(name)
        module = self._adapter.modules.get(name)
        if module is not None:
            return add_lora(tensor, self._read(module.a), self._read(module.b), module)
        module = self._biases.get(name)
        if module is not None:
            tensor = tensor.to(torch.promote_types(tensor.dtype, torch.float32))
            return tensor.add_(self._read(module.bias).to(tensor.dtype), alpha=module.scale)
        return tensor

    def _read(self, key: str) -> torch.Tensor:
        return self._weights.load(self._weights.infos[key])

    def close(self) -> None:
        self._weights.close()
        self._base.close()


def add_lora(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             module: LoraModule) -> torch.Tensor:
    """``weight + scale * B @ A`` in the module's layout, in float32 or wider.

    ``weight`` is consumed: when already float32 (or wider) it is updated in place and
    returned. Cost: one (m x r) @ (r x n) product accumulated into the weight (addmm), no
    other full-size buffer.
    """
    out = weight.to(torch.promote_types(weight.dtype, torch.float32))
    a, b = a.to(out.dtype), b.to(out.dtype)
    if module.kind == "embedding" or module.fan_in_fan_out:
        out.addmm_(a.T, b.T, alpha=module.scale)  # (B @ A)^T = A^T @ B^T
    else:
        out.view(out.shape[0], -1).addmm_(b.reshape(b.shape[0], -1),
                                           a.reshape(a.shape[0], -1), alpha=module.scale)
    return out


# --- writing adapters ---------------------------------------------------------------------


@dataclass(frozen=True)
class LoraTarget:
    """A base tensor an adapter output holds as LoRA factors: ``name`` (``<module>.weight``),
    the module's kind and, for linear layers, GPT-2's transposed layout."""

    name: str
    kind: Kind
    fan_in_fan_out: bool = False

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")

    @property
    def transposed(self) -> bool:
        """True when peft's update is ``(B @ A)^T`` (embeddings, fan_in_fan_out)."""
        return self.kind == "embedding" or self.fan_in_fan_out


def lora_matrix(delta: torch.Tensor, target: LoraTarget) -> torch.Tensor:
    """The 2-D matrix ``p @ q`` whose factors :func:`peft_factors` turns into A and B: the
    weight itself for embeddings and fan_in_fan_out, else ``[out, in * kernel]``. A view."""
    if target.transposed:
        return delta
    return delta.reshape(delta.shape[0], -1)


def peft_factors(target: LoraTarget, p: torch.Tensor, q: torch.Tensor,
                 shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The adapter tensors, under peft's key names, for ``update = p @ q`` of the base
    tensor of ``shape`` (the layout :func:`lora_matrix` gives): {A key: A, B key: B}.
    With lora_alpha = r the update read back is exactly ``p @ q``. Costs two copies of the
    factors (contiguous)."""
    rank = p.shape[1]
    if target.transposed:  # (B @ A)^T = A^T B^T = p q
        a, b = p.T, q.T
    else:
        a = q.reshape(rank, *shape[1:])
        b = p.reshape(shape[0], rank, *([1] * (len(shape) - 2)))
    prefix = PEFT_PREFIX + target.module
    if target.kind == "embedding":
        keys = (f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B")
    else:
        keys = (f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight")
    return {keys[0]: a.contiguous(), keys[1]: b.contiguous()}


def saved_key(name: str) -> str:
    """The adapter key of a tensor saved whole (a modules_to_save module's tensor)."""
    return PEFT_PREFIX + name


def adapter_config(*, base_model: str | None, rank: int, targets: Iterable[LoraTarget],
                   modules_to_save: Iterable[str]) -> dict[str, Any]:
    """``adapter_config.json`` for an adapter of ``targets`` (full module paths, matched
    exactly by peft) at rank ``rank`` with ``lora_alpha = rank`` (scale 1), plain LoRA."""
    targets = list(targets)
    saved = sorted(modules_to_save)
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "use_rslora": False,
        "fan_in_fan_out": any(t.fan_in_fan_out for t in targets),
        "target_modules": sorted(t.module for t in targets),
        "modules_to_save": saved or None, "bias": "none", "rank_pattern": {},
        "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True,
        "use_dora": False,
    }
