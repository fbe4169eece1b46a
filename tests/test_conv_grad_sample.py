"""Grouped-convolution per-sample gradients: the same numbers as torch's unfold, only faster."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from opacus.grad_sample import GradSampleModuleExpandedWeights
from torch.nn.utils._expanded_weights import conv_utils

from models.conv_grad_sample import grouped_conv_grad_samples
from models.network import build_model


def _grad_samples(fast: bool, batch: int = 40, size: int = 64) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(size)
    # Opacus' "ew" mode: torch's expanded weights (batch 40 >= 32: torch itself would unfold)
    gsm = GradSampleModuleExpandedWeights(model, batch_first=True, loss_reduction="mean")
    x = torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(1))
    y = (torch.arange(batch) % 2).float()
    with grouped_conv_grad_samples() if fast else nullcontext():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(gsm(x).view(-1), y)
        loss.backward()
    return {n: p.grad_sample.detach().clone() for n, p in model.named_parameters()}


def test_grouped_per_sample_gradients_equal_torchs_unfold() -> None:
    stock, fast = _grad_samples(False), _grad_samples(True)
    assert stock.keys() == fast.keys() and len(stock) == 22  # 5 x (conv w, b, norm w, b) + head w, b
    for name in stock:
        assert stock[name].shape[0] == 40, name
        torch.testing.assert_close(fast[name], stock[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_grouped_path_runs_only_inside_the_block_and_nests() -> None:
    original = conv_utils.conv_unfold_weight_grad_sample
    with grouped_conv_grad_samples() as active:
        assert active
        swapped = conv_utils.conv_unfold_weight_grad_sample
        assert swapped is not original and getattr(swapped, "medfed_picker", False)
        with grouped_conv_grad_samples():
            assert conv_utils.conv_unfold_weight_grad_sample is swapped
        assert conv_utils.conv_unfold_weight_grad_sample is swapped  # the outer block still holds it
    assert conv_utils.conv_unfold_weight_grad_sample is original


def test_small_inputs_keep_torchs_unfold(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    grouped = conv_utils.conv_group_weight_grad_sample

    def spy(*args: object) -> object:
        calls.append("grouped")
        return grouped(*args)

    monkeypatch.setattr(conv_utils, "conv_group_weight_grad_sample", spy)
    _grad_samples(True, batch=40, size=16)  # every layer's input is below 32x32
    assert calls == []
    _grad_samples(True, batch=40, size=64)  # the first three layers' inputs are 64x64, 64x64, 32x32
    assert len(calls) == 3
