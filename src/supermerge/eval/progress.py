"""The progress callback of the eval layer: ``progress(stage, done, total)``.

``stage`` names what is under way ("train sms_spam", "merge ties", ...); a new stage
starts at ``done`` 0 or 1 and ends when ``done == total``. Stages may interleave when
experts train in parallel. The CLI draws one bar per stage.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]


def ignore(stage: str, done: int, total: int) -> None:
    """A progress callback that does nothing."""
