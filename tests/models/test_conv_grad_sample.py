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
    """Dilated, grouped and tiny-output convolutions keep torch's own per-sample gradients, inside the block too."""
    calls: list[str] = []
    original = conv_utils.conv_unfold_weight_grad_sample

    def spy(*args: object) -> object:
        calls.append("unfold")
        return original(*args)

    monkeypatch.setattr(conv_utils, "conv_unfold_weight_grad_sample", spy)
    x = torch.randn(40, 4, 12, 12)
    for conv, expected in [
        (torch.nn.Conv2d(4, 4, 3, padding=1), []),
        (torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2), ["unfold"]),
        (torch.nn.Conv2d(4, 4, 3, padding=1, groups=2), ["unfold"]),
        (torch.nn.Conv2d(4, 4, 3, padding=1, stride=4), ["unfold"]),  # 3x3 output: below 8x8
    ]:
        calls.clear()
        stock = GradSampleModuleExpandedWeights(conv, batch_first=True, loss_reduction="sum")
        (stock(x) ** 2).sum().backward()
        want = conv.weight.grad_sample.detach().clone()
        del conv.weight.grad_sample, conv.bias.grad_sample
        calls.clear()
        with fast_conv_grad_samples():
            (stock(x) ** 2).sum().backward()
        assert calls == expected
        torch.testing.assert_close(conv.weight.grad_sample, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "shape"),
    [(3, 1, 1, (9, 12)), (3, 1, 0, (10, 11)), (5, 1, 2, (8, 9)), (1, 1, 0, (8, 10)), (3, 2, 1, (17, 19)),
     (2, 2, 0, (16, 18))],
)
def test_tap_loop_equals_unfold_for_every_layout(
    kernel: int, stride: int, padding: int, shape: tuple[int, int]
) -> None:
    """Stride 1 takes the flattened-rows path, other strides the strided views: both give torch's numbers."""
    g = torch.Generator().manual_seed(kernel * 10 + stride)
    conv = torch.nn.Conv2d(3, 5, kernel, stride=stride, padding=padding)
    x = torch.randn(33, 3, *shape, generator=g)
    out_shape = conv(x).shape
    grad_out = torch.randn(out_shape, generator=g)
    args = (conv.weight.shape, (kernel, kernel), (stride, stride), (padding, padding), (1, 1), 1,
            torch.nn.functional.conv2d)
    want = conv_utils.conv_unfold_weight_grad_sample(x, grad_out, *args)
    with fast_conv_grad_samples():
        got = conv_utils.conv_unfold_weight_grad_sample(x, grad_out, *args)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
