"""Text for `supermerge methods`: every registered method, its parameters and its paper."""

from __future__ import annotations

from supermerge.methods import available_methods, get_method
from supermerge.methods.registry import Method


def describe_methods(name: str | None = None) -> str:
    """Return the table of all methods, or one method in full (MethodError if unknown)."""
    if name is not None:
        return _describe(get_method(name))
    lines = [f"{'method':<18} {'needs':<8} {'base':<5} summary"]
    for method in available_methods():
        lines.append(f"{method.name:<18} {method.needs:<8} "
                     f"{'yes' if method.needs_base else 'no':<5} {method.summary}")
    lines.append("\n`supermerge methods NAME` shows a method's parameters and paper.")
    return "\n".join(lines)


def _describe(method: Method) -> str:
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
