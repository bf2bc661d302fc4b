"""The state a continual merge keeps beside its output, so that a later merge continues it.

A method with a ``state`` record (OPCM) gets ``merge_state.json`` in its output folder::

    {"format": "supermerge.merge_state/1",
     "method": "opcm",
     "parameters": {"alpha": 0.5},            # the global parameters as given
     "base_model": "/abs/path/base",
     "base_digest": "<sha256 of the base's weight files>",
     "experts": ["/abs/e1", "/abs/e2"],        # every expert merged so far, in order
     "state": {"tasks": 2, "norm_sum": ..., "lambda": ..., "running_norm": ...}}

A later merge names that folder (``continual:`` in a recipe, ``supermerge merge --into``):
it enters the merged model as its first model, with the method's ``resume`` of ``state`` as
that model's parameters, and refuses another base (by digest, not by path: a base moved
elsewhere still matches). The input folder is only read; the continued merge is a new
output, published atomically as every other.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supermerge.errors import RecipeError
from supermerge.io import Checkpoint, CheckpointWriter

STATE_FILE = "merge_state.json"
FORMAT = "supermerge.merge_state/1"


@dataclass(frozen=True)
class MergeState:
    """A continued merge's record (see the module's docstring for the file)."""

    method: str
    parameters: dict[str, Any]
    base_model: str
    base_digest: str
    experts: list[str]
    state: dict[str, Any]

    def document(self) -> dict[str, Any]:
        """The JSON document of ``merge_state.json``."""
        return {"format": FORMAT, "method": self.method, "parameters": self.parameters,
                "base_model": self.base_model, "base_digest": self.base_digest,
                "experts": self.experts, "state": self.state}


def weights_digest(checkpoint: Checkpoint) -> str:
    """Return the SHA-256 of a checkpoint's weight files (names and contents, sorted).

    Cost: one read of those files, in 1 MiB blocks.
    """
    digest = hashlib.sha256()
    for file in sorted({info.file for info in checkpoint.infos().values()}):
        digest.update(f"{file.name}\0".encode())
        with file.open("rb") as f:
            while block := f.read(2**20):
                digest.update(block)
    return digest.hexdigest()


def read_merge_state(folder: str | Path) -> MergeState:
    """Return the record of the merge whose output is ``folder``.

    Raises RecipeError naming the file when it is missing (not a continuable merge), not
    JSON, or not this format. Cost: one small file read.
    """
    file = Path(folder) / STATE_FILE
    if not file.is_file():
        raise RecipeError(
            f"{folder} holds no {STATE_FILE}: it is not the output of a merge that can be "
            "continued", file=file,
            fix="continue the output of an `opcm` merge (it writes merge_state.json), or "
            "merge every expert at once with `merge_method: opcm`, listed in order")
    try:
        doc = json.loads(file.read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT!r}")
        return MergeState(method=str(doc["method"]), parameters=dict(doc["parameters"]),
                          base_model=str(doc["base_model"]), base_digest=str(doc["base_digest"]),
                          experts=[str(e) for e in doc["experts"]], state=dict(doc["state"]))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise RecipeError(f"unreadable merge state ({type(err).__name__}: {err})", file=file,
                          fix="the file is damaged: merge the experts again from the base"
                          ) from None


def write_merge_state(writer: CheckpointWriter, *, method: str, parameters: dict[str, Any],
                      base: Checkpoint, base_digest: str | None, experts: Sequence[str],
                      record: dict[str, Any]) -> None:
    """Write ``merge_state.json`` into the output; ``base_digest`` None computes it
    (one read of the base's weight files)."""
    state = MergeState(method=method, parameters=parameters,
                       base_model=str(Path(base.path).resolve()),
                       base_digest=base_digest or weights_digest(base),
                       experts=[str(Path(e).resolve()) for e in experts], state=record)
    writer.write_text(STATE_FILE, json.dumps(state.document(), indent=2) + "\n")
