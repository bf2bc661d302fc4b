"""What every command shares: SupermergeError as one clean message and exit code 1;
Ctrl-C and SIGTERM as a clean stop (exit codes 130 and 143)."""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from supermerge.errors import SupermergeError


def quiet_transformers() -> None:
    """Hide transformers' own loading bars (the commands show their progress); no-op
    without transformers."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    transformers_logging.disable_progress_bar()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, as Ctrl-C raises KeyboardInterrupt: every
    ``with`` block and ``finally`` on the way out runs (the writer removes its temporary
    folder), then the command exits 143."""


def friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command: a SupermergeError prints as `error: ...` and exits 1, no traceback;
    Ctrl-C exits 130 and SIGTERM 143 (128 + the signal, as a shell reports them), each
    after the same clean-up, with one line saying so."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _sigterm_as_interrupt():
                return command(*args, **kwargs)
        except SupermergeError as err:
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(1)
        except KeyboardInterrupt as stop:
            terminated = isinstance(stop, Terminated)
            what = "terminated (SIGTERM)" if terminated else "interrupted (Ctrl-C)"
            click.secho(f"{what}: stopped, temporary files removed", fg="red", err=True)
            sys.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))

    return wrapper


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated in the main thread (later SIGTERMs are
    ignored, so that they cannot cut the clean-up short). No-op outside the main thread,
    where Python cannot set signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
