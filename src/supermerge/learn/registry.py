"""Every learned method, by name: importing this module registers them all.

Each method registers itself in its own module (:func:`supermerge.learn.method.register`);
this module imports those modules, so a new learned method is its file plus one import
line here.
"""

from __future__ import annotations

import supermerge.learn.fisher
import supermerge.learn.merge
import supermerge.learn.regmean
import supermerge.learn.surgery
import supermerge.learn.twin  # noqa: F401  (each registers its methods)
from supermerge.learn.method import LearnedMethod, lookup, registered

LEARNED_METHODS: list[LearnedMethod] = [m for _, m in sorted(registered().items())]
"""Every learned method, sorted by name."""


def get_learned_method(name: str) -> LearnedMethod:
    """Return the learned method named ``name``; MethodError with the closest names if
    unknown."""
    return lookup(name)
