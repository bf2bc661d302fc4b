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
    with pytest.raises(MethodError, match="does not weight"):
        passthrough(None, [x], weights=[2.0])
