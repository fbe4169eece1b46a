"""Evaluation of the binary classifier on a local dataset.

Returns only scalar aggregates (no per-patient values), so the result may
leave the site under the metric allow-list (docs/design.md invariant 1).
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
from monai.metrics import compute_roc_auc
from torch import nn
from torch.utils.data import DataLoader, Dataset

from models import features

logger = logging.getLogger(__name__)

#: The exact keys :func:`evaluate` returns.
METRIC_KEYS: tuple[str, ...] = ("auc", "accuracy", "sensitivity", "specificity", "f1", "loss", "num_examples")
#: Probability above which an image is called positive.
THRESHOLD = 0.5


def _ratio(num: float, den: float) -> float:
    """num/den, or NaN when the quantity is undefined (den == 0)."""
    return num / den if den else float("nan")


@torch.no_grad()
def predict(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 64, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logit and the label of every example, in dataset order (1-D float tensors on the CPU).

    A fixed front end runs once per dataset (`models.features`), so a site that
    evaluates the same split every round computes it once.
    """
    was_training = model.training
    model.to(device)
    model.eval()
    module, data = features.apply_front(model, dataset, device)
    logits_parts: list[torch.Tensor] = [torch.zeros(0)]
    label_parts: list[torch.Tensor] = [torch.zeros(0)]
    try:
        for xb, yb in DataLoader(data, batch_size=batch_size, shuffle=False):
            logits_parts.append(module(xb.to(device)).reshape(-1).float().cpu())
            label_parts.append(torch.as_tensor(yb).reshape(-1).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits_parts), torch.cat(label_parts)


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, float]:
    """Score ``model`` on ``dataset``: AUC, accuracy, sensitivity, specificity, F1, BCE loss, count.

    A metric that is undefined on this data is NaN, not an exception, so one
    small site cannot crash a round: ``auc`` when only one class is present,
    ``sensitivity`` without positives, ``specificity`` without negatives,
    ``f1`` when there are neither true nor predicted positives, and all but
    ``num_examples`` on an empty dataset. Callers must treat NaN as "not available".
    """
    logits, labels = predict(model, dataset, batch_size=batch_size, device=device)
    n = len(labels)
    nan = float("nan")
    if n == 0:
        return {k: (0.0 if k == "num_examples" else nan) for k in METRIC_KEYS}

    loss = float(nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="mean"))
    probs = torch.sigmoid(logits)

    if torch.unique(labels).numel() < 2:
        auc = nan  # AUC is undefined with one class; MONAI would warn and return NaN too
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auc = float(compute_roc_auc(probs, labels))

    pred = probs >= THRESHOLD
    pos = labels >= 0.5
    tp = float((pred & pos).sum())
    tn = float((~pred & ~pos).sum())
    fp = float((pred & ~pos).sum())
    fn = float((~pred & pos).sum())
    metrics = {
        "auc": auc,
        "accuracy": (tp + tn) / n,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "loss": loss,
        "num_examples": float(n),
    }
    logger.debug(
        "evaluated %d example(s): auc=%s accuracy=%.3f loss=%.4f",
        n,
        "nan" if math.isnan(auc) else f"{auc:.3f}",
        metrics["accuracy"],
        loss,
    )
    return metrics
