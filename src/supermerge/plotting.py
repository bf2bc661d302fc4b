"""Whether the optional charts can be drawn: matplotlib is the ``plot`` extra.

Every chart supermerge writes (``accuracy.png``, ``coefficients.png``, ``front.png``) is
drawn only when :func:`can_plot` says so; without matplotlib it is skipped with one
warning and everything else is written.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

INSTALL = "pip install 'supermerge[plot]'"


def can_plot(what: str) -> bool:
    """Return True when matplotlib imports; else log a warning that ``what`` is not drawn
    and how to get it, and return False. Costs matplotlib's import the first time."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("%s not drawn: matplotlib is not installed (%s)", what, INSTALL)
        return False
    return True
