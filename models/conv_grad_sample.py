"""Faster per-sample convolution gradients for Opacus' "ew" mode on CPU.

Opacus' "ew" mode uses torch's expanded weights, which compute a conv layer's
per-sample weight gradients by grouped convolution for batches under 32 and by
unfold (im2col) above: one large copy of the input with every kernel tap laid
out, then one batched product. On CPU it is faster to loop over the kernel's
taps instead, each tap one batched product of the output gradient with a
shifted view of the padded input, written straight into its slot of the
result (for stride 1 the view is a contiguous slice of the flattened rows, so
nothing is copied). Measured at batch 256 on one thread, per layer of the
default network's head (`bench/dp_overhead.py` gives the whole step):

=====================================  ========  =================  =======
layer (in -> out, kernel, grid)         unfold    grouped (torch)    taps
=====================================  ========  =================  =======
81 -> 16, 1x1, 16x16                    16.0 ms   32.3 ms            5.9 ms
16 -> 16, 3x3, 16x16                    42.6 ms   21.6 ms            12.0 ms
16 -> 16, 3x3 stride 2, 16x16 -> 8x8    6.8 ms    8.1 ms             4.9 ms
16 -> 16, 3x3 stride 2, 8x8 -> 4x4      1.8 ms    4.2 ms             2.4 ms
=====================================  ========  =================  =======

so outputs smaller than 8x8 keep torch's unfold. No library exposes this
choice, so we make it here; the gradients are the same numbers, only the order
of the additions differs (a test compares them).

It swaps one function of torch's private ``_expanded_weights.conv_utils`` for
the duration of a ``with`` block; if a torch release moves it, the block
leaves torch's own choice in place and logs why.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: Outputs with fewer positions than this (8x8) keep torch's unfold, which is faster there.
MIN_TAP_OUTPUT = 8 * 8

_lock = threading.Lock()
_depth = 0
_original: Any = None  # torch's own function while a block holds the swap
_original_group: Any = None  # torch's grouped-convolution path (batches under 32), likewise


def _conv_utils() -> Any | None:
    try:
        from torch.nn.utils._expanded_weights import conv_utils
    except ImportError:  # pragma: no cover - depends on the torch release
        return None
    if not hasattr(conv_utils, "conv_unfold_weight_grad_sample"):
        return None  # pragma: no cover - depends on the torch release
    return conv_utils


def _by_taps(input: torch.Tensor, grad_output: torch.Tensor, weight_shape: Any, stride: Any,
             padding: Any) -> torch.Tensor:
    """Per-sample weight gradients of a 2-D convolution (no groups, no dilation), one kernel tap at a time."""
    batch, in_ch = input.shape[:2]
    out_ch, out_h, out_w = grad_output.shape[1:]
    kh, kw = weight_shape[-2:]
    (sh, sw), (ph, pw) = stride, padding
    out = input.new_empty(batch, out_ch, in_ch, kh, kw)
    if (sh, sw) == (1, 1) and (kh, kw) != (1, 1):
        # Stride 1: in the padded input flattened row by row, tap (a, b) of output pixel (i, j) sits
        # at (i * width + j) + (a * width + b). With the output gradient padded to the same row
        # width (zeros where no output is), every tap is one contiguous slice: no copies.
        width = input.shape[-1] + 2 * pw
        flat_in = torch.nn.functional.pad(input, (pw, pw, ph, ph + 1)).reshape(batch, in_ch, -1)
        flat_grad = torch.nn.functional.pad(grad_output, (0, width - out_w)).reshape(batch, out_ch, out_h * width)
        span = out_h * width
        for a in range(kh):
            for b in range(kw):
                start = a * width + b
                out[..., a, b] = torch.bmm(flat_grad, flat_in[:, :, start : start + span].transpose(1, 2))
        return out
    padded = torch.nn.functional.pad(input, (pw, pw, ph, ph)) if ph or pw else input
    grad = grad_output.reshape(batch, out_ch, out_h * out_w)
    for a in range(kh):
        for b in range(kw):
            view = padded[:, :, a : a + sh * (out_h - 1) + 1 : sh, b : b + sw * (out_w - 1) + 1 : sw]
            out[..., a, b] = torch.bmm(grad, view.reshape(batch, in_ch, out_h * out_w).transpose(1, 2))
    return out


def _picker(unfold: Any) -> Any:
    def weight_grad_sample(input: Any, grad_output: Any, weight_shape: Any, kernel_size: Any, stride: Any,
                           padding: Any, dilation: Any, groups: int, func: Any) -> Any:
        if (
            groups == 1
            and input.device.type == "cpu"
            and input.dim() == 4
            and grad_output.shape[-2] * grad_output.shape[-1] >= MIN_TAP_OUTPUT
            and not isinstance(padding, str)
            and all(d == 1 for d in dilation)
        ):
            return _by_taps(input, grad_output, weight_shape, stride, padding)
        return unfold(input, grad_output, weight_shape, kernel_size, stride, padding, dilation, groups, func)

    weight_grad_sample.medfed_picker = True  # type: ignore[attr-defined]
    return weight_grad_sample


def _contiguous(group: Any) -> Any:
    """torch's grouped path ``view``s the output gradient, which fails when it is not contiguous (the
    gradient of a ``torch.cat``, as in DenseNet's layers); a contiguous copy gives the same numbers."""

    def weight_grad_sample(input: Any, grad_output: Any, *args: Any) -> Any:
        return group(input, grad_output.contiguous(), *args)

    return weight_grad_sample


@contextlib.contextmanager
def fast_conv_grad_samples() -> Iterator[bool]:
    """Within the block, 2-D CPU convolutions get their per-sample weight gradients tap by tap.

    Yields whether the faster path is active. Re-entrant and thread-safe: the
    original function is restored when the outermost block ends.
    """
    global _depth, _original, _original_group
    cu = _conv_utils()
    if cu is None:
        logger.info("torch's expanded-weights conv helpers moved; per-sample conv gradients use torch's own choice")
        yield False
        return
    with _lock:
        if _depth == 0:
            _original = cu.conv_unfold_weight_grad_sample
            cu.conv_unfold_weight_grad_sample = _picker(_original)
            _original_group = getattr(cu, "conv_group_weight_grad_sample", None)
            if _original_group is not None:
                cu.conv_group_weight_grad_sample = _contiguous(_original_group)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                cu.conv_unfold_weight_grad_sample, _original = _original, None
                if _original_group is not None:
                    cu.conv_group_weight_grad_sample, _original_group = _original_group, None
