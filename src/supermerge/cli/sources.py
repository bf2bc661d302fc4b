"""Recipes from standard input: ``-`` as the recipe path of merge, learn and search.

Relative paths in a recipe read from stdin resolve against the working directory.
"""

from __future__ import annotations

import sys
from typing import Any

from supermerge.errors import RecipeError

STDIN = "-"
STDIN_NAME = "<stdin>"


def is_stdin(path: object) -> bool:
    """True when the recipe argument is ``-``."""
    return str(path) == STDIN


def stdin_document(what: str = "recipe") -> dict[str, Any]:
    """Read standard input as one YAML mapping; RecipeError (naming <stdin>) otherwise."""
    import yaml

    text = sys.stdin.read()
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"not valid YAML: {err}", file=STDIN_NAME,
                          fix="fix the YAML syntax") from None
    if not isinstance(document, dict):
        raise RecipeError(f"the {what} on standard input is "
                          f"{'empty' if document is None else 'not a YAML mapping'}",
                          file=STDIN_NAME, fix=f"pipe the {what} file in: supermerge ... - "
                          f"< {what}.yaml")
    return document
