"""Text for `supermerge methods`: every registered method, its parameters and its paper."""

from __future__ import annotations

from supermerge.errors import MethodError
from supermerge.learn import LEARNED_METHODS, LearnedMethod
from supermerge.methods import available_methods, get_method
from supermerge.methods.registry import Method


def describe_methods(name: str | None = None) -> str:
    """Return the table of all methods, or one method in full (MethodError if unknown)."""
    learned = {m.name: m for m in LEARNED_METHODS}
    if name is not None:
        return _describe(learned[name] if name in learned else _data_free(name, learned))
    lines = [f"{'method':<18} {'needs':<10} {'base':<5} summary"]
    for method in [*available_methods(), *LEARNED_METHODS]:
        lines.append(f"{method.name:<18} {method.needs:<10} "
                     f"{'yes' if method.needs_base else 'no':<5} {method.summary}")
    lines.append("\n`supermerge methods NAME` shows a method's parameters and paper. "
                 "supermerge, adamerging, fisher and regmean run with `supermerge learn` "
                 "(a learn recipe gives each expert its data).")
    return "\n".join(lines)


def _data_free(name: str, learned: dict[str, LearnedMethod]) -> Method:
    try:
        return get_method(name)
    except MethodError as err:
        raise MethodError(f"{err.message} (nor a learned method)",
                          fix=f"{err.fix}; learned: {', '.join(sorted(learned))}") from None


def _describe(method: Method | LearnedMethod) -> str:
    count = (f"{method.min_models}" if method.min_models == method.max_models
             else f"{method.min_models}+" if method.max_models is None
             else f"{method.min_models}-{method.max_models}")
    lines = [
        f"{method.name}: {method.summary}",
        f"  paper: {method.paper}",
        f"  data needed: {method.needs}; base model: "
        f"{'required' if method.needs_base else 'optional'}; models: {count}",
        "  parameters:",
    ]
    for p in method.describe():
        scope = "per model" if p.per_model else "global"
        lines.append(f"    {p.name:<18} {p.type:<22} default {p.default!r:<10} ({scope}) "
                     f"{p.description}")
    return "\n".join(lines)
