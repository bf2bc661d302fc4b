"""``nearswap``: the expert's value within t of the base, a step of t toward it elsewhere."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.errors import MethodError
from supermerge.methods import nearswap

T = torch.tensor


def test_oracle():
    base = T([1.0, 1.0, 1.0, 1.0])
    expert = base + T([0.5, -0.05, 2e-7, -0.25])
    # w = clamp(0.1 / max(|d|, 1e-6), 0, 1) = [0.2, 1, 1, 0.4]
    out = nearswap(base, [expert], t=0.1)
    torch.testing.assert_close(out, base + T([0.1, -0.05, 2e-7, -0.1]))
    assert out[1] == expert[1] and out[2] == expert[2]  # w = 1: exactly the expert's value


def test_below_the_floor_the_weight_is_t_over_1e_6():
    out = nearswap(T([0.0]), [T([2e-8])], t=1e-7)  # w = 1e-7 / 1e-6 = 0.1, not 1
    torch.testing.assert_close(out, T([2e-9]))


def test_t_zero_is_the_base_and_a_large_t_the_expert():
    base, expert = T([0.0, 3.0]), T([5.0, -1.0])
    assert torch.equal(nearswap(base, [expert], t=0.0), base)
    assert torch.equal(nearswap(base, [expert], t=10.0), expert)
    assert torch.equal(nearswap(base, [base.clone()]), base)  # zero task vector
    assert torch.equal(nearswap(T(2.0), [T(2.0)]), T(2.0))
    with pytest.raises(MethodError, match="t"):
        nearswap(base, [expert], t=-1.0)
    assert torch.equal(nearswap(base, [expert], weights=[3.0]), nearswap(base, [expert]))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 5), max_size=3).map(tuple),
    st.floats(1e-6, 3.0),
    st.integers(0, 2**32 - 1),
)
def test_is_the_task_vector_clipped_to_t(shape, t, seed):
    gen = torch.Generator().manual_seed(seed)
    base, expert = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    clipped = base + (expert - base).clamp(-t, t)
    torch.testing.assert_close(nearswap(base, [expert], t=t), clipped)
