"""Hugging Face hub ids resolved through the local cache, offline, never downloading.

A model named ``org/name`` (or ``name``) that is not a local path is looked up in
huggingface_hub's cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``) with ``snapshot_download(local_files_only=True)``: the
snapshot that ``refs/main`` points to. Nothing is fetched over the network, whatever
``HF_HUB_OFFLINE`` says; a model missing from the cache is a CheckpointError that names the
cache folder and how to fill it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from supermerge.errors import CheckpointError

_REPO_ID = re.compile(r"(?:[A-Za-z0-9_.-]+/)?[A-Za-z0-9_.-]+")


def looks_like_hub_id(name: str) -> bool:
    """True if ``name`` is spelled as a hub model id by the Hub's rules: ``name`` or
    ``org/name`` of letters, digits, ``-``, ``_``, ``.``; no ``--`` or ``..``; no part
    starting or ending with ``-`` or ``.``; at most 96 characters. Cost: nothing."""
    if not _REPO_ID.fullmatch(name) or len(name) > 96 or "--" in name or ".." in name:
        return False
    return not any(part.startswith(("-", ".")) or part.endswith(("-", "."))
                   for part in name.split("/"))


def hub_cache_dir() -> Path:
    """The hub cache folder huggingface_hub uses, read from the environment now:
    ``HF_HUB_CACHE`` (or the older ``HUGGINGFACE_HUB_CACHE``), else ``HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` or ``~/.cache/huggingface/hub``."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return Path(os.environ[key]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def resolve_cached(name: str) -> Path | None:
    """Return the cached snapshot folder of hub model ``name``, or None when ``name`` is not
    spelled as a hub id (then it is a plain missing path).

    Raises CheckpointError naming the cache folder when the model is not in the cache or
    huggingface_hub is not installed. Never downloads. Cost: a few stats.
    """
    if not looks_like_hub_id(name):
        return None
    cache = hub_cache_dir()
    folder = cache / f"models--{name.replace('/', '--')}"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{name!r} is not a local path and looks like a Hugging Face hub id, but "
            "huggingface_hub is not installed to read its cache", file=name,
            fix="pip install 'supermerge[hf]', or give the model's local folder") from None
    try:
        snapshot = Path(snapshot_download(name, cache_dir=str(cache), local_files_only=True))
    except Exception as err:  # LocalEntryNotFoundError, a malformed cache entry, ...
        raise CheckpointError(
            f"{name!r} is neither a local path nor a model in the Hugging Face cache {cache} "
            f"(looked for {folder}; {type(err).__name__})", file=folder,
            fix=f"download it first (`hf download {name}`; supermerge never downloads), "
            "point HF_HUB_CACHE at the cache that holds it, or give a local path") from None
    return snapshot
