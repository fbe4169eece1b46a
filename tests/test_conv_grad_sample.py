"""Per-sample conv gradients tap by tap: the same numbers as torch's unfold, only faster."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from opacus.grad_sample import GradSampleModuleExpandedWeights
from torch.nn.utils._expanded_weights import conv_utils

from models import features
from models.conv_grad_sample import fast_conv_grad_samples
from models.network import build_model


def _grad_samples(fast: bool, batch: int = 40, size: int = 64) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(size)
    front, head = features.split(model)
    assert front is not None
    # Opacus' "ew" mode on what train_local trains: torch's expanded weights (batch 40 >= 32: torch would unfold)
    gsm = GradSampleModuleExpandedWeights(head, batch_first=True, loss_reduction="mean")
    x = front(torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(1)))
    y = (torch.arange(batch) % 2).float()
    with fast_conv_grad_samples() if fast else nullcontext():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(gsm(x).view(-1), y)
        loss.backward()
    return {n: p.grad_sample.detach().clone() for n, p in head.named_parameters()}


def test_faster_per_sample_gradients_equal_torchs_unfold() -> None:
    stock, fast = _grad_samples(False), _grad_samples(True)
    assert stock.keys() == fast.keys() and len(stock) == 18  # 4 x (conv w, b, norm w, b) + head w, b
    for name in stock:
        assert stock[name].shape[0] == 40, name
        torch.testing.assert_close(fast[name], stock[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_fast_path_runs_only_inside_the_block_and_nests() -> None:
    original = conv_utils.conv_unfold_weight_grad_sample
    with fast_conv_grad_samples() as active:
        assert active
        swapped = conv_utils.conv_unfold_weight_grad_sample
        assert swapped is not original and getattr(swapped, "medfed_picker", False)
        with fast_conv_grad_samples():
            assert conv_utils.conv_unfold_weight_grad_sample is swapped
        assert conv_utils.conv_unfold_weight_grad_sample is swapped  # the outer block still holds it
    assert conv_utils.conv_unfold_weight_grad_sample is original


def test_torchs_unfold_stays_for_what_the_tap_loop_does_not_cover(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dilated and grouped convolutions keep torch's own per-sample gradients, inside the block too."""
    calls: list[str] = []
    original = conv_utils.conv_unfold_weight_grad_sample

    def spy(*args: object) -> object:
        calls.append("unfold")
        return original(*args)

    monkeypatch.setattr(conv_utils, "conv_unfold_weight_grad_sample", spy)
    x = torch.randn(40, 4, 12, 12)
    y = torch.randn(40, 4, 12, 12)
    for conv, expected in [
        (torch.nn.Conv2d(4, 4, 3, padding=1), []),
        (torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2), ["unfold"]),
        (torch.nn.Conv2d(4, 4, 3, padding=1, groups=2), ["unfold"]),
    ]:
        calls.clear()
        stock = GradSampleModuleExpandedWeights(conv, batch_first=True, loss_reduction="sum")
        (stock(x) * y).sum().backward()
        want = conv.weight.grad_sample.detach().clone()
        del conv.weight.grad_sample, conv.bias.grad_sample
        calls.clear()
        with fast_conv_grad_samples():
            (stock(x) * y).sum().backward()
        assert calls == expected
        torch.testing.assert_close(conv.weight.grad_sample, want, rtol=1e-4, atol=1e-5)
