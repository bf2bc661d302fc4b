"""``passthrough``: one model, returned unchanged."""

from __future__ import annotations

import pytest
import torch

from supermerge.errors import MethodError
from supermerge.methods import passthrough


def test_returns_the_model():
    x = torch.tensor([[1.0, -2.0]])
    assert torch.equal(passthrough(None, [x]), x)
    assert torch.equal(passthrough(torch.zeros(1, 2), [x]), x)
    assert torch.equal(passthrough(None, [torch.tensor(2.0)]), torch.tensor(2.0))


def test_refuses_two_models_and_weights():
    x = torch.ones(2)
    with pytest.raises(MethodError, match="exactly 1"):
        passthrough(None, [x, x])
    # mergekit accepts and ignores a weight on passthrough: so do we
    assert torch.equal(passthrough(None, [x], weights=[2.0]), x)


def test_scale_multiplies_the_tensor_and_one_is_the_tensor_itself():
    """mergekit's passthrough ``scale``: scale * x; 1 returns the very tensor."""
    x = torch.tensor([1.5, -2.0, 0.25])
    assert torch.equal(passthrough(None, [x], scale=0.0), torch.zeros(3))
    assert torch.equal(passthrough(None, [x], scale=-2.0), torch.tensor([-3.0, 4.0, -0.5]))
    assert torch.equal(passthrough(None, [x], scale=1.0), x)
    with pytest.raises(MethodError, match="scale"):
        passthrough(None, [x], scale=float("nan"))
