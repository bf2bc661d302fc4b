"""Write a merged model as a Hugging Face directory, published atomically.

Everything is written into a hidden sibling of the output, ``<parent>/.<name>.partial-<id>``
(same filesystem), and renamed to the output only by :meth:`CheckpointWriter.commit`. A
failure removes the temporary directory; a killed process leaves only that hidden
sibling. Either way the output path holds the old model or nothing, never half a model.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import save_file

from supermerge.errors import OutputError
from supermerge.io.checkpoint import SAFE_INDEX, SAFE_WEIGHTS, TORCH_SUFFIXES

log = logging.getLogger(__name__)

# Files copied from the base model's directory: config, tokenizer, processor, and the
# Python files of remote-code models (config.json's auto_map points at them).
MODEL_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "*.py",
)


class CheckpointWriter:
    """Stream tensors into sharded safetensors and publish the directory atomically.

    Tensors are buffered in memory until a shard is full (``shard_size`` bytes), so peak
    memory is about one shard. The writer keeps a reference to each added tensor until
    its shard is written: do not modify a tensor in place after adding it.
    Use it as a context manager; leaving the block without :meth:`commit` aborts.
    """

    def __init__(
        self, out: str | Path, *, overwrite: bool = False, shard_size: int = 5 * 2**30
    ) -> None:
        self.out = Path(os.path.abspath(out))
        self.overwrite = overwrite
        self.shard_size = shard_size
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._buffer_storages: set[int] = set()  # storage pointers of buffered tensors
        self._shards: list[tuple[Path, list[str]]] = []  # (temporary file, names)
        self._names: set[str] = set()
        self._total_size = 0
        self._state = "open"
        if shard_size <= 0:
            raise OutputError(f"shard_size must be positive, got {shard_size}",
                              file=self.out, fix="pass a shard size in bytes, e.g. 5 * 2**30")
        self._check_target()
        self._tmp = self._make_temp_dir()

    # --- public ---------------------------------------------------------------------

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Buffer one tensor; writes a shard when the buffer would exceed ``shard_size``.

        A tensor larger than ``shard_size`` is written alone in its own shard. Raises
        OutputError for a repeated name or when the shard cannot be written (then the
        writer is aborted).
        """
        self._require_open()
        if not isinstance(tensor, torch.Tensor):
            raise OutputError(f"expected a torch.Tensor, got {type(tensor).__name__}",
                              file=self.out, tensor=name, fix="pass tensors only")
        if name in self._names:
            raise OutputError("tensor added twice", file=self.out, tensor=name,
                              fix="each tensor name may be written once")
        tensor = self._own_contiguous(tensor)
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.shard_size:
            self._flush()
        self._names.add(name)
        self._buffer[name] = tensor
        self._buffer_bytes += nbytes
        if nbytes:
            self._buffer_storages.add(tensor.untyped_storage().data_ptr())
        if self._buffer_bytes >= self.shard_size:
            self._flush()

    def copy_model_files(self, model_dir: Path | None) -> None:
        """Copy config, generation config, tokenizer/processor files and remote-code ``*.py``
        from ``model_dir`` (never weights or its README); no-op for ``None``. Cost: a file
        copy each.
        """
        self._require_open()
        if model_dir is None:
            return
        model_dir = Path(model_dir)
        copied = []
        for pattern in MODEL_FILE_PATTERNS:
            for source in sorted(model_dir.glob(pattern)):
                if source.is_file():
                    with self._writing(source.name):
                        shutil.copyfile(source, self._tmp / source.name)
                    copied.append(source.name)
        log.info("copied %s from %s", ", ".join(copied) or "nothing", model_dir)

    def write_text(self, relative_name: str, text: str) -> None:
        """Write a UTF-8 text file into the output (replacing one copied earlier)."""
        self._require_open()
        rel = Path(relative_name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise OutputError(f"{relative_name!r} is not a path inside the output",
                              file=self.out, fix="pass a relative file name such as recipe.yaml")
        if rel.name == SAFE_INDEX or rel.suffix == ".safetensors":
            raise OutputError(f"{relative_name!r} would clash with the weights the writer owns",
                              file=self.out, fix="choose another file name")
        with self._writing(relative_name):
            target = self._tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")

    def write_model_card(
        self, *, base_models: list[str], method: str, recipe_yaml: str, extra_markdown: str = ""
    ) -> None:
        """Write README.md: YAML front matter (base_model list, base_model_relation: merge,
        library_name, tags) and a body naming the models, the method and the recipe.
        """
        front = {
            "base_model": list(base_models),
            "base_model_relation": "merge",
            "library_name": "transformers",
            "tags": ["merge", "supermerge"],
        }
        models = "\n".join(f"- `{m}`" for m in base_models) or "- (none named)"
        card = (
            f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
            f"# {self.out.name}\n\n"
            f"This model is a merge of {len(base_models)} model(s) made with supermerge "
            f"using the **{method}** method.\n\n"
            f"## Models merged\n\n{models}\n\n"
            f"## Recipe\n\n```yaml\n{recipe_yaml.strip()}\n```\n"
        )
        if extra_markdown.strip():
            card += f"\n{extra_markdown.strip()}\n"
        self.write_text("README.md", card)

    def commit(self) -> Path:
        """Write the last shard and the index, then rename the directory to ``out``.

        One shard is named model.safetensors; several model-0000i-of-0000N.safetensors
        plus model.safetensors.index.json. With ``overwrite``, an existing output is moved
        aside, replaced, then deleted. Returns the output path (absolute).
        """
        self._require_open()
        self._flush()
        if not self._shards:
            self.abort()
            raise OutputError("no tensor was added: refusing to write an empty model",
                              file=self.out, fix="add tensors before commit()")
        with self._writing(SAFE_INDEX if len(self._shards) > 1 else SAFE_WEIGHTS):
            self._name_shards()
        self._publish()
        self._state = "committed"
        log.info("wrote %d tensors (%d bytes) in %d shard(s) to %s",
                 len(self._names), self._total_size, len(self._shards), self.out)
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

    def _check_target(self) -> None:
        out = self.out
        if out.exists() or out.is_symlink():
            if not self.overwrite:
                raise OutputError("the output already exists", file=out,
                                  fix="pass --overwrite to replace it, or choose another path")
            if not out.is_dir():
                raise OutputError("the output exists and is not a directory", file=out,
                                  fix="remove it or choose another output path")
            if any(out.iterdir()) and not _looks_like_model(out):
                raise OutputError(
                    "refusing to overwrite a directory that does not hold a model", file=out,
                    fix="choose another output path (overwrite replaces only a model directory)",
                )
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the output's parent directory: {exc.strerror}",
                              file=out.parent, fix=_fix_for(exc, out)) from exc
        stale = sorted(out.parent.glob(f".{out.name}.partial-*"))
        if stale:
            log.warning("leftovers of interrupted writes to %s: %s (delete them to free space)",
                        out, ", ".join(p.name for p in stale))

    def _make_temp_dir(self) -> Path:
        """A new hidden sibling of the output; mkdir honours the umask (mkdtemp would not)."""
        while True:
            tmp = self.out.parent / f".{self.out.name}.partial-{secrets.token_hex(4)}"
            try:
                tmp.mkdir()
                return tmp
            except FileExistsError:
                continue
            except OSError as exc:
                raise OutputError(f"cannot create a directory beside the output: {exc.strerror}",
                                  file=tmp, fix=_fix_for(exc, self.out)) from exc

    def _require_open(self) -> None:
        if self._state != "open":
            raise OutputError(f"the writer is already {self._state}", file=self.out,
                              fix="create a new CheckpointWriter for another output")

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
        if not self._buffer:
            return
        file = self._tmp / f"shard-{len(self._shards) + 1:05d}.safetensors"
        with self._writing(file.name):
            save_file(self._buffer, file, metadata={"format": "pt"})
        self._shards.append((file, list(self._buffer)))
        self._total_size += self._buffer_bytes
        self._buffer = {}
        self._buffer_bytes = 0
        self._buffer_storages.clear()

    def _name_shards(self) -> None:
        count = len(self._shards)
        if count == 1:
            self._shards[0][0].rename(self._tmp / SAFE_WEIGHTS)
            return
        weight_map = {}
        for i, (file, names) in enumerate(self._shards, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            file.rename(self._tmp / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self._total_size},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self._tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    def _publish(self) -> None:
        """Rename the temporary directory to the output; with overwrite, swap via a sibling."""
        out = self.out
        aside = None
        with self._writing(out.name):
            if out.exists() or out.is_symlink():
                if not self.overwrite:
                    raise FileExistsError(errno.EEXIST, "the output appeared while writing")
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
        """Turn an OSError (or safetensors I/O error) into OutputError, aborting first."""
        try:
            yield
        except (OSError, SafetensorError) as exc:
            self.abort()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise OutputError(f"cannot write {name} of the output {self.out}: {reason}",
                              file=self.out / name, fix=_fix_for(exc, self.out)) from exc


def _looks_like_model(directory: Path) -> bool:
    """True if the directory holds a config.json or weights files (top level)."""
    return any(
        p.name == "config.json" or p.suffix in (".safetensors", *TORCH_SUFFIXES)
        for p in directory.iterdir()
    )


def _fix_for(exc: BaseException, out: Path) -> str:
    """A fix for an OS-level write failure, from its errno (safetensors puts it in text)."""
    code = getattr(exc, "errno", None)
    if code is None:
        match = re.search(r"os error (\d+)", str(exc))
        code = int(match.group(1)) if match else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"free disk space on the filesystem of {out.parent}, or write elsewhere"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make {out.parent} writable, or write elsewhere"
    if code == errno.EEXIST:
        return "pass --overwrite to replace it, or choose another path"
    return f"check {out.parent} (disk, permissions) and run again"
