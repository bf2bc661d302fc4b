"""Open model checkpoints as lazy, read-only views of their tensors.

A :class:`Checkpoint` knows every tensor's name, shape and dtype from the files' headers
alone and reads one tensor at a time. Formats:

- a Hugging Face model directory: ``config.json`` plus ``model.safetensors``, or shards
  listed in ``model.safetensors.index.json``; or the same with ``pytorch_model.bin``;
- a single ``.safetensors`` file;
- a torch state dict saved with ``torch.save`` (``.bin``, ``.pt``, ``.pth``, ``.ckpt``),
  loaded with ``weights_only=True`` and memory-mapped when the file allows it.

Safetensors files are read with positional reads (``os.preadv``) straight into the
returned tensor's memory: no mmap, no shared file position, so reads from many threads
need no lock. Every file's identity (device, inode, size, mtime) is recorded when it is
opened and checked on each read, so a file replaced mid-merge is reported, not misread.
"""

from __future__ import annotations

import difflib
import io
import json
import logging
import math
import os
import pickle
import pickletools
import struct
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import torch

from supermerge.errors import CheckpointError
from supermerge.io.hub import resolve_cached

if TYPE_CHECKING:
    from supermerge.io.lora import Adapter

log = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

_SUPPORTED = (
    "a Hugging Face model directory (config.json + model.safetensors, sharded "
    "model-0000i-of-0000N.safetensors + model.safetensors.index.json, or the same with "
    "pytorch_model.bin), a .safetensors file, or a torch state dict (.bin/.pt/.pth/.ckpt)"
)
_MAX_HEADER_BYTES = 100 * 2**20  # the limit the safetensors library itself enforces
# safetensors dtype codes in the order of safetensors' own Dtype enum (narrowest first); its
# writer lays tensors out widest dtype first in this order, and so does CheckpointWriter.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    code: dtype
    for code, dtype in {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
        "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
        "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
        "I16": torch.int16,
        "U16": torch.uint16,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I32": torch.int32,
        "U32": torch.uint32,
        "F32": torch.float32,
        "C64": torch.complex64,
        "F64": torch.float64,
        "I64": torch.int64,
        "U64": torch.uint64,
    }.items()
    if dtype is not None
}
# Keys under which training scripts nest the state dict ({"state_dict": {...}, "epoch": 3}).
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
# (output tensor, input embedding, evidence prefix): the output is tied to the input when
# the checkpoint lacks it; the evidence prefix, when set, must occur among the names so that
# a headless model is not given a head it never had.
_TIED_PAIRS: tuple[tuple[str, str, str | None], ...] = (
    ("lm_head.weight", "model.embed_tokens.weight", None),  # Llama, Mistral, Qwen, Gemma
    ("lm_head.weight", "transformer.wte.weight", None),  # GPT-2, GPT-J
    ("lm_head.weight", "model.decoder.embed_tokens.weight", None),  # OPT
    ("lm_head.weight", "transformer.word_embeddings.weight", None),  # BLOOM
    ("lm_head.weight", "shared.weight", None),  # T5, BART
    ("lm_head.weight", "embed_tokens.weight", None),
    ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight",
     "cls.predictions."),  # BERT masked LM
    ("cls.predictions.decoder.bias", "cls.predictions.bias", None),  # BERT: bias tied too
)


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor; costs nothing to keep."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        """True for floating-point dtypes (float64 ... float8), the ones merges average."""
        return self.dtype.is_floating_point


class _Store(Protocol):
    """Where a checkpoint's tensors live and how one is read."""

    infos: dict[str, TensorInfo]

    def load(self, info: TensorInfo) -> torch.Tensor: ...

    def close(self) -> None: ...


class Checkpoint:
    """A lazy, read-only view of one model's tensors. Build it with :func:`open_checkpoint`.

    ``path`` is the path as opened; ``model_dir`` the Hugging Face directory whose
    config and tokenizer files belong to the model, or ``None`` for a bare weights file.
    ``adapter`` is the parsed LoRA adapter when the checkpoint is an adapter seen through
    its base (:mod:`supermerge.io.lora`), else None.
    """

    def __init__(
        self, path: Path, model_dir: Path | None, config: dict | None, store: _Store
    ) -> None:
        self.path = path
        self.model_dir = model_dir
        self._config = config
        self._store = store
        self._closed = False
        self.adapter: Adapter | None = None

    def names(self) -> list[str]:
        """Tensor names in stored order (shard by shard, by position in the file)."""
        return list(self._store.infos)

    def info(self, name: str) -> TensorInfo:
        """Header information of one tensor; raises CheckpointError for an unknown name."""
        try:
            return self._store.infos[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._store.infos, n=3)
            raise CheckpointError(
                "the checkpoint has no tensor of this name",
                file=self.path,
                tensor=name,
                fix=f"did you mean {', '.join(close)}?" if close
                else "list its tensors with `supermerge inspect`",
            ) from None

    def infos(self) -> dict[str, TensorInfo]:
        """All tensors' header information, by name in stored order (a new dict)."""
        return dict(self._store.infos)

    def __contains__(self, name: object) -> bool:
        return name in self._store.infos

    def read(self, name: str, *, dtype: torch.dtype | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor into new CPU memory of its own (costs its nbytes); thread-safe.

        ``dtype`` returns it converted, as ``Tensor.to(dtype)`` would; ``out`` (a contiguous
        CPU tensor of the tensor's shape and ``dtype``, or of its own dtype) receives the
        values instead of new memory, and is returned. From a safetensors file either is
        read without a tensor of the file's dtype: straight into the result, or, to convert,
        through a reused buffer of a few MiB per thread (no page faults but the result's).
        Raises CheckpointError naming the file and tensor if the data cannot be read, and
        ValueError for an ``out`` of another shape or dtype.
        """
        info = self.info(name)
        if self._closed:
            raise CheckpointError(
                "the checkpoint is closed",
                file=self.path,
                tensor=name,
                fix="read tensors before closing the checkpoint (or leaving its with-block)",
            )
        target = dtype or info.dtype
        if out is not None and (tuple(out.shape) != info.shape or out.dtype != target
                                or not out.is_contiguous() or out.device.type != "cpu"):
            raise ValueError(f"out must be a contiguous CPU {target} tensor of shape "
                             f"{info.shape}, not {out.dtype} {tuple(out.shape)}")
        load_into = getattr(self._store, "load_into", None)
        if load_into is not None and (out is not None or target != info.dtype):
            result = out if out is not None else torch.empty(info.shape, dtype=target)
            load_into(info, result)
            return result
        tensor = self._store.load(info)  # a LoRA view returns float32 for a half base
        if dtype is not None:
            tensor = tensor.to(dtype)
        return tensor if out is None else out.copy_(tensor)

    @property
    def config(self) -> dict | None:
        """The parsed config.json of a model directory, else None."""
        return self._config

    def close(self) -> None:
        """Release the checkpoint's files (memory maps of torch files); idempotent."""
        if not self._closed:
            self._closed = True
            self._store.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._store.infos)} tensors)"


def open_checkpoint(path: str | Path, *, base: str | None = None) -> Checkpoint:
    """Open a checkpoint; reads only headers (and a torch file's pickle, memory-mapped).

    A name that is no local path but a Hugging Face hub id (``org/name``) opens the
    model's snapshot in the local hub cache, offline (:mod:`supermerge.io.hub`). A PEFT
    LoRA adapter folder, or mergekit's ``BASE+ADAPTER``, opens as its base with the
    adapter applied on read (:func:`supermerge.io.lora.open_adapter`); ``base`` is the
    base for an adapter folder whose own config should not decide it (the recipe's
    ``base_model``), ignored for anything else.

    Raises CheckpointError naming the file and the fix when the path is missing, is not a
    model (an adapter's bare weights file included), or its files are truncated, corrupt
    or inconsistent.
    """
    from supermerge.io import lora

    given, path = str(path), Path(path)
    if not path.exists():
        cached = resolve_cached(given)  # None unless `given` is spelled as a hub id
        if cached is not None:
            return open_checkpoint(cached)
        pair = lora.split_base_adapter(given)
        if pair is not None:
            return _adapter_or_refusal(Path(pair[1]), pair[0], explicit=True)
        plus = (" (BASE+ADAPTER needs both paths to exist)" if "+" in given.strip("+")
                else "")
        raise CheckpointError(
            "checkpoint not found", file=path,
            fix=f"check the path{plus}; expected {_SUPPORTED}, a PEFT LoRA adapter folder or "
            "BASE+ADAPTER")
    if path.is_dir():
        if lora.is_adapter_dir(path) and not _has_weights(path):
            return lora.open_adapter(path, base=base)
        return _open_model_dir(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _refuse_adapter_weights(
            Checkpoint(path, None, None, _SafetensorsStore({path: None})))
    if suffix in TORCH_SUFFIXES:
        return _refuse_adapter_weights(Checkpoint(path, None, None, _TorchStore({path: None})))
    raise CheckpointError(
        f"unsupported checkpoint format {suffix or '(no suffix)'!r}",
        file=path,
        fix=f"pass {_SUPPORTED}",
    )


def _adapter_or_refusal(adapter: Path, base: str, *, explicit: bool) -> Checkpoint:
    from supermerge.io import lora

    if not lora.is_adapter_dir(adapter):
        raise CheckpointError(
            "in BASE+ADAPTER the part after '+' must be a PEFT adapter folder (with "
            "adapter_config.json)", file=adapter,
            fix="pass the folder peft's save_pretrained wrote, or a model path without '+'")
    return lora.open_adapter(adapter, base=base, explicit_base=explicit)


def _refuse_adapter_weights(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt``, unless its tensors are a LoRA adapter's (then closed and refused)."""
    from supermerge.io import lora

    if lora.looks_like_lora_weights(ckpt.names()):
        ckpt.close()
        raise lora.bare_adapter_file_error(ckpt.path)
    return ckpt


def _has_weights(directory: Path) -> bool:
    return any((directory / name).is_file()
               for name in (SAFE_WEIGHTS, SAFE_INDEX, TORCH_WEIGHTS, TORCH_INDEX))


def tied_aliases(ckpt: Checkpoint) -> dict[str, str]:
    """Tied tensors the checkpoint does not store: {output name: name to read instead}.

    Hugging Face omits the output embedding (``lm_head.weight``) of a model with tied word
    embeddings; this maps it to the input embedding it equals. An alias is offered when the
    output is missing, its input embedding is present and the config does not set
    ``tie_word_embeddings: false`` (a config without the key counts as tied: the default
    differs between transformers model classes, and the missing tensor is the evidence).
    Costs nothing: names only.
    """
    config = ckpt.config or {}
    if config.get("tie_word_embeddings", True) is False:
        return {}
    aliases: dict[str, str] = {}
    for output, source, evidence in _TIED_PAIRS:
        if output in ckpt or output in aliases or source not in ckpt:
            continue
        if evidence is None or any(n.startswith(evidence) for n in ckpt.names()):
            aliases[output] = source
    return aliases


# --- Hugging Face directories ---------------------------------------------------------


def _open_model_dir(directory: Path) -> Checkpoint:
    config = _read_config(directory)
    if (directory / SAFE_WEIGHTS).is_file():
        store: _Store = _SafetensorsStore({_member(directory, SAFE_WEIGHTS): None})
    elif (directory / SAFE_INDEX).is_file():
        store = _SafetensorsStore(_read_index(_member(directory, SAFE_INDEX)))
    elif (directory / TORCH_WEIGHTS).is_file():
        store = _TorchStore({_member(directory, TORCH_WEIGHTS): None})
    elif (directory / TORCH_INDEX).is_file():
        store = _TorchStore(_read_index(_member(directory, TORCH_INDEX)))
    else:
        raise _not_a_model(directory)
    if config is None:
        log.warning("%s has weights but no config.json; config and tokenizer are unknown",
                    directory)
    return Checkpoint(directory, directory, config, store)


def _not_a_model(directory: Path) -> CheckpointError:
    weights = sorted(
        p.name for p in directory.iterdir()
        if p.suffix.lower() in (".safetensors", *TORCH_SUFFIXES)
    )
    if weights:
        fix = f"pass one of its weights files directly: {', '.join(weights[:5])}"
    else:
        fix = f"pass {_SUPPORTED}"
    return CheckpointError(
        f"the directory holds no model weights (looked for {SAFE_WEIGHTS}, {SAFE_INDEX}, "
        f"{TORCH_WEIGHTS}, {TORCH_INDEX})",
        file=directory,
        fix=fix,
    )


def _read_json(file: Path, what: str) -> Any:
    try:
        return _json_loads(file.read_bytes())
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read the {what}: {exc}",
            file=file,
            fix=f"repair or re-download {file.name} (re-save the model with save_pretrained)",
        ) from exc


def _read_config(directory: Path) -> dict | None:
    file = directory / "config.json"
    if not file.is_file():
        return None
    _member(directory, file.name)
    config = _read_json(file, "model config")
    if not isinstance(config, dict):
        raise CheckpointError(
            "config.json is not a JSON object", file=file, fix="repair or re-download it"
        )
    return config


def _read_index(index: Path) -> dict[Path, list[str]]:
    """{shard file: the tensor names the index assigns to it}, shards in name order."""
    data = _read_json(index, "shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            'the shard index has no "weight_map" of tensor name -> shard file',
            file=index,
            fix="repair or re-download the index (re-save the model with save_pretrained)",
        )
    shards: dict[Path, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(_member(index.parent, shard, index), []).append(name)
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(
                f"the shard index {index.name} names a shard that does not exist",
                file=shard,
                fix=f"the download is incomplete: fetch {shard.name} again "
                "(or re-save the model with save_pretrained)",
            )
    return dict(sorted(shards.items()))


def _member(directory: Path, name: str, named_by: Path | None = None) -> Path:
    """``directory / name``, refused unless it lies inside the model folder; costs one
    resolve (no file is opened).

    ``name`` must be relative without ``..`` and, symbolic links followed, resolve inside
    ``directory``, or, for a snapshot of the Hugging Face hub cache
    (``models--org--name/snapshots/REV/``), inside that repository's ``blobs/`` folder where
    the hub keeps the files its snapshot links point to. ``named_by`` is the file (a shard
    index) that names ``name``, for the message.
    """
    relative = Path(name)
    where = f"the shard index {named_by.name} names" if named_by else "the model folder holds"
    fix = ("a model folder's files must lie inside it: this one is damaged or was built to "
           "read other files on this machine; re-download it from a source you trust")
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise CheckpointError(f"{where} a file outside the model folder: {_clip(name, 200)}",
                              file=named_by or directory, fix=fix)
    path = directory / relative
    root = directory.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    if not any(path.resolve().is_relative_to(r) for r in roots):
        raise CheckpointError(
            f"{where} {_clip(name, 200)}, a symbolic link that leads outside the model folder",
            file=path, fix=fix)
    return path


def _select(
    file: Path, found: dict[str, TensorInfo], wanted: list[str] | None
) -> dict[str, TensorInfo]:
    """The tensors of one file the index assigns to it (all of them without an index)."""
    if wanted is None:
        return found
    missing = [n for n in wanted if n not in found]
    if missing:
        raise CheckpointError(
            f"the shard index assigns {len(missing)} tensor(s) to this shard, "
            "but the shard does not hold them",
            file=file,
            tensor=missing[0],
            fix="the index and shards come from different saves: re-download the model",
        )
    extra = len(found) - len(wanted)
    if extra:
        log.warning("%s holds %d tensor(s) its index does not list; ignoring them", file, extra)
    keep = set(wanted)
    return {n: i for n, i in found.items() if n in keep}


def _merge_shards(per_file: list[dict[str, TensorInfo]]) -> dict[str, TensorInfo]:
    merged: dict[str, TensorInfo] = {}
    for infos in per_file:
        for name, info in infos.items():
            if name in merged:
                raise CheckpointError(
                    f"two shards hold the same tensor ({merged[name].file.name} and "
                    f"{info.file.name})",
                    file=info.file,
                    tensor=name,
                    fix="the shards come from different saves: re-download the model",
                )
            merged[name] = info
    return merged


# --- safetensors -----------------------------------------------------------------------


_Identity = tuple[int, int, int, int]  # (device, inode, size, mtime_ns)


def _file_identity(st: os.stat_result) -> _Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _corrupt(file: Path, problem: str, tensor: str | None = None) -> CheckpointError:
    return CheckpointError(
        f"corrupt or truncated safetensors file: {problem}",
        file=file,
        tensor=tensor,
        fix="the file is damaged or incompletely downloaded: fetch or save it again",
    )


def safetensors_offsets(file: str | Path) -> dict[str, tuple[TensorInfo, int]]:
    """Return ``{name: (info, absolute byte offset of its data)}`` of one safetensors file,
    from its header alone (validated as :func:`open_checkpoint` does), for a caller that
    maps the file itself. Raises CheckpointError for a missing or corrupt file."""
    return _read_safetensors_header(Path(file))[0]


def _read_safetensors_header(file: Path) -> tuple[dict[str, tuple[TensorInfo, int]], _Identity]:
    """({name: (info, absolute data offset)} in data order, file identity); header only."""
    try:
        with open(file, "rb") as f:
            st = os.fstat(f.fileno())
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(file, f"{st.st_size} bytes, shorter than the 8-byte header size")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER_BYTES, st.st_size - 8):
                raise _corrupt(
                    file, f"header size {header_len} exceeds the file ({st.st_size} bytes)"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(
            f"cannot read the file: {exc.strerror or exc}",
            file=file,
            fix="check that the file exists and is readable",
        ) from exc
    try:
        header = _json_loads(raw)
    except ValueError as exc:
        raise _corrupt(file, f"header is {exc}") from None
    data_start = 8 + header_len
    entries = _validate_header(file, header, st.st_size - data_start)
    return {info.name: (info, data_start + begin) for info, begin in entries}, _file_identity(st)


def _json_loads(raw: bytes) -> Any:
    """json.loads that fails only with a ValueError whose message suits the user: bad
    UTF-8 or syntax, nesting deep enough to exhaust the recursion limit, integers of more
    digits than Python converts."""
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply to parse") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digits limit
        raise ValueError(f"not valid JSON ({exc})") from None


def _validate_header(file: Path, header: Any, data_len: int) -> list[tuple[TensorInfo, int]]:
    """Check a parsed safetensors header as the safetensors library does; returns
    [(info, data offset relative to the data section)] in data order.

    Like safetensors' own ``Metadata::validate``: every entry is well formed (a known dtype
    code, a shape of non-negative integers, two integer offsets), its byte length is
    numel x itemsize, and the entries sorted by offset tile the data section exactly:
    contiguous, non-overlapping, from byte 0 to its end. Costs nothing but the header.
    """
    if not isinstance(header, dict):
        raise _corrupt(file, "header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(v, str) for v in metadata.values()
    ):
        raise _corrupt(file, '"__metadata__" is not a mapping of strings to strings')
    entries = sorted(
        (_parse_entry(file, name, spec) for name, spec in header.items()
         if name != "__metadata__"),
        key=lambda entry: (entry[1], entry[1] + entry[0].nbytes),
    )
    end = 0  # where the previous tensor's data ends
    for info, begin in entries:
        if begin < end:
            raise _corrupt(file, f"tensor data [{begin}, {begin + info.nbytes}) overlaps the "
                           f"previous tensor's, which ends at byte {end}", info.name)
        if begin > end:
            raise _corrupt(file, f"{begin - end} bytes before the tensor's data belong to no "
                           "tensor", info.name)
        end = begin + info.nbytes
        if end > data_len:
            raise _corrupt(file, f"tensor data ends at byte {end} past the end of the data "
                           f"({data_len} bytes): the file is truncated", info.name)
    if end != data_len:
        raise _corrupt(file, f"the last {data_len - end} bytes of the data belong to no tensor")
    return entries


def _parse_entry(file: Path, name: str, spec: Any) -> tuple[TensorInfo, int]:
    """One header entry as (info, data offset); CheckpointError naming what is malformed."""
    def malformed(problem: str) -> CheckpointError:
        return _corrupt(file, f"malformed header entry: {problem}", tensor=name)

    if not isinstance(spec, dict):
        raise malformed(f"a {type(spec).__name__}, not an object")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in spec]
    if missing:
        raise malformed(f"no {', '.join(map(repr, missing))}")
    dtype_code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype_code, str):
        raise malformed(f'"dtype" is a {type(dtype_code).__name__}, not a code such as "F32"')
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise malformed(f'"shape" is {_clip(shape)}, not a list of non-negative integers')
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise malformed(f'"data_offsets" is {_clip(offsets)}, not [begin, end] in bytes')
    dtype = SAFETENSORS_DTYPES.get(dtype_code)
    if dtype is None:
        raise CheckpointError(
            f"unsupported safetensors dtype {_clip(dtype_code)}",
            file=file,
            tensor=name,
            fix=f"convert the tensor to one of {', '.join(SAFETENSORS_DTYPES)}",
        )
    info = TensorInfo(name=name, shape=tuple(shape), dtype=dtype, file=file)
    begin, end = offsets
    if end - begin != info.nbytes:
        raise _corrupt(
            file, f"data offsets [{begin}, {end}) do not match {dtype_code}{list(shape)} "
            f"({info.nbytes} bytes)", name,
        )
    return info, begin


def _is_count(value: Any) -> bool:
    """A JSON non-negative integer (true and false are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _clip(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages about hostile input."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


_STAGING_BYTES = 4 << 20
"""Bytes of a reader thread's conversion buffer: a chunk read from the file at a time."""

_per_thread = threading.local()


def _staging_buffer() -> torch.Tensor:
    """This thread's conversion buffer (``_STAGING_BYTES`` of uint8), made on first use.

    Reused by every read of the thread, so converting reads fault in no memory but their
    results'; one buffer per reader thread, freed with it."""
    buffer = getattr(_per_thread, "staging", None)
    if buffer is None:
        buffer = _per_thread.staging = torch.empty(_STAGING_BYTES, dtype=torch.uint8)
    return buffer


def _pread(fd: int, target: torch.Tensor, offset: int, info: TensorInfo) -> None:
    """Fill the contiguous uint8 tensor ``target`` from ``fd`` at ``offset``."""
    buffer = memoryview(target.numpy())
    done = 0
    while done < len(buffer):  # preadv may return less than asked (2 GiB cap)
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got == 0:
            raise _corrupt(info.file, "unexpected end of file", info.name)
        done += got


class _SafetensorsStore:
    """Tensors in safetensors files, read with positional reads (no mmap, no lock)."""

    def __init__(self, files: Mapping[Path, list[str] | None]) -> None:
        # {file: {name: absolute data offset}}: per file, because a shard may hold a tensor
        # of the same name as another shard's (one its index does not list)
        self._offsets: dict[Path, dict[str, int]] = {}
        self._identity: dict[Path, _Identity] = {}
        per_file = []
        for file, wanted in files.items():
            entries, self._identity[file] = _read_safetensors_header(file)
            found = {name: info for name, (info, _) in entries.items()}
            per_file.append(_select(file, found, wanted))
            self._offsets[file] = {name: offset for name, (_, offset) in entries.items()}
        self.infos = _merge_shards(per_file)

    def load(self, info: TensorInfo) -> torch.Tensor:
        return self.load_into(info, torch.empty(info.shape, dtype=info.dtype))

    def load_into(self, info: TensorInfo, out: torch.Tensor) -> torch.Tensor:
        """Read the tensor into ``out`` (contiguous, its shape), converting to ``out``'s dtype
        a chunk at a time through this thread's staging buffer; returns ``out``."""
        if info.nbytes == 0:
            return out
        offset = self._offsets[info.file][info.name]
        try:
            with open(info.file, "rb", buffering=0) as f:
                if _file_identity(os.fstat(f.fileno())) != self._identity[info.file]:
                    raise CheckpointError(
                        "the file changed on disk after it was opened",
                        file=info.file,
                        tensor=info.name,
                        fix="do not modify input checkpoints while a merge runs; run again",
                    )
                flat = out.view(-1)
                if out.dtype == info.dtype:
                    _pread(f.fileno(), flat.view(torch.uint8), offset, info)
                    return out
                staging = _staging_buffer()
                per_chunk = staging.numel() // info.dtype.itemsize
                for start in range(0, flat.numel(), per_chunk):
                    count = min(per_chunk, flat.numel() - start)
                    raw = staging[: count * info.dtype.itemsize]
                    _pread(f.fileno(), raw, offset + start * info.dtype.itemsize, info)
                    flat[start : start + count].copy_(raw.view(info.dtype))
        except OSError as exc:
            raise CheckpointError(
                f"cannot read the tensor: {exc.strerror or exc}",
                file=info.file,
                tensor=info.name,
                fix="check that the file is readable and the disk healthy",
            ) from exc
        return out

    def close(self) -> None:
        """Nothing to release: every read opens and closes its file."""


# --- torch state dicts -----------------------------------------------------------------


def _torch_load(file: Path) -> Any:
    """torch.load with weights_only=True, memory-mapped when the file is in torch's zip
    format (the legacy format cannot be mapped)."""
    try:
        mmap = zipfile.is_zipfile(file)
        if not mmap:
            log.info("%s is not in torch's zip format; loading it into memory", file)
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch reports damage as RuntimeError, EOFError, KeyError, ...
        # weights_only refuses a pickle that names anything but tensors with the pickle
        # module's error, whatever torch's wording; so does a damaged file. The pickle's
        # own opcodes tell the two apart.
        if not isinstance(exc, pickle.UnpicklingError):
            raise _unreadable(file, f"{type(exc).__name__}: {exc}") from exc
        code = _pickle_globals(file)
        if not code:
            raise _unreadable(file, "not a well-formed pickle of tensors") from None
        raise CheckpointError(
            f"the torch file holds Python code, not only tensors: its pickle names "
            f"{', '.join(code[:5])}{' ...' if len(code) > 5 else ''}, which loading the file "
            "would run; refused, nothing was run",
            file=file,
            fix="ask its author for a safetensors file. Only if you trust the file, convert "
            "it once (this runs its code): python -c \"import torch; from safetensors.torch "
            f"import save_file; sd = torch.load('{file}', weights_only=False); "
            "save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')\"",
        ) from None


def _unreadable(file: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"cannot read the torch file ({problem})",
        file=file,
        fix="the file is damaged or not a torch.save file: fetch or save it again",
    )


_TORCH_GLOBALS = ("torch.", "collections.OrderedDict")  # what torch.save writes for tensors
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
                         "SHORT_BINSTRING", "BINSTRING", "STRING"})
_MAX_PICKLE_BYTES = 64 * 2**20


def _pickle_globals(file: Path) -> list[str]:
    """The Python callables and classes other than torch's that the file's pickle names
    (``posix.system``, ``__main__.MyConfig``), found by listing its opcodes: nothing is
    unpickled or run. Empty when the file is not a well-formed pickle (a damaged file).

    Reads the zip format's ``data.pkl`` or, in the legacy format, the pickles at the start
    of the file (at most 64 MiB of either).
    """
    try:
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    return []
                with archive.open(member) as f:
                    return _globals_in(io.BytesIO(f.read(_MAX_PICKLE_BYTES)))
        with open(file, "rb") as f:
            return _globals_in(io.BytesIO(f.read(_MAX_PICKLE_BYTES)))
    except (OSError, zipfile.BadZipFile):
        return []


def _globals_in(stream: io.BytesIO) -> list[str]:
    """Non-torch globals named by the consecutive pickles in ``stream`` (the legacy format
    stores several before its raw data); stops at the first byte that is not a pickle."""
    found: list[str] = []
    while True:
        strings: list[str] = []  # the strings pushed so far: STACK_GLOBAL takes the last two
        named: list[str] = []
        try:
            for opcode, arg, _pos in pickletools.genops(stream):
                if opcode.name in _STRING_OPS:
                    strings.append(arg if isinstance(arg, str) else repr(arg))
                elif opcode.name in ("GLOBAL", "INST"):
                    named.append(".".join(str(arg).split(" ", 1)))
                elif opcode.name == "STACK_GLOBAL":
                    named.append(".".join(strings[-2:]) or "(an object)")
        except ValueError:  # not (or no more) a pickle: keep what complete pickles named
            return found
        found += [n for n in dict.fromkeys(named) if not n.startswith(_TORCH_GLOBALS)
                  and n not in found]
        if not stream.read(1):
            return found
        stream.seek(-1, io.SEEK_CUR)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _unwrap_state_dict(obj: Any, file: Path) -> dict[str, torch.Tensor]:
    """The {name: tensor} dict in ``obj``, looking inside {"state_dict": ...}-style wrappers."""
    current, keys = obj, []
    while not _is_state_dict(current):
        key = next(
            (k for k in _WRAPPER_KEYS if isinstance(current, Mapping) and k in current), None
        )
        if key is None:
            raise CheckpointError(
                f"not a state dict of tensors: {_describe(current)}",
                file=file,
                fix="save the weights alone: torch.save(model.state_dict(), path)",
            )
        keys.append(key)
        current = current[key]
    if keys:
        log.info("%s: using the state dict under %s", file, "".join(f"[{k!r}]" for k in keys))
    return dict(current)


def _describe(obj: Any) -> str:
    if not isinstance(obj, Mapping):
        return f"found a {type(obj).__name__}"
    if not obj:
        return "found an empty dict"
    key, value = next((k, v) for k, v in obj.items()
                      if not (isinstance(k, str) and isinstance(v, torch.Tensor)))
    return f"key {key!r} holds a {type(value).__name__}"


class _TorchStore:
    """Tensors of torch state dicts, memory-mapped; a read copies one tensor out."""

    def __init__(self, files: Mapping[Path, list[str] | None]) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        per_file = []
        for file, wanted in files.items():
            tensors = _unwrap_state_dict(_torch_load(file), file)
            found = {
                name: TensorInfo(name, tuple(t.shape), t.dtype, file)
                for name, t in tensors.items()
            }
            selected = _select(file, found, wanted)
            per_file.append(selected)
            self._tensors.update({name: tensors[name] for name in selected})
        self.infos = _merge_shards(per_file)

    def load(self, info: TensorInfo) -> torch.Tensor:
        try:
            return self._tensors[info.name].clone(memory_format=torch.contiguous_format)
        except RuntimeError as exc:
            raise CheckpointError(
                f"cannot read the tensor: {exc}",
                file=info.file,
                tensor=info.name,
                fix="the file is damaged: fetch or save it again",
            ) from exc

    def close(self) -> None:
        """Drop the memory-mapped tensors so the maps can be released."""
        self._tensors.clear()
