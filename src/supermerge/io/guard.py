"""The one output guard: may this run write here, and what would it replace?

Every writer of supermerge (merge, learn, search, map, bench, the export of learned merges)
asks :func:`check_output` (a model folder it publishes) or :func:`check_apart` (a results
folder it writes into) before doing any work. Together they refuse

- an output that is one of the inputs, lies inside an input's folder, or holds an input;
- replacing (``overwrite``) anything but a folder supermerge itself wrote: one marked as
  supermerge output (a model card tagged ``supermerge`` or a ``supermerge_recipe.yaml``)
  that holds nothing but the files supermerge writes. Anything else is named and kept;
- an output larger than the free space of its filesystem.

Nothing here writes; each check costs a few ``stat`` calls (the ownership check one walk
of the folder it would replace, stopped at the first few unexpected files).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from fnmatch import fnmatchcase
from itertools import islice
from pathlib import Path

import yaml

from supermerge.errors import OutputError
from supermerge.io.checkpoint import SAFE_INDEX

# Files copied from the base model's directory: config, tokenizer, processor, and the
# Python files of remote-code models (config.json's auto_map points at them).
TOKENIZER_FILE_PATTERNS = (
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
)
"""The files of a tokenizer (and its chat template) in a Hugging Face model folder."""

MODEL_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    *TOKENIZER_FILE_PATTERNS,
    "preprocessor_config.json",
    "processor_config.json",
    "*.py",
)

RECIPE_FILE = "supermerge_recipe.yaml"
MODEL_CARD = "README.md"

# Every top-level file a supermerge output may hold: the copied side files, the weights
# (shards, index, the writer's side files such as task_state.safetensors), the model card,
# the recipe, task_state.json of per-task methods and the coefficients of learned merges.
OUTPUT_FILE_PATTERNS = (
    *MODEL_FILE_PATTERNS,
    "*.safetensors",
    SAFE_INDEX,
    MODEL_CARD,
    RECIPE_FILE,
    "task_state.json",
    "merge_state.json",  # what a continual merge (opcm) needs to be continued
    "adapter_config.json",  # a PEFT adapter output (output: adapter, `supermerge extract`)
    "coefficients.json",
    "coefficients.csv",
    "coefficients.png",
)
HEADS_DIR = "heads"  # heads/<task>.safetensors and .json: the one subfolder written
HEAD_FILE_PATTERNS = ("*.safetensors", "*.json")

_SHOWN = 5  # unexpected files named in a refusal


def check_output(
    out: str | Path,
    *,
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    nbytes: int | None = None,
) -> Path:
    """Check that a model folder may be published at ``out``; returns ``out`` absolute.

    Raises OutputError when ``out`` overlaps an input (:func:`check_apart`), exists without
    ``overwrite``, is not a folder, or is a folder that :func:`check_replaceable` refuses;
    and, with ``nbytes`` (the output's size), when its filesystem has less free space
    (:func:`check_free_space`). An empty folder may always be replaced. Writes nothing.
    """
    out = Path(os.path.abspath(out))
    check_apart(out, inputs)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputError("the output already exists", file=out,
                              fix="pass --overwrite to replace it, or choose another path")
        if not out.is_dir() or out.is_symlink():
            raise OutputError("the output exists and is not a directory (a file or a link)",
                              file=out, fix="remove it or choose another output path")
        check_replaceable(out)
    if nbytes is not None:
        check_free_space(out, nbytes)
    return out


def check_apart(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Raise OutputError if ``out`` is one of ``inputs``, lies inside an input folder, or
    holds an input (links resolved; files and folders compared by identity, so another
    spelling of the same folder is caught). Inputs that do not exist are skipped (nothing
    of theirs can be lost), and so is ``None``. Cost: a ``stat`` per path component.
    """
    out = Path(out).resolve()
    out_chain = _identities(out)  # out and its existing ancestors, innermost first
    out_id = out_chain[0][1] if out_chain and out_chain[0][0] == out else None
    for given in inputs:
        if given is None:
            continue
        path = Path(given).resolve()
        try:
            stat = path.stat()
        except OSError:
            continue
        if (stat.st_dev, stat.st_ino) == out_id:
            raise OutputError("the output path is also an input", file=given,
                              fix="write the output to a new directory")
        if (stat.st_dev, stat.st_ino) in {identity for _, identity in out_chain}:
            raise OutputError(f"the output {out} is inside the input folder {given}",
                              file=given, fix="write the output outside every input folder")
        if out_id is not None and out_id in {identity for _, identity in _identities(path)}:
            raise OutputError(f"the input {given} is inside the output folder {out}",
                              file=given,
                              fix="write the output to a folder that holds none of the inputs")


def check_replaceable(folder: Path) -> None:
    """Raise OutputError unless ``folder`` may be replaced: empty, or supermerge output
    (see the module docstring) holding nothing else. The refusal names a few of the files
    that would be lost. Cost: one walk of the folder, stopped early.
    """
    unexpected = list(islice(unowned_files(folder), _SHOWN + 1))
    if not unexpected and not any(folder.iterdir()):
        return
    marked = is_supermerge_output(folder)
    if marked and not unexpected:
        return
    shown = ", ".join(unexpected[:_SHOWN]) + (", ..." if len(unexpected) > _SHOWN else "")
    if not marked:
        listed = shown or ", ".join(sorted(p.name for p in folder.iterdir())[:_SHOWN])
        raise OutputError(
            "refusing to overwrite a folder that supermerge did not write (no model card "
            f"tagged supermerge, no {RECIPE_FILE}); these would be lost: {listed}",
            file=folder, fix="choose another output path (--overwrite replaces only an "
            "earlier supermerge output), or move the folder away yourself")
    raise OutputError(
        f"refusing to overwrite: the folder holds files supermerge does not write, which "
        f"would be lost: {shown}", file=folder,
        fix="move those files out of the folder, or choose another output path")


def is_supermerge_output(folder: Path) -> bool:
    """True if ``folder`` holds a ``supermerge_recipe.yaml`` or a model card whose front
    matter's tags name supermerge (both written with every merge). Reads at most 64 KiB."""
    if _regular_file(folder / RECIPE_FILE):
        return True
    card = folder / MODEL_CARD
    if not _regular_file(card):
        return False
    try:
        with open(card, encoding="utf-8", errors="replace") as f:
            text = f.read(64 * 1024)
        if not text.startswith("---\n"):
            return False
        front = yaml.safe_load(text[4:].split("\n---\n", 1)[0])
    except (OSError, yaml.YAMLError):
        return False
    tags = front.get("tags") if isinstance(front, dict) else None
    return isinstance(tags, list) and "supermerge" in tags


def unowned_files(folder: Path) -> Iterator[str]:
    """Yield the paths (relative, ``/``-separated) under ``folder`` that supermerge does not
    write: files matching none of OUTPUT_FILE_PATTERNS, anything in a subfolder other than
    ``heads/*.safetensors`` and ``heads/*.json``, links and special files. Links are never
    followed; a folder that cannot be listed is yielded itself."""
    yield from _unowned(folder, "")


def check_free_space(out: str | Path, nbytes: int) -> None:
    """Raise OutputError if the filesystem that will hold ``out`` has less than ``nbytes``
    free (for an unprivileged user), naming both numbers and the path. A filesystem that
    reports no size (some network or virtual ones) passes. Cost: one ``statvfs``."""
    where = _existing_ancestor(Path(os.path.abspath(out)))
    try:
        usage = shutil.disk_usage(where)
    except OSError:
        return
    if usage.total == 0 or usage.free >= nbytes:
        return
    raise OutputError(
        f"not enough disk space for the output: it needs {format_bytes(nbytes)}, and "
        f"{format_bytes(usage.free)} are free on the filesystem of {where}", file=out,
        fix=f"free at least {format_bytes(nbytes - usage.free)} there, or write the output "
        "to another disk (an output being replaced is deleted only after the new one is "
        "complete)")


def format_bytes(nbytes: int) -> str:
    """``nbytes`` for a reader: '512 B', '3.4 MiB', '1.25 GiB'."""
    if nbytes < 1024:
        return f"{nbytes} B"
    value = float(nbytes)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


# --- internals ------------------------------------------------------------------------------


def _identities(path: Path) -> list[tuple[Path, tuple[int, int]]]:
    """(path, (device, inode)) of ``path`` and each existing ancestor, innermost first."""
    found = []
    for each in (path, *path.parents):
        try:
            stat = each.stat()
        except OSError:
            continue
        found.append((each, (stat.st_dev, stat.st_ino)))
    return found


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing ancestor."""
    for each in (path, *path.parents):
        if each.exists():
            return each
    return Path(path.anchor or "/")


def _regular_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _unowned(folder: Path, prefix: str) -> Iterator[str]:
    """unowned_files of ``folder`` (the output if ``prefix`` is empty, else its heads/)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        yield prefix or "."
        return
    for entry in entries:
        rel = prefix + entry.name
        if entry.is_dir(follow_symlinks=False):
            if not prefix and entry.name == HEADS_DIR:
                yield from _unowned(Path(entry.path), rel + "/")
            else:
                yield from _everything(Path(entry.path), rel + "/")
        elif not entry.is_file(follow_symlinks=False):
            yield rel  # a link, a socket, a device: supermerge writes none
        elif not any(fnmatchcase(entry.name, p)
                     for p in (HEAD_FILE_PATTERNS if prefix else OUTPUT_FILE_PATTERNS)):
            yield rel


def _everything(folder: Path, prefix: str) -> Iterator[str]:
    """Every file under a folder supermerge does not write (the folder itself if empty)."""
    empty = True
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        rel_root = os.path.relpath(root, folder)
        base = prefix if rel_root == "." else f"{prefix}{Path(rel_root).as_posix()}/"
        for name in sorted(files) + sorted(d for d in dirs if os.path.islink(Path(root, d))):
            empty = False
            yield base + name
    if empty:
        yield prefix
