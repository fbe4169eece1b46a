"""The network's fixed front end, computed once per dataset instead of once per step.

The scattering front end has no parameters and costs more per image than a
DP-SGD step of the head, and a network fine-tuned from its last block or head
(`models.registry`) has a frozen front that costs far more than the rest, so
training and evaluation run the front once over a dataset and then feed the
trained part. That changes nothing about the model or the privacy
guarantee: ``model(x)`` is ``model.trainable(model.fixed_front(x))`` and DP-SGD
clips and noises the same per-example gradients of the same parameters.

Datasets are treated as immutable (``ManifestDataset`` preloads its images): the
features of a dataset object are kept, weakly, for as long as the object lives,
so a site that keeps its dataset across rounds computes them once per run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import weakref
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

logger = logging.getLogger(__name__)

#: Above this many bytes of features a dataset is not precomputed: the front end then
#: runs per batch inside the model (slower, same result), so memory stays bounded.
MAX_FEATURE_BYTES = 2 * 1024**3
#: Images per front-end call.
BATCH = 64

_cache: weakref.WeakKeyDictionary[Any, dict[tuple, TensorDataset]] = weakref.WeakKeyDictionary()


def split(model: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    """``(fixed front end, trained part)`` of ``model``; ``(None, model)`` for a model without one."""
    front = getattr(model, "fixed_front", None)
    trained = getattr(model, "trainable", None)
    if isinstance(front, nn.Module) and isinstance(trained, nn.Module):
        return front, trained
    return None, model


def _signature(front: nn.Module, device: str) -> tuple:
    """What the features depend on besides the data: the front end's class, settings, weights and the device.

    The weights are hashed: two fronts of one architecture with different initial
    weights must not share features.
    """
    settings = tuple(
        (k, v) for k, v in sorted(vars(front).items()) if k != "training" and isinstance(v, int | float | str | tuple)
    )
    digest = hashlib.sha256()
    for name, tensor in front.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return (type(front).__qualname__, settings, digest.hexdigest(), str(device))


def _feature_bytes(front: nn.Module, dataset: Dataset, device: str) -> int:
    """Bytes the features of ``dataset`` would take (one image through the front end)."""
    x0, _ = dataset[0]
    with torch.no_grad():
        one = front(torch.as_tensor(x0)[None].to(device))
    return int(one.numel() * one.element_size() * len(dataset))  # type: ignore[arg-type]


@torch.no_grad()
def precompute(front: nn.Module, dataset: Dataset, device: str = "cpu") -> TensorDataset | None:
    """The front end's output for every example of ``dataset`` with its label, or None if too large.

    Cached per dataset object, so later rounds and evaluations reuse it. A dataset that augments
    (a new random view of each image every time it is read) is never precomputed: that would freeze
    its first draw.
    """
    if len(dataset) == 0 or getattr(dataset, "augments", False):  # type: ignore[arg-type]
        return None
    key = _signature(front, device)
    try:
        cached = _cache.get(dataset, {}).get(key)
    except TypeError:  # not weak-referenceable: compute, do not cache
        cached = None
    if cached is not None:
        return cached
    size = _feature_bytes(front, dataset, device)
    if size > MAX_FEATURE_BYTES:
        logger.info(
            "features of %d examples would take %.1f GiB (limit %.1f GiB): running the front end per batch",
            len(dataset),  # type: ignore[arg-type]
            size / 1024**3,
            MAX_FEATURE_BYTES / 1024**3,
        )
        return None
    was_training = front.training
    front.eval().to(device)
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    for xb, yb in DataLoader(dataset, batch_size=BATCH, shuffle=False):
        xs.append(front(xb.to(device)))
        ys.append(torch.as_tensor(yb))  # kept as given: 0/1, class indices or 0/1 vectors
    front.train(was_training)
    features = TensorDataset(torch.cat(xs).contiguous(), torch.cat(ys).to(device))
    with contextlib.suppress(TypeError):  # not weak-referenceable: not cached
        _cache.setdefault(dataset, {})[key] = features
    logger.debug("precomputed front-end features of %d examples (%.0f MB)", len(features), size / 1024**2)
    return features


def apply_front(model: nn.Module, dataset: Dataset, device: str = "cpu") -> tuple[nn.Module, Dataset]:
    """The module to run and the dataset to feed it: the trained part on precomputed features when possible."""
    front, trained = split(model)
    if front is None:
        return model, dataset
    features = precompute(front, dataset, device)
    if features is None:
        return model, dataset
    return trained, features
