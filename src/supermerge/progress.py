"""The one progress callback of every layer: ``progress(stage, done, total, info)``.

``stage`` names what is under way ("merge", "learn", "statistics", "search", "train
sms_spam", "evaluate ties", ...); a stage starts at ``done`` 0 or 1 and ends when ``done ==
total``; stages may interleave (experts training in parallel). ``info`` says what the last
unit was, when there is something to say: the tensor just merged (str), the training loss
(float), the best fitness so far (float); else None. The library calls it; the CLI draws a
bar per stage on a terminal and plain lines otherwise.
"""

from __future__ import annotations

from typing import Any, Protocol


class Progress(Protocol):
    """``progress(stage, done, total, info=None)``: see the module's docstring."""

    def __call__(self, stage: str, done: int, total: int, info: Any = None, /) -> None: ...


def ignore(stage: str, done: int, total: int, info: Any = None, /) -> None:
    """A progress callback that does nothing."""
