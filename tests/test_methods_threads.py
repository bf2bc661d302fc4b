"""Methods that spread their work over threads give the same bits for any thread count."""

from __future__ import annotations

import pytest
import torch

from supermerge.methods import TensorContext, get_method
from supermerge.methods.primitives import BLOCK, each, sign_consensus_

THREADED = ["ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
            "della_linear"]


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(-1).view(torch.int32)


def family(shape: tuple[int, ...], k: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A bfloat16-rounded base and k experts near it: quantised deltas, many exact ties."""
    gen = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(shape, generator=gen)).bfloat16().float()
    experts = [(base + 0.001 * torch.randn(shape, generator=gen)).bfloat16().float()
               for _ in range(k)]
    return base, experts


def merge(name: str, base: torch.Tensor, experts: list[torch.Tensor], threads: int
          ) -> torch.Tensor:
    method = get_method(name)
    params, models = method.validate({}, [{"weight": 1.0 + i / 4} for i in range(len(experts))])
    ctx = TensorContext(name="t", seed=11, scratch=True, threads=threads)
    return method.fn(base, [e.clone() for e in experts], params, models, ctx)


@pytest.mark.parametrize("name", THREADED)
def test_threads_change_no_bit(name):
    # 2 x BLOCK + 7 entries: the election runs on three blocks, the last one short
    base, experts = family((2 * BLOCK + 7,), 3, seed=1)
    one = merge(name, base, experts, threads=1)
    for threads in (2, 3, 8):
        assert torch.equal(bits(merge(name, base, experts, threads)), bits(one)), threads


@pytest.mark.parametrize("sign_on_weighted", [False, True])
def test_sign_consensus_by_blocks_on_threads_is_the_plain_loop(sign_on_weighted):
    _, deltas = family((3 * BLOCK + 1,), 4, seed=2)
    weights = [1.0, -0.5, 2.0, 0.0]
    one = sign_consensus_([d.clone() for d in deltas], weights,
                          sign_on_weighted=sign_on_weighted)
    two = sign_consensus_([d.clone() for d in deltas], weights,
                          sign_on_weighted=sign_on_weighted, threads=2)
    assert torch.equal(bits(one), bits(two))


def test_each_keeps_order_and_raises():
    assert list(each(lambda i: i * i, range(7), threads=3)) == [i * i for i in range(7)]
    assert list(each(lambda i: i + 1, [4], threads=3)) == [5]

    def fail(i: int) -> int:
        if i == 2:
            raise ValueError("item 2")
        return i

    with pytest.raises(ValueError, match="item 2"):
        list(each(fail, range(4), threads=2))
