"""The error the search layer raises when a search cannot go on."""

from __future__ import annotations

from supermerge.errors import SupermergeError


class SearchError(SupermergeError):
    """A search cannot go on: a worker failed, a saved state does not fit, too few points."""
