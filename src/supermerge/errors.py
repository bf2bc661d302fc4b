"""Errors that tell the user what went wrong, where, and how to fix it.

Every layer raises these instead of bare exceptions so that the CLI can print one clear
message and exit non-zero, and so that tests can match on the file and tensor named.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SupermergeError(Exception):
    """Base error: a message plus the file, the tensor and the fix, where known."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        tensor: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        self.fix = fix
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [self.message]
        if self.file:
            parts.append(f"file: {self.file}")
        if self.tensor:
            parts.append(f"tensor: {self.tensor}")
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return "\n  ".join(parts)


class CheckpointError(SupermergeError):
    """A checkpoint is missing, unreadable, corrupt or not a model."""


class OutputError(SupermergeError):
    """The output cannot be written (exists, disk full, permission)."""


class MethodError(SupermergeError):
    """Unknown method, unknown or invalid parameter, wrong number of models."""


class RecipeError(SupermergeError):
    """A recipe file is malformed or names something that does not exist."""


class InputValueError(SupermergeError):
    """An input tensor holds NaN or Inf (and the recipe says to refuse)."""


@dataclass(frozen=True)
class Problem:
    """One incompatibility found while planning; many are reported together."""

    message: str
    file: str | None = None
    tensor: str | None = None
    fix: str | None = None

    def render(self) -> str:
        where = ", ".join(
            p for p in (f"file {self.file}" if self.file else "",
                        f"tensor {self.tensor}" if self.tensor else "") if p
        )
        text = f"{self.message}" + (f" ({where})" if where else "")
        return text + (f" -> fix: {self.fix}" if self.fix else "")


class PlanError(SupermergeError):
    """All problems found before any weight was read, reported at once."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        lines = [p.render() for p in self.problems]
        shown = lines[:50]
        if len(lines) > len(shown):
            shown.append(f"... and {len(lines) - len(shown)} more")
        super().__init__(
            f"the merge cannot run: {len(lines)} problem(s) found before reading any weight:\n    "
            + "\n    ".join(shown)
        )


def validation_details(err: Any, top: str = "(top level)") -> str:
    """Return every problem of a pydantic ValidationError on one line: ``loc: message; ...``
    (``top`` names a problem of the whole object)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or top}: {e['msg']}" for e in err.errors())
