"""Text for `supermerge methods`: every registered method, its parameters and its paper."""

from __future__ import annotations

from typing import Any

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


def methods_document(name: str | None = None) -> dict[str, Any]:
    """``supermerge methods --json``: ``{"methods": [method, ...]}``, or one method's object
    when ``name`` is given (MethodError if unknown). A method is ``{name, kind
    ("data_free" | "learned"), summary, paper, needs, needs_base, min_models, max_models,
    parameters: [{name, type, default, per_model, description}]}``."""
    learned = {m.name: m for m in LEARNED_METHODS}
    if name is not None:
        return _method_object(learned[name] if name in learned else _data_free(name, learned))
    return {"methods": [_method_object(m) for m in [*available_methods(), *LEARNED_METHODS]]}


def _method_object(method: Method | LearnedMethod) -> dict[str, Any]:
    return {
        "name": method.name,
        "kind": "learned" if isinstance(method, LearnedMethod) else "data_free",
        "summary": method.summary,
        "paper": method.paper,
        "needs": method.needs,
        "needs_base": method.needs_base,
        "min_models": method.min_models,
        "max_models": method.max_models,
        "parameters": [{"name": p.name, "type": p.type, "default": _plain(p.default),
                        "per_model": p.per_model, "description": p.description}
                       for p in method.describe()],
    }


def _plain(value: Any) -> Any:
    """A default as JSON can hold it: numbers, strings, lists and mappings as they are,
    anything else as its text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


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
