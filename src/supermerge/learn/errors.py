"""The error the learn layer raises for bad data, heads or experts."""

from __future__ import annotations

from supermerge.errors import SupermergeError


class LearnError(SupermergeError):
    """Validation data, heads or experts unfit for a learned merge (raised before training)."""
