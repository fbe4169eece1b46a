"""Per-sample convolution gradients by grouped convolution for Opacus' "ew" mode on CPU.

Opacus' "ew" mode uses torch's expanded weights, which compute a conv layer's
per-sample weight gradients by grouped convolution only for batches under 32
and by unfold (im2col) above: at full resolution that copies nine times the
layer's input per step. On CPU, for inputs of 32x32 and more, the grouped
convolution (torch's own ``conv_group_weight_grad_sample``) is faster at any
batch; measured on the default network at batch 256, one thread: first layer
21 ms against 73 ms, second 53 against 86 (`bench/dp_overhead.py` gives the
step ratio). No library exposes this choice, so we make it here; the gradients
are the same numbers, only the order of the additions differs.

It swaps one function of torch's private ``_expanded_weights.conv_utils`` for
the duration of a ``with`` block; if a torch release moves it, the block
leaves torch's own choice in place and logs why.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

#: Inputs with at least this many pixels per channel take the grouped convolution.
MIN_GROUPED_PIXELS = 32 * 32

_lock = threading.Lock()
_depth = 0
_original: Any = None  # torch's own function while a block holds the swap


def _conv_utils() -> Any | None:
    try:
        from torch.nn.utils._expanded_weights import conv_utils
    except ImportError:  # pragma: no cover - depends on the torch release
        return None
    if not all(hasattr(conv_utils, f) for f in ("conv_unfold_weight_grad_sample", "conv_group_weight_grad_sample")):
        return None  # pragma: no cover - depends on the torch release
    return conv_utils


def _picker(unfold: Any, grouped: Any) -> Any:
    def weight_grad_sample(input: Any, grad_output: Any, weight_shape: Any, kernel_size: Any, stride: Any,
                           padding: Any, dilation: Any, groups: int, func: Any) -> Any:
        if groups == 1 and input.device.type == "cpu" and math.prod(input.shape[2:]) >= MIN_GROUPED_PIXELS:
            return grouped(input, grad_output, weight_shape, stride, padding, dilation, input.shape[0], func)
        return unfold(input, grad_output, weight_shape, kernel_size, stride, padding, dilation, groups, func)

    weight_grad_sample.medfed_picker = True  # type: ignore[attr-defined]
    return weight_grad_sample


@contextlib.contextmanager
def grouped_conv_grad_samples() -> Iterator[bool]:
    """Within the block, large CPU conv inputs get per-sample gradients by grouped convolution.

    Yields whether the faster path is active. Re-entrant and thread-safe: the
    original function is restored when the outermost block ends.
    """
    global _depth, _original
    cu = _conv_utils()
    if cu is None:
        logger.info("torch's expanded-weights conv helpers moved; per-sample conv gradients use torch's own choice")
        yield False
        return
    with _lock:
        if _depth == 0:
            _original = cu.conv_unfold_weight_grad_sample
            cu.conv_unfold_weight_grad_sample = _picker(_original, cu.conv_group_weight_grad_sample)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                cu.conv_unfold_weight_grad_sample, _original = _original, None
