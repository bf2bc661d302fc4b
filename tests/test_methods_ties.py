"""``ties``: trim, elect sign, disjoint mean (Yadav et al. 2023)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.errors import MethodError
from supermerge.methods import TensorContext, task_arithmetic, ties
from supermerge.methods.primitives import GlobalMagnitudeThreshold, MagnitudeThresholds
from supermerge.methods.ties_method import merge_ties

T = torch.tensor
BASE = torch.ones(6)
TAUS = [
    T([4.0, -1.0, 0.5, -3.0, 2.0, 0.0]),
    T([3.0, 3.0, -0.2, 1.0, -5.0, 1.0]),
    T([1.0, -4.0, 0.1, 2.0, 3.0, -0.5]),
]
EXPERTS = [BASE + tau for tau in TAUS]
# density 0.5 keeps 3 entries each:
#   t1 = [4, 0, 0, -3, 2, 0], t2 = [3, 3, 0, 0, -5, 0], t3 = [0, -4, 0, 2, 3, 0]
#   sum = [7, -1, 0, -1, 0, 0] -> elected sign [+, -, 0, -, 0, 0]


def test_paper_oracle():
    # entry 0: t1, t2 agree -> (4 + 3) / 2; entry 1: t3 -> -4; entry 3: t1 -> -3; rest 0
    out = ties(BASE, EXPERTS, density=0.5)
    torch.testing.assert_close(out, BASE + T([3.5, -4.0, 0.0, -3.0, 0.0, 0.0]))
    out = ties(BASE, EXPERTS, density=0.5, **{"lambda": 0.5})
    torch.testing.assert_close(out, BASE + T([1.75, -2.0, 0.0, -1.5, 0.0, 0.0]))


def test_weighted_oracles():
    w = [1.0, 2.0, 3.0]
    # entry 0: (1*4 + 2*3) / (1 + 2)
    out = ties(BASE, EXPERTS, weights=w, density=0.5)
    torch.testing.assert_close(out, BASE + T([10 / 3, -4.0, 0.0, -3.0, 0.0, 0.0]))
    out = ties(BASE, EXPERTS, weights=w, density=0.5, normalize=False)
    torch.testing.assert_close(out, BASE + T([10.0, -12.0, 0.0, -3.0, 0.0, 0.0]))
    # electing on w * t: sums [10, -6, 0, 3, 1, 0] -> signs [+, -, 0, +, +, 0]
    # entry 3: 3*2 / 3; entry 4: (1*2 + 3*3) / (1 + 3)
    out = ties(BASE, EXPERTS, weights=w, density=0.5, sign_on_weighted=True)
    torch.testing.assert_close(out, BASE + T([10 / 3, -4.0, 0.0, 2.0, 2.75, 0.0]))


def test_model_scope_uses_the_given_thresholds():
    # keep |tau| >= 2.5: t1 = [4,0,0,-3,0,0], t2 = [3,3,0,0,-5,0], t3 = [0,-4,0,0,3,0]
    # sum [7, -1, 0, -3, -2, 0]; entry 4: t2 alone agrees
    ctx = TensorContext(statistic=MagnitudeThresholds((2.5, 2.5, 2.5)))
    params, models = ties.validate({"trim_scope": "model"}, [{}] * 3)
    out = merge_ties(BASE, EXPERTS, params, models, ctx)
    torch.testing.assert_close(out, BASE + T([3.5, -4.0, 0.0, -3.0, -5.0, 0.0]))


def test_model_scope_without_statistic_is_an_error():
    params, models = ties.validate({"trim_scope": "model"}, [{}])
    with pytest.raises(MethodError, match="whole-model"):
        merge_ties(BASE, EXPERTS[:1], params, models, TensorContext(name="w"))
    assert ties.statistic(*ties.validate({}, [{}])) is None


def test_model_scope_trims_across_tensors():
    gen = torch.Generator().manual_seed(0)
    bases = [torch.randn(20, 5, generator=gen), torch.randn(7, generator=gen)]
    experts = [[b + torch.randn(b.shape, generator=gen) * s for b in bases] for s in (1, 3)]
    params, models = ties.validate({"trim_scope": "model"}, [{"density": 0.3}] * 2)
    stat = ties.statistic(params, models)
    assert isinstance(stat, GlobalMagnitudeThreshold)
    for p in range(stat.passes):
        for j, base in enumerate(bases):
            for i, model in enumerate(experts):
                stat.observe(p, i, model[j] - base)
        stat.finish_pass(p)
    ctx = TensorContext(statistic=stat.result())
    for j, base in enumerate(bases):
        got = merge_ties(base, [m[j] for m in experts], params, models, ctx)
        trimmed = []
        for model in experts:  # oracle: one global top-30% per model
            flat = torch.cat([(m - b).abs().reshape(-1) for m, b in zip(model, bases, strict=True)])
            t = flat.kthvalue(flat.numel() - round(0.3 * flat.numel()) + 1).values
            tau = model[j] - base
            trimmed.append(base + torch.where(tau.abs() >= t, tau, 0.0))
        torch.testing.assert_close(got, ties(base, trimmed, density=1.0))


def test_degenerate_inputs_give_no_nan():
    base = T([1.0, 2.0])
    assert torch.equal(ties(base, [base, base]), base)
    assert torch.equal(ties(base, [base + 1], weights=[0.0], density=1.0), base)
    assert torch.equal(ties(T(1.0), [T(3.0), T(-1.0)], density=1.0), T(1.0))  # +2 vs -2: 0
    assert torch.equal(ties(T(1.0), [T(3.0)], density=1.0), T(3.0))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 5), max_size=3).map(tuple),
    st.integers(1, 4),
    st.floats(0, 1),
    st.integers(0, 2**32 - 1),
)
def test_k_copies(shape, k, density, seed):
    gen = torch.Generator().manual_seed(seed)
    base, x = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    torch.testing.assert_close(ties(base, [x] * k, density=1.0), x)
    torch.testing.assert_close(ties(base, [x] * k, density=density),
                               ties(base, [x], density=density))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 5), max_size=3).map(tuple),
    st.floats(-3, 3),
    st.floats(-3, 3),
    st.integers(0, 2**32 - 1),
)
def test_one_model_at_density_one_is_task_arithmetic(shape, scale, weight, seed):
    gen = torch.Generator().manual_seed(seed)
    base, x = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    torch.testing.assert_close(
        ties(base, [x], density=1.0, scale=scale), task_arithmetic(base, [x], scale=scale)
    )
    torch.testing.assert_close(
        ties(base, [x], weights=[weight], density=1.0, scale=scale, normalize=False),
        task_arithmetic(base, [x], weights=[weight], scale=scale),
    )


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_negating_every_task_vector_negates_the_merge(k, density, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.zeros(12)  # so that the task vectors are exactly the experts
    taus = [torch.randn(12, generator=gen) for _ in range(k)]
    plus = ties(base, taus, density=density)
    assert torch.equal(ties(base, [-t for t in taus], density=density), -plus)
