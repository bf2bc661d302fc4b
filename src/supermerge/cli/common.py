"""What every command shares: SupermergeError as one clean message and exit code 1."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
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


def friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command: a SupermergeError prints as `error: ...` and exits 1, no traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SupermergeError as err:
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(1)

    return wrapper
