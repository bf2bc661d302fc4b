"""Scratch buffers: the engine lends the experts (``TensorContext.scratch``), Python does not.

Every method must give the same bits either way, never touch the base, and leave a Python
caller's tensors exactly as they were.
"""

from __future__ import annotations

import pytest
import torch

from supermerge.methods import TaskSpecific, TensorContext, available_methods, get_method

PARAMETERS = {
    "breadcrumbs": {"density": 0.5, "gamma": 0.05},
    "consensus": {"k": 2},
    "dare_linear": {"density": 0.4},
    "dare_ties": {"density": 0.4, "sign_on_weighted": True},
    "della": {"density": 0.4, "epsilon": 0.2},
    "della_linear": {"density": 0.4, "epsilon": 0.2},
    "lines": {"alpha": 0.3, "beta": 0.5, "inner": "ties", "inner_params": {"density": 0.3}},
    "model_stock": {"filter_wise": True},
    "nuslerp": {"t": 0.3, "row_wise": True},
    "pcb": {"ratio": 0.2},
    "slerp": {"t": 0.3},
    "task_arithmetic": {"lambda": 0.7},
    "ties": {"density": 0.3},
}
# every registered method (defaults where PARAMETERS has none), plus whole-model statistics
CASES = [(m.name, PARAMETERS.get(m.name, {})) for m in available_methods()] + [
    ("ties", {"density": 0.3, "trim_scope": "model", "normalize": False}),
    ("lines", {"inner": "consensus", "beta": 0.2}),
]
SHAPES = [(300, 128), (12, 7), (9,), ()]  # 38,400 entries: ranked by sampling (see _narrow)


def inputs(name: str, shape, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    k = get_method(name).max_models or 3
    base = torch.randn(shape, generator=gen)
    experts = [base + 0.1 * torch.randn(shape, generator=gen) for _ in range(k)]
    if shape == (300, 128):  # exact ties and zeros in a task vector
        experts[0] = base + (experts[0] - base).mul(20).round().div(20)
    return base, experts


def merge(name: str, base, experts, parameters, scratch: bool):
    """Call the method's function as the engine does, its statistic over this one tensor."""
    method = get_method(name)
    glob, defaults = method.split_defaults(parameters)
    typed, models = method.validate(glob, [dict(defaults) for _ in experts])
    stat = method.statistic(typed, models) if method.statistic else None
    if stat is not None:
        for p in range(stat.passes):
            for i, expert in enumerate(experts):
                stat.observe(p, i, expert - base)
            stat.finish_pass(p)
    ctx = TensorContext(name="t", seed=3, position=0.5, scratch=scratch,
                        statistic=stat.result() if stat is not None else None)
    return method.fn(base, experts, typed, models, ctx)


def same(a, b) -> bool:
    if isinstance(a, TaskSpecific):
        masks = all(torch.equal(x, y) for x, y in zip(a.masks, b.masks, strict=True))
        return torch.equal(a.shared, b.shared) and masks and a.scales == b.scales
    return torch.equal(a, b)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("name", "parameters"), CASES)
def test_scratch_gives_the_same_bits_and_never_touches_the_base(name, parameters, shape):
    base, experts = inputs(name, shape)
    originals = [base.clone(), *(e.clone() for e in experts)]
    lent = merge(name, base, experts, parameters, scratch=False)
    assert all(torch.equal(a, b) for a, b in zip([base, *experts], originals, strict=True))
    owned = merge(name, base, [e.clone() for e in experts], parameters, scratch=True)
    assert torch.equal(base, originals[0])
    assert same(owned, lent)


@pytest.mark.parametrize(("name", "parameters"), CASES)
def test_python_callers_tensors_stay_untouched(name, parameters):
    base, experts = inputs(name, (300, 128), seed=1)
    originals = [base.clone(), *(e.clone() for e in experts)]
    get_method(name)(base, experts, **parameters)
    assert all(torch.equal(a, b) for a, b in zip([base, *experts], originals, strict=True))
