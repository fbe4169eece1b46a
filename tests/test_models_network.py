"""The shared network: Opacus-compatible, right shapes, small."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from models.network import build_model


def test_opacus_strict_validation_finds_nothing() -> None:
    model = build_model(64)
    assert ModuleValidator.validate(model, strict=True) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())


@pytest.mark.parametrize("size", [32, 64, 96])
def test_output_is_one_logit_per_image(size: int) -> None:
    model = build_model(size)
    out = model(torch.randn(3, 1, size, size))
    assert out.shape == (3, 1) and out.dtype == torch.float32


def test_small_enough_for_dp() -> None:
    """DP noise grows with the parameter count: the model must stay a few thousand weights."""
    n = sum(p.numel() for p in build_model(64).parameters())
    assert 3_000 <= n <= 10_000


def test_same_parameter_layout_for_every_site() -> None:
    """Sites and coordinator exchange arrays by position, so the layout must be fixed."""
    a, b = build_model(64).state_dict(), build_model(64).state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)


def test_rejects_too_small_images() -> None:
    with pytest.raises(ValueError):
        build_model(8)
