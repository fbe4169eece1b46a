"""The shared network: Opacus-compatible, right shapes, small, a fixed front end and a trained head."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from medfed.settings import ConfigError, RunConfig
from models.network import IMAGE_MULTIPLE, MIN_IMAGE_SIZE, build_model
from models.scattering import Scattering2D


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


def test_front_end_is_fixed_and_never_sent() -> None:
    """Only the head is trained and exchanged; the scattering filters are the same everywhere."""
    model = build_model(64)
    assert isinstance(model.fixed_front, Scattering2D)
    assert list(model.fixed_front.parameters()) == []
    head_keys = {f"classifier.{k}" for k in model.trainable.state_dict()}
    assert set(model.state_dict()) == head_keys
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in model.trainable.parameters())


def test_model_is_head_after_front() -> None:
    model = build_model(32).eval()
    x = torch.randn(4, 1, 32, 32)
    torch.testing.assert_close(model(x), model.trainable(model.fixed_front(x)))


@pytest.mark.parametrize("size", [8, 30, 62])
def test_rejects_sizes_the_front_end_cannot_take(size: int) -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        build_model(size)


def test_run_config_admits_exactly_the_sizes_the_network_takes() -> None:
    """The run config refuses an image size before any site tries to build the model."""
    assert RunConfig().image_size % IMAGE_MULTIPLE == 0
    build_model(MIN_IMAGE_SIZE)
    RunConfig().with_overrides(image_size=MIN_IMAGE_SIZE)
    with pytest.raises(ConfigError, match="image-size: Input should be a multiple of 4"):
        RunConfig().with_overrides(image_size=MIN_IMAGE_SIZE + 2)


def test_build_model_is_the_registry_network_of_the_default_study() -> None:
    """Callers of build_model and of the registry exchange the same parameter layout."""
    from models.registry import build_network
    from models.study import DEFAULT_STUDY

    a, b = build_model(DEFAULT_STUDY.image_size).state_dict(), build_network(DEFAULT_STUDY).state_dict()
    assert [(k, v.shape) for k, v in a.items()] == [(k, v.shape) for k, v in b.items()]


def test_scatter_head_emits_one_logit_per_class() -> None:
    from models.registry import build_network
    from models.study import Study

    study = Study.model_validate({"task": "multiclass", "classes": ["a", "b", "c", "d"]})
    model = build_network(study)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 4)
    assert model.classifier.head.out_features == study.num_outputs == 4
