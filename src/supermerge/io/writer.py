"""Write a merged model as a Hugging Face directory, published atomically.

Everything is written into a hidden sibling of the output, ``<parent>/.<name>.partial-<id>``
(same filesystem), and renamed to the output only by :meth:`CheckpointWriter.commit`. A
failure removes the temporary directory; a killed process leaves only that hidden
sibling, which records its writer so that the next writer to the same output removes it
(:mod:`supermerge.io.partial`). Either way the output path holds the old model or nothing,
never half a model. Before anything is written the output guard
(:mod:`supermerge.io.guard`) refuses an output that overlaps an input, replacing anything
supermerge did not write, and an output larger than the free disk space.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import torch
import yaml

from supermerge.errors import OutputError
from supermerge.io import partial
from supermerge.io.checkpoint import SAFE_INDEX, SAFE_WEIGHTS, SAFETENSORS_DTYPES
from supermerge.io.guard import (
    MODEL_FILE_PATTERNS,
    check_free_space,
    check_output,
    check_replaceable,
)
from supermerge.io.hub import looks_like_hub_id

log = logging.getLogger(__name__)

Layout = Sequence[tuple[str, tuple[int, ...], torch.dtype]]
"""Every output tensor's (name, shape, dtype), in the order the shards are filled."""


class CheckpointWriter:
    """Write tensors into sharded safetensors and publish the directory atomically.

    Two modes, the same files:

    - with ``layout`` (every output tensor's ``(name, shape, dtype)``, known from headers
      before any weight is read), shards are planned and their headers written up front,
      and :meth:`add` writes each tensor's bytes straight to its place in its shard, in any
      order. The writer keeps no tensor: its memory is the headers, whatever ``shard_size``.
    - without, tensors are buffered until a shard is full (``shard_size`` bytes), so peak
      memory is about one shard, and the writer keeps a reference to each added tensor
      until its shard is written: do not modify a tensor in place after adding it.

    Shards are filled in the order tensors are laid out (or added): a new shard starts when
    the next tensor would exceed ``shard_size``; a larger tensor fills a shard alone.

    ``side_files`` maps file names (``*.safetensors``, not the weights' own names) to
    layouts: each is one more safetensors file of the output, never sharded and not in the
    index, whose tensors :meth:`add_side` streams to their places the same way (the
    per-task masks of TALL masks and EMR). They are written into the temporary directory
    and published with the model, atomically; :meth:`commit` refuses if one of their
    tensors is missing.

    ``single_file`` names the one weights file of an output that is never sharded (a PEFT
    adapter's ``adapter_model.safetensors``): every tensor goes into it, whatever
    ``shard_size``, and no index is written.

    ``inputs`` are the paths the output is made from (models, data files): the output
    guard refuses an output that is one of them, lies inside one or holds one. With
    ``overwrite`` an existing output is replaced only if supermerge wrote it and it holds
    nothing else (:func:`~supermerge.io.guard.check_replaceable`). The free disk space is
    checked against every file of the layout before anything is written (without a
    layout, against each shard before it is written).

    Use it as a context manager; leaving the block without :meth:`commit` aborts.
    """

    def __init__(
        self,
        out: str | Path,
        *,
        overwrite: bool = False,
        shard_size: int = 5 * 2**30,
        layout: Layout | None = None,
        side_files: Mapping[str, Layout] | None = None,
        inputs: Sequence[str | Path | None] = (),
        single_file: str | None = None,
    ) -> None:
        self.out = Path(os.path.abspath(out))
        self.overwrite = overwrite
        self.shard_size = shard_size if single_file is None else 2**63
        self._single_file = single_file
        self._buffer: dict[str, torch.Tensor] = {}  # without a layout: tensors not yet written
        self._buffer_bytes = 0
        self._buffer_storages: set[int] = set()  # storage pointers of buffered tensors
        self._shards: list[_Shard] = []  # written (or, with a layout, planned) shards
        self._layout: dict[str, tuple[_Spec, _Shard]] | None = None
        self._names: set[str] = set()  # tensors added
        self._side: dict[str, dict[str, tuple[_Spec, _Shard]]] = {}  # file -> its placements
        self._side_names: dict[str, set[str]] = {}  # file -> tensors added to it
        self._state = "open"
        if shard_size <= 0:
            raise OutputError(f"shard_size must be positive, got {shard_size}",
                              file=self.out, fix="pass a shard size in bytes, e.g. 5 * 2**30")
        specs = None if layout is None else self._check_layout(layout)
        side_specs = {self._check_side_name(f): self._check_layout(lay)
                      for f, lay in (side_files or {}).items()}
        shards = [] if specs is None else _plan_shards(specs, shard_size)
        sides = {file: _Shard(Path(file), file_specs) for file, file_specs in side_specs.items()}
        check_output(self.out, inputs=inputs, overwrite=overwrite,
                     nbytes=sum(s.size for s in [*shards, *sides.values()]))
        self._prepare_parent()
        self._tmp = partial.make_partial_dir(self.out, self._error_beside_output)
        if specs is not None:
            self._start_shards(shards)
        for file, shard in sides.items():
            self._start_side_file(file, shard)

    # --- public ---------------------------------------------------------------------

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (with a layout) or buffer it (without, writing a full shard).

        Raises OutputError for a repeated name, a tensor the layout does not list or
        describes otherwise, or when a shard cannot be written (then the writer is aborted).
        Cost with a layout: one positional write of the tensor's bytes (plus a contiguous
        CPU copy if the tensor is not one already); nothing is kept.
        """
        spec = self._check_new(name, tensor, self._names)
        if self._layout is None:
            self._buffer_tensor(spec, tensor)
        else:
            self._write_tensor(spec, tensor, self._layout)
        self._names.add(name)

    def add_side(self, file: str, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor of the side file ``file`` at its place in that file.

        Raises OutputError for a file that is not one of ``side_files``, a repeated name, a
        tensor its layout does not list or describes otherwise, or when the file cannot be
        written (then the writer is aborted). Cost: one positional write of the tensor's
        bytes (plus a contiguous CPU copy if needed); nothing is kept.
        """
        placements = self._side.get(file)
        if placements is None:
            self._require_open()
            raise OutputError(f"{file!r} is not a side file of this writer", file=self.out,
                              tensor=name, fix="list it in side_files when creating the writer")
        spec = self._check_new(name, tensor, self._side_names[file])
        self._write_tensor(spec, tensor, placements)
        self._side_names[file].add(name)

    def copy_model_files(self, model_dir: Path | None, skip: Sequence[str] = ()) -> None:
        """Copy config, generation config, tokenizer/processor files and remote-code ``*.py``
        from ``model_dir`` (only the names of MODEL_FILE_PATTERNS: never weights or its
        README), except the names in ``skip`` (e.g. the tokenizer's files when the merge
        writes its own); no-op for ``None``.

        A link is followed only to a regular file inside ``model_dir`` (or, for a Hugging
        Face cache snapshot, inside its repository's ``blobs/``); a link out of the folder,
        or anything but a regular file, is not copied and a warning names it. Cost: a file
        copy each.
        """
        self._require_open()
        if model_dir is None:
            return
        model_dir = Path(model_dir)
        copied = []
        for pattern in MODEL_FILE_PATTERNS:
            for entry in sorted(model_dir.glob(pattern)):
                if entry.name in skip:
                    continue
                source = side_file_source(entry, model_dir)
                if source is None:
                    continue
                with self._writing(entry.name):
                    shutil.copyfile(source, self._tmp / entry.name)
                copied.append(entry.name)
        log.info("copied %s from %s", ", ".join(copied) or "nothing", model_dir)

    def write_text(self, relative_name: str, text: str) -> None:
        """Write a UTF-8 text file into the output (replacing one copied earlier)."""
        self.write_bytes(relative_name, text.encode("utf-8"))

    def write_bytes(self, relative_name: str, data: bytes) -> None:
        """Write a file into the output (e.g. a PNG or a head's safetensors), published with
        the model. Names of the model's own weights (``model*.safetensors``, the index) are
        refused, and so are the side files'."""
        self._require_open()
        rel = Path(relative_name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise OutputError(f"{relative_name!r} is not a path inside the output",
                              file=self.out, fix="pass a relative file name such as recipe.yaml")
        if rel.name in (SAFE_INDEX, self._single_file) or rel.as_posix() in self._side or (
                rel.suffix == ".safetensors" and rel.name.startswith(("model", "shard-"))):
            raise OutputError(f"{relative_name!r} would clash with the weights the writer owns",
                              file=self.out, fix="choose another file name")
        with self._writing(relative_name):
            target = self._tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

    def write_model_card(
        self, *, base_models: list[str], method: str, recipe_yaml: str, extra_markdown: str = "",
        library: str = "transformers",
    ) -> None:
        """Write README.md: YAML front matter (``base_model``: the models that are Hugging
        Face hub ids, each once, left out when there is none; ``base_model_relation:
        merge``, ``library_name`` (``library``: transformers, or peft for an adapter), tags)
        and a
        body naming every model (hub ids linked, local paths as they were given, as
        mergekit's card does), the method and the recipe. Local paths never go in
        ``base_model``: the Hub rejects a card whose ``base_model`` is not a repo id.
        """
        models = list(dict.fromkeys(str(m) for m in base_models))  # each once, in order
        hub = [m for m in models if is_hub_id(m)]
        front = {**({"base_model": hub} if hub else {}), "base_model_relation": "merge",
                 "library_name": library, "tags": ["merge", "supermerge"]}
        listed = "\n".join(f"- [{m}](https://huggingface.co/{m})" if m in hub else f"- `{m}`"
                           for m in models) or "- (none named)"
        card = (
            f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
            f"# {self.out.name}\n\n"
            f"This model is a merge of {len(models)} model(s) made with supermerge "
            f"using the **{method}** method.\n\n"
            f"## Models merged\n\n{listed}\n\n"
            f"## Recipe\n\n```yaml\n{recipe_yaml.strip()}\n```\n"
        )
        if extra_markdown.strip():
            card += f"\n{extra_markdown.strip()}\n"
        self.write_text("README.md", card)

    def commit(self) -> Path:
        """Write the last buffered shard and the index, then rename the directory to ``out``.

        One shard is named model.safetensors; several model-0000i-of-0000N.safetensors
        plus model.safetensors.index.json. With ``overwrite``, an existing output is moved
        aside, replaced, then deleted. Raises OutputError (and aborts) when no tensor was
        added or one of the layout's is missing. Returns the output path (absolute).
        """
        self._require_open()
        self._flush()
        if not self._shards:
            self.abort()
            raise OutputError("no tensor was added: refusing to write an empty model",
                              file=self.out, fix="add tensors before commit()")
        missing = [name for name in self._layout or () if name not in self._names] + [
            name for file, placed in self._side.items()
            for name in placed if name not in self._side_names[file]]
        if missing:
            self.abort()
            raise OutputError(f"{len(missing)} tensor(s) of the layout were never added",
                              file=self.out, tensor=missing[0],
                              fix="add every tensor the layout lists before commit()")
        with self._writing(SAFE_INDEX if len(self._shards) > 1
                           else self._single_file or SAFE_WEIGHTS):
            self._name_shards()
        self._publish()
        self._state = "committed"
        log.info("wrote %d tensors (%d bytes) in %d shard(s) to %s", len(self._names),
                 sum(s.nbytes for s in self._shards), len(self._shards), self.out)
        return self.out

    def abort(self) -> None:
        """Remove the temporary directory; the output path is left untouched. Idempotent."""
        if self._state == "open":
            self._state = "aborted"
            self._buffer.clear()
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()

    # --- internals ------------------------------------------------------------------

    def _prepare_parent(self) -> None:
        """Create the output's parent; remove the leftovers of dead writers to this output."""
        out = self.out
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the output's parent directory: {exc.strerror}",
                              file=out.parent, fix=_fix_for(exc, out)) from exc
        partial.clean_leftovers(out)

    def _error_beside_output(self, exc: OSError, path: Path) -> OutputError:
        return OutputError(f"cannot create a directory beside the output: {exc.strerror}",
                           file=path, fix=_fix_for(exc, self.out))

    def _check_new(self, name: str, tensor: torch.Tensor, added: set[str]) -> _Spec:
        """The spec of a tensor about to be added; OutputError if it is no tensor or its name
        is already in ``added``."""
        self._require_open()
        if not isinstance(tensor, torch.Tensor):
            raise OutputError(f"expected a torch.Tensor, got {type(tensor).__name__}",
                              file=self.out, tensor=name, fix="pass tensors only")
        if name in added:
            raise OutputError("tensor added twice", file=self.out, tensor=name,
                              fix="each tensor name may be written once")
        return _Spec(name, tuple(tensor.shape), tensor.dtype)

    def _require_open(self) -> None:
        if self._state != "open":
            raise OutputError(f"the writer is already {self._state}", file=self.out,
                              fix="create a new CheckpointWriter for another output")

    def _check_layout(self, layout: Layout) -> list[_Spec]:
        """The layout as specs, in its order; raises OutputError for a repeated name or a
        dtype safetensors cannot store. Writes nothing."""
        specs = [_Spec(name, tuple(int(d) for d in shape), dtype) for name, shape, dtype in layout]
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen:
                raise OutputError("the layout lists this tensor twice", file=self.out,
                                  tensor=spec.name, fix="list each output tensor once")
            self._check_storable(spec)
            seen.add(spec.name)
        return specs

    def _check_storable(self, spec: _Spec) -> None:
        """Raise OutputError unless safetensors can store this dtype under this name."""
        if spec.dtype not in _DTYPE_CODES:
            raise OutputError(f"safetensors cannot store {spec.dtype}", file=self.out,
                              tensor=spec.name,
                              fix=f"convert it to one of {', '.join(SAFETENSORS_DTYPES)}")
        if spec.name == _METADATA:
            raise OutputError(f"{_METADATA} is reserved by safetensors", file=self.out,
                              tensor=spec.name, fix="rename the tensor")

    def _check_side_name(self, file: str) -> str:
        """Return a side file's name; OutputError unless it is a plain ``*.safetensors`` name
        that none of the weight files (final or temporary) can take."""
        weights_name = _WEIGHT_FILE.match(file) is not None
        if Path(file).name != file or not file.endswith(".safetensors") or weights_name:
            raise OutputError(f"{file!r} cannot be a side file", file=self.out,
                              fix="use a plain file name ending in .safetensors that does not "
                                  "start with 'model' or 'shard-', e.g. task_state.safetensors")
        return file

    def _start_side_file(self, file: str, shard: _Shard) -> None:
        """Create one side file with its header; its tensors are written by add_side."""
        shard.path = self._tmp / file
        with self._writing(file):
            shard.create()
        self._side[file] = {spec.name: (spec, shard) for spec in shard.specs}
        self._side_names[file] = set()

    def _start_shards(self, shards: list[_Shard]) -> None:
        """Write the headers of the layout's planned shards (final names; a few KiB)."""
        self._layout = {}
        for shard in shards:
            shard.path = self._tmp / shard.path.name
            with self._writing(shard.path.name):
                shard.create()
            self._shards.append(shard)
            self._layout.update({spec.name: (spec, shard) for spec in shard.specs})

    def _write_tensor(self, spec: _Spec, tensor: torch.Tensor,
                      placements: Mapping[str, tuple[_Spec, _Shard]]) -> None:
        """Write a tensor of a layout to its file at its offset; keeps no reference to it."""
        if spec.name not in placements:
            raise OutputError("the tensor is not in the writer's layout", file=self.out,
                              tensor=spec.name, fix="add only the tensors the layout lists")
        expected, shard = placements[spec.name]
        if spec != expected:
            raise OutputError(
                f"the tensor is {_describe(spec)} but the layout says {_describe(expected)}",
                file=self.out, tensor=spec.name,
                fix="convert the tensor to the layout's shape and dtype",
            )
        with self._writing(shard.path.name):
            shard.write(spec.name, tensor.detach().to("cpu").contiguous())

    def _buffer_tensor(self, spec: _Spec, tensor: torch.Tensor) -> None:
        """Buffer a tensor, first writing the buffered shard if the tensor starts a new one."""
        self._check_storable(spec)
        if self._buffer and _starts_shard(self._buffer_bytes, spec.nbytes, self.shard_size):
            self._flush()
        tensor = self._own_contiguous(tensor)
        self._buffer[spec.name] = tensor
        self._buffer_bytes += spec.nbytes
        if spec.nbytes:
            self._buffer_storages.add(tensor.untyped_storage().data_ptr())

    def _own_contiguous(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor on CPU, contiguous, owning its whole storage, sharing none buffered."""
        tensor = tensor.detach().to("cpu")
        storage = tensor.untyped_storage()
        owns_storage = (tensor.is_contiguous() and tensor.storage_offset() == 0
                        and storage.nbytes() == tensor.numel() * tensor.element_size())
        if not owns_storage or storage.data_ptr() in self._buffer_storages:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        return tensor

    def _flush(self) -> None:
        """Write the buffered tensors as the next shard (a temporary name until commit)."""
        if not self._buffer:
            return
        specs = [_Spec(n, tuple(t.shape), t.dtype) for n, t in self._buffer.items()]
        shard = _Shard(self._tmp / f"shard-{len(self._shards) + 1:05d}.safetensors", specs)
        try:
            check_free_space(self._tmp, shard.size)
        except OutputError:
            self.abort()
            raise
        with self._writing(shard.path.name):
            shard.create()
            for name, tensor in self._buffer.items():
                shard.write(name, tensor)
        self._shards.append(shard)
        self._buffer = {}
        self._buffer_bytes = 0
        self._buffer_storages.clear()

    def _name_shards(self) -> None:
        """Give the shards their final names (already theirs with a layout); write the index."""
        count = len(self._shards)
        for i, shard in enumerate(self._shards, start=1):
            final = self._tmp / (self._single_file or _shard_name(i, count))
            if shard.path != final:
                shard.path = shard.path.rename(final)
        if count == 1:
            return
        weight_map = {name: shard.path.name for shard in self._shards for name in shard.names}
        index = {"metadata": {"total_size": sum(s.nbytes for s in self._shards)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self._tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    def _publish(self) -> None:
        """Rename the temporary directory to the output; with overwrite, swap via a sibling.

        The output being replaced is checked again (files may have been put there during
        the merge): anything supermerge did not write aborts the swap."""
        out = self.out
        aside = None
        with self._writing(out.name):
            partial.release(self._tmp)
            if out.exists() or out.is_symlink():
                if not self.overwrite:
                    raise FileExistsError(errno.EEXIST, "the output appeared while writing")
                try:
                    check_replaceable(out)
                except OutputError:
                    self.abort()
                    raise
                aside = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
                os.rename(out, aside)
            try:
                os.rename(self._tmp, out)
            except OSError:
                if aside is not None:
                    os.rename(aside, out)
                raise
        if aside is None:
            return
        try:
            if aside.is_dir() and not aside.is_symlink():
                shutil.rmtree(aside)
            else:
                aside.unlink()
        except OSError as exc:
            log.warning("the new model is at %s but the old one could not be deleted from %s: "
                        "%s; delete it by hand", out, aside, exc)

    @contextmanager
    def _writing(self, name: str) -> Iterator[None]:
        """Turn an OSError into OutputError naming the file, aborting first."""
        try:
            yield
        except OSError as exc:
            self.abort()
            raise OutputError(f"cannot write {name} of the output {self.out}: "
                              f"{exc.strerror or exc}",
                              file=self.out / name, fix=_fix_for(exc, self.out)) from exc


class _Spec(NamedTuple):
    """What a safetensors header says of one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


_METADATA = "__metadata__"
_WEIGHT_FILE = re.compile(r"(model|shard-)")  # names the weight files (final, temporary) take
_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
_DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(SAFETENSORS_DTYPES.values())}


class _Shard:
    """One safetensors file of the output: its header and where each tensor's bytes go.

    Tensors are laid out as safetensors' own writer lays them out (widest dtype first, then
    by name), so each is aligned to its element size and the file holds the bytes
    ``safetensors.torch.save_file(..., metadata={"format": "pt"})`` writes for the same
    tensors. Keeps the header (a few KiB) and no tensor.
    """

    def __init__(self, path: Path, specs: list[_Spec]) -> None:
        self.path = path
        self.specs = specs
        self.names = [spec.name for spec in specs]
        self._offsets: dict[str, int] = {}  # name -> byte offset in the data section
        header: dict[str, object] = {_METADATA: {"format": "pt"}}
        offset = 0
        for spec in sorted(specs, key=lambda s: (-_DTYPE_RANK[s.dtype], s.name)):
            header[spec.name] = {"dtype": _DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            self._offsets[spec.name] = offset
            offset += spec.nbytes
        self.nbytes = offset
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)  # safetensors pads the header to 8-byte alignment
        self._header = struct.pack("<Q", len(text)) + text

    @property
    def size(self) -> int:
        """The file's size in bytes: header and data."""
        return len(self._header) + self.nbytes

    def create(self) -> None:
        """Create the file holding the header only; the data is written by :meth:`write`."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            _pwrite_all(fd, memoryview(self._header), 0)
        finally:
            os.close(fd)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a contiguous CPU tensor's bytes at its offset (no copy); raises OSError."""
        if tensor.numel() == 0:
            return
        data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            _pwrite_all(fd, data, len(self._header) + self._offsets[name])
        finally:
            os.close(fd)


def is_hub_id(name: str) -> bool:
    """True if ``name`` is spelled as a Hugging Face hub model id
    (:func:`~supermerge.io.hub.looks_like_hub_id`) and no file or folder of that name exists
    here (then it is a local path, as in mergekit). Cost: one stat."""
    return looks_like_hub_id(name) and not Path(name).exists()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset``: pwrite may write less (at most ~2 GiB a call)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _starts_shard(filled: int, nbytes: int, shard_size: int) -> bool:
    """Whether a tensor of ``nbytes`` goes to a new shard after a non-empty one of ``filled``."""
    return filled >= shard_size or filled + nbytes > shard_size


def _pack(specs: list[_Spec], shard_size: int) -> list[list[_Spec]]:
    """The specs grouped into shards, in order, by the rule of :func:`_starts_shard`."""
    groups: list[list[_Spec]] = []
    filled = 0
    for spec in specs:
        if not groups or _starts_shard(filled, spec.nbytes, shard_size):
            groups.append([])
            filled = 0
        groups[-1].append(spec)
        filled += spec.nbytes
    return groups


def _plan_shards(specs: list[_Spec], shard_size: int) -> list[_Shard]:
    """The shards of a layout, with their final names (paths relative until created)."""
    groups = _pack(specs, shard_size)
    return [_Shard(Path(_shard_name(i, len(groups))), group)
            for i, group in enumerate(groups, start=1)]


def _shard_name(i: int, count: int) -> str:
    """The Hugging Face name of shard ``i`` (from 1) of ``count``."""
    return SAFE_WEIGHTS if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"


def _describe(spec: _Spec) -> str:
    return f"{str(spec.dtype).removeprefix('torch.')}{list(spec.shape)}"


def side_file_source(entry: Path, model_dir: Path) -> Path | None:
    """The regular file to copy for ``entry`` of ``model_dir``, links resolved; None (with a
    warning for a link out of the folder or a special file) if it must not be copied."""
    try:
        mode = entry.lstat().st_mode
        source = entry.resolve(strict=True)
        root = model_dir.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling link, link loop, vanished file
        log.warning("not copied: %s cannot be resolved to a file", entry)
        return None
    inside = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(source.is_relative_to(r) for r in inside):
        log.warning("not copied: %s is a link to %s, outside the model folder %s", entry,
                    source, root)
        return None
    if stat.S_ISDIR(mode) or source.is_dir():
        return None  # a folder matching a pattern (e.g. a package named x.py)
    if not source.is_file():
        log.warning("not copied: %s is not a regular file", entry)
        return None
    return source


def _fix_for(exc: OSError, out: Path) -> str:
    """A fix for an OS-level write failure, from its errno."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free disk space on the filesystem of {out.parent}, or write elsewhere"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make {out.parent} writable, or write elsewhere"
    if exc.errno == errno.EEXIST:
        return "pass --overwrite to replace it, or choose another path"
    return f"check {out.parent} (disk, permissions) and run again"
