"""``model_stock``: interpolate toward the average by the angle between task vectors."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermerge.errors import MethodError
from supermerge.methods import TensorContext, model_stock, model_stock_method
from supermerge.methods.model_stock_method import gram, merge_model_stock

T = torch.tensor
R2 = math.sqrt(2)


def test_two_models_oracle():
    # tau1 = [1, 0], tau2 = [1, 1]: cos = 1/sqrt2, t = 2c / (1 + c) = 2 (sqrt2 - 1)
    # merged = base + t * mean(tau) = base + t * [1, 0.5]
    base = T([1.0, -1.0])
    out = model_stock(base, [base + T([1.0, 0.0]), base + T([1.0, 1.0])])
    t = 2 * (R2 - 1)
    torch.testing.assert_close(out, base + T([t, t / 2]))


def test_three_models_average_the_pairwise_cosines():
    # cosines 0, 1/sqrt2, 1/sqrt2 -> c = sqrt2 / 3, t = 3c / (1 + 2c) = 3 sqrt2 / (3 + 2 sqrt2)
    # mean(tau) = [2/3, 2/3] -> each entry t * 2/3 = 6 sqrt2 - 8
    base = torch.zeros(2)
    out = model_stock(base, [T([1.0, 0.0]), T([0.0, 1.0]), T([1.0, 1.0])])
    torch.testing.assert_close(out, T([6 * R2 - 8, 6 * R2 - 8]))


def test_filter_wise_uses_one_ratio_per_row():
    base = torch.zeros(2, 2)
    x1, x2 = T([[1.0, 0.0], [1.0, 0.0]]), T([[1.0, 1.0], [2.0, 0.0]])
    # row 0: as the two-model oracle; row 1: cos 1 -> t 1 -> the mean [1.5, 0]
    t = 2 * (R2 - 1)
    out = model_stock(base, [x1, x2], filter_wise=True)
    torch.testing.assert_close(out, T([[t, t / 2], [1.5, 0.0]]))
    # per tensor: <tau1, tau2> = 3, |tau1| = sqrt2, |tau2| = sqrt6 -> c = 3 / sqrt12
    c = 3 / math.sqrt(12)
    t = 2 * c / (1 + c)
    torch.testing.assert_close(model_stock(base, [x1, x2]), t * T([[1.0, 0.5], [1.5, 0.0]]))


def test_opposite_and_orthogonal_task_vectors_give_the_base():
    base = T([1.0, 2.0])
    assert torch.equal(model_stock(base, [base + T([1.0, 0.0]), base + T([-1.0, 0.0])]), base)
    assert torch.equal(model_stock(base, [base + T([1.0, 0.0]), base + T([0.0, 3.0])]), base)


def test_degenerate_inputs_give_no_nan():
    base = T([1.0, 2.0])
    assert torch.equal(model_stock(base, [base, base]), base)  # zero task vectors
    assert torch.equal(model_stock(base, [base, base + T([1.0, 2.0])]), base)  # one zero
    assert torch.equal(model_stock(T(0.0), [T(2.0), T(4.0)]), T(3.0))  # 0-d, cos 1
    assert torch.equal(model_stock(T(0.0), [T(2.0), T(-4.0)]), T(0.0))  # 0-d, cos -1


def test_one_model_is_a_clear_error():
    with pytest.raises(MethodError, match="at least 2"):
        model_stock(torch.zeros(2), [torch.ones(2)])
    params, models = model_stock.validate({}, [{}, {}])
    with pytest.raises(MethodError, match="at least 2 fine-tuned"):
        merge_model_stock(torch.zeros(2), [torch.ones(2)], params, models[:1], TensorContext())
    # mergekit accepts and ignores a weight on model_stock: so do we
    base, experts = torch.zeros(2), [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])]
    assert torch.equal(model_stock(base, experts, weights=[0.6, 0.4]), model_stock(base, experts))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 5), max_size=3).map(tuple),
    st.integers(2, 4),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_copies_return_the_model_and_t_stays_in_range(shape, k, rows, seed):
    gen = torch.Generator().manual_seed(seed)
    base, x = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    torch.testing.assert_close(model_stock(base, [x] * k, filter_wise=rows), x)
    experts = [torch.randn(shape, generator=gen) for _ in range(k)]
    out = model_stock(base, experts, filter_wise=rows)
    mean = sum(experts) / k
    # merged = base + t (mean - base) with t in [0, 1] per row: between base and mean
    lo, hi = torch.minimum(base, mean), torch.maximum(base, mean)
    assert torch.all(out >= lo - 1e-5) and torch.all(out <= hi + 1e-5)


@pytest.mark.parametrize("block", [1, 5, 7, 40])
def test_gram_in_blocks_is_the_float64_gram(block):
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(6, 7, generator=gen) for _ in range(3)]
    with mock.patch.object(model_stock_method, "BLOCK", block):
        got = gram(rows)
    stacked = torch.stack(rows).double()  # (K, R, W)
    torch.testing.assert_close(got, torch.einsum("irw,jrw->rij", stacked, stacked))
