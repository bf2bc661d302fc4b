"""The screen: how loud the CLI is (-q/-v), where log lines go, and progress.

The library never prints: it logs to ``logging.getLogger("supermerge")`` and calls a
progress callback. This module turns both into what the user sees on stderr:

- one handler on the root logger, installed per command and removed when it ends, that
  prints each record once (``warning: ...`` for warnings, the bare message for info);
- progress as a tqdm bar when stderr is a terminal, and as a plain line every
  :data:`PLAIN_EVERY` seconds (plus one when a stage ends) when it is not, so that log
  files hold no bar text; nothing at all with ``-q``.

Verbosity: -q shows errors and the result only; the default adds warnings and progress;
-v adds info lines, -vv debug lines.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import click

#: Seconds between two plain progress lines when stderr is not a terminal.
PLAIN_EVERY = 10.0

_LEVELS = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


class _State:
    verbose = 0
    quiet = False


_state = _State()


def verbosity() -> int:
    """-1 with -q, else the number of -v given (0 by default)."""
    return -1 if _state.quiet else min(_state.verbose, 2)


def log_level() -> int:
    """The logging level the verbosity asks for."""
    return _LEVELS[verbosity()]


def is_quiet() -> bool:
    """True with -q: no progress, no warnings, only errors and the result."""
    return _state.quiet


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (progress bars) or a file or pipe (plain lines)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _ScreenHandler(logging.Handler):
    """Prints a record on stderr once, above any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.ERROR:
                text = click.style(f"error: {message}", fg="red")
            elif record.levelno >= logging.WARNING:
                text = click.style(f"warning: {message}", fg="yellow")
            elif record.levelno >= logging.INFO:
                text = message
            else:
                text = f"debug {record.name}: {message}"
            if record.exc_info and record.levelno < logging.WARNING:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            _write(text)
        except Exception:  # a handler must never raise into the library
            self.handleError(record)


def _write(text: str) -> None:
    """One line on stderr; above the bars when tqdm bars are open."""
    if stderr_is_terminal():
        from tqdm import tqdm

        if tqdm._instances:  # type: ignore[attr-defined]
            tqdm.write(text, file=sys.stderr)
            return
    click.echo(text, err=True)  # click drops the colour when stderr is not a terminal


def set_verbosity(verbose: int | None = None, quiet: bool | None = None) -> None:
    """Raise the verbosity by ``verbose`` (-v count) or make the CLI quiet, and apply it:
    the ``supermerge`` logger's level and the one screen handler's."""
    if verbose:
        _state.verbose += verbose
    if quiet:
        _state.quiet = True
    _apply()


def _apply() -> None:
    level = log_level()
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _ScreenHandler)), None)
    if handler is None:
        handler = _ScreenHandler()
        root.addHandler(handler)
    handler.setLevel(level)
    logging.getLogger("supermerge").setLevel(level)


def start(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Configure the screen for one command line run (the group's callback calls this);
    undone when ``ctx`` closes, so that commands run in one process (tests) stay apart."""
    saved = logging.getLogger("supermerge").level
    _state.verbose, _state.quiet = 0, False
    set_verbosity(verbose, quiet)

    def finish() -> None:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, _ScreenHandler)]:
            root.removeHandler(handler)
        logging.getLogger("supermerge").setLevel(saved)
        _state.verbose, _state.quiet = 0, False

    ctx.call_on_close(finish)


def verbosity_options(command: click.Command) -> click.Command:
    """Accept -v/-q after the command name too (``supermerge merge r.yaml -o out -q``)."""

    def more(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value:
            set_verbosity(verbose=value)

    def quiet(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value:
            set_verbosity(quiet=True)

    names = {name for p in command.params for name in p.opts}
    if "-v" not in names:
        command.params.append(click.Option(["-v", "--verbose"], count=True, expose_value=False,
                                           callback=more, help="More log output (-v info, "
                                           "-vv debug)."))
    if "-q" not in names:
        command.params.append(click.Option(["-q", "--quiet"], is_flag=True, expose_value=False,
                                           callback=quiet, help="Only errors and the "
                                           "result: no warnings, no progress."))
    return command


# --- progress ---------------------------------------------------------------------------


class PlainLinesBar:
    """tqdm's small interface (total, n, update, set_postfix, set_postfix_str, close) as
    plain lines: one every :data:`PLAIN_EVERY` seconds while it moves, one when it ends."""

    def __init__(self, desc: str = "", total: float | None = None, unit: str = "it",
                 **_: Any) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.n = 0
        self.postfix = ""
        self.started = self.last = time.monotonic()
        self.closed = False

    def _line(self, end: str = "") -> str:
        total = f"/{self.total:g}" if self.total else ""
        postfix = f" ({self.postfix})" if self.postfix else ""
        return f"{self.desc}: {self.n:g}{total} {self.unit}{postfix}{end}"

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= PLAIN_EVERY:
            self.last = now
            click.echo(self._line(), err=True)

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.n:
            click.echo(self._line(f", {time.monotonic() - self.started:.1f} s"), err=True)


class SilentBar(PlainLinesBar):
    """The same interface, silent (-q, or a process that is not rank 0)."""

    def update(self, n: float = 1) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True


def progress_bar(desc: str = "", *, show: bool = True, **kwargs: Any) -> Any:
    """A progress display for ``desc``: a tqdm bar on a terminal, plain periodic lines
    otherwise, nothing with -q or ``show=False``. ``kwargs`` are tqdm's (total, unit, ...)."""
    if not show or is_quiet():
        return SilentBar(desc, **kwargs)
    if stderr_is_terminal():
        from tqdm import tqdm

        return tqdm(desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True, **kwargs)
    return PlainLinesBar(desc, **kwargs)


# --- sizes ------------------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class ByteSize(click.ParamType):
    """A size in bytes: ``5368709120``, ``2GB`` (10^9, as Hugging Face's max_shard_size),
    ``500MB``, ``1.5GiB`` (2^30)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().replace(" ", "").replace("_", "")
        number = text.rstrip("BbKkMmGgTtIi")
        unit = text[len(number):].upper()
        try:
            size = float(number) * _UNITS[unit]
        except (KeyError, ValueError):
            self.fail(f"{value!r} is not a size: write bytes (5368709120) or a number with "
                      "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of "
                      "1024), e.g. 2GB", param, ctx)
        if size < 1:
            self.fail(f"{value!r}: the size must be at least 1 byte", param, ctx)
        return int(size)
