"""The metrics clinicians ask for, per class and macro-averaged, for binary, multiclass and multilabel studies.

Two routes give the same report. From scores and targets (:func:`compute_metrics`): exact, for a site's own
look or a local baseline. From binned counts (:func:`metrics_from_counts`): what the DP evaluation releases
(site_client.dp_evaluation adds Gaussian noise to the counts) and what the coordinator pools by summing the
sites' counts. Both take probabilities (sigmoid for binary and multilabel, softmax for multiclass).

Binary reports the positive class; multiclass each class one-vs-rest, plus the K x K confusion matrix and the
accuracy read off it (prediction: the arg-max); multilabel each finding at the study's threshold. A figure that
is undefined on the data (a class absent from a split) is NaN with its reason in ``undefined``, never a crash.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_roc_auc

from models.study import Study

#: The per-class figures (the study's ``metrics.names`` less ``confusion``, which is a matrix), in report order.
CLASS_METRICS: tuple[str, ...] = (
    "auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "calibration-error",
)
#: Keys of the binned counts in an evaluation reply (flat lists, class-major): see :func:`counts_to_reply`.
HISTOGRAM_WITH = "histogram-with"
HISTOGRAM_WITHOUT = "histogram-without"
CONFUSION = "confusion"
COUNT_KEYS: tuple[str, ...] = (HISTOGRAM_WITH, HISTOGRAM_WITHOUT, CONFUSION)


# ---- scores, targets and bins -----------------------------------------------------------------------------
def probabilities(logits: np.ndarray | torch.Tensor, task: str) -> np.ndarray:
    """The network's logits as probabilities: sigmoid (binary, multilabel) or softmax (multiclass)."""
    x = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    if task == "binary":
        return torch.sigmoid(x).numpy().reshape(-1)
    x = x if x.ndim == 2 or x.numel() == 0 else x.reshape(x.shape[0], -1)
    if x.numel() == 0:
        return x.numpy()  # no examples: the class count comes from the study (one_vs_rest)
    return (torch.softmax(x, dim=1) if task == "multiclass" else torch.sigmoid(x)).numpy()


def reported_classes(study: Study) -> tuple[str, ...]:
    """The classes a report has a row for: the positive class of a binary study, else every class."""
    return (study.classes[1],) if study.task == "binary" else tuple(study.classes)


def one_vs_rest(probs: np.ndarray, targets: np.ndarray, study: Study) -> tuple[np.ndarray, np.ndarray]:
    """(scores, truth), each (N, C): class c's probability and whether the example has class c.

    ``targets``: 0/1 per example (binary), a class index (multiclass), a 0/1 row per example (multilabel).
    Raises ValueError when shapes or values do not fit the study.
    """
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    k = len(study.classes)
    n = targets.shape[0] if targets.ndim else 0
    if n == 0 and probs.size == 0:  # an empty split: shape it as the study says
        probs = probs.reshape(0, k)
        targets = targets.reshape(0, k) if study.task == "multilabel" else targets.reshape(0)
    if study.task == "binary":
        if probs.reshape(-1).shape[0] != n or targets.reshape(-1).shape[0] != n:
            raise ValueError(f"binary: expected one score and one 0/1 target per example (got {probs.shape}, "
                             f"{targets.shape})")
        return probs.reshape(-1, 1), (targets.reshape(-1, 1).astype(np.float64) >= 0.5)
    if probs.shape != (n, k):
        raise ValueError(f"{study.task}: expected scores of shape ({n}, {k}), got {tuple(probs.shape)}")
    if study.task == "multiclass":
        idx = targets.reshape(-1).astype(np.int64)
        if idx.shape[0] != n or (n and (idx.min() < 0 or idx.max() >= k)):
            raise ValueError(f"multiclass: targets must be class indices 0-{k - 1}, one per example")
        return probs, np.eye(k, dtype=bool)[idx]
    if targets.shape != (n, k):
        raise ValueError(f"multilabel: expected 0/1 targets of shape ({n}, {k}), got {tuple(targets.shape)}")
    return probs, targets.astype(np.float64) >= 0.5


def calibration_edges(study: Study) -> tuple[float, ...]:
    """Interior edges of the calibration bins: ``calibration-bins`` equal widths on [0, 1]."""
    b = study.metrics.calibration_bins
    return tuple(i / b for i in range(1, b))


def release_edges(study: Study) -> tuple[float, ...]:
    """Interior edges of the released score histograms: the calibration bins plus the decision threshold.

    With the threshold an edge, every threshold figure is a sum of whole bins (multiclass decides by the
    arg-max, from the confusion matrix, so it needs no threshold edge).
    """
    edges = set(calibration_edges(study))
    if study.task != "multiclass" and not any(math.isclose(e, study.metrics.threshold) for e in edges):
        edges.add(study.metrics.threshold)
    return tuple(sorted(edges))


def bin_index(probs: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bin of each probability; a score equal to an edge lies above it (p >= threshold is positive)."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(probs, dtype=np.float64), side="right")


def first_positive_bin(edges: Sequence[float], threshold: float) -> int:
    """The first bin at or above the threshold edge."""
    return next(i for i, e in enumerate(edges) if math.isclose(e, threshold)) + 1


def _bin_midpoints(edges: Sequence[float]) -> np.ndarray:
    full = np.concatenate([[0.0], np.asarray(edges, dtype=np.float64), [1.0]])
    return (full[:-1] + full[1:]) / 2.0


# ---- the report ---------------------------------------------------------------------------------------------
@dataclass
class MetricReport:
    """Per-class and macro figures, confusion matrices, and why any figure is undefined (NaN)."""

    task: str
    classes: tuple[str, ...]  # the reported classes (binary: the positive class)
    num_examples: float
    per_class: dict[str, dict[str, float]]
    macro: dict[str, float]
    #: binary: [[TN, FP], [FN, TP]]; multiclass: K x K, rows true class, columns predicted; multilabel: None.
    confusion: list[list[float]] | None
    #: per reported class: [[TN, FP], [FN, TP]] one-vs-rest.
    class_confusion: dict[str, list[list[float]]]
    support: dict[str, float]  # examples with each reported class
    undefined: dict[str, str] = field(default_factory=dict)  # "auc[class]" or "auc[macro]" -> reason
    loss: float | None = None

    def flat(self) -> dict[str, float]:
        """The macro figures and the example count, as the scalar keys of an evaluation reply."""
        return {**{k: float(v) for k, v in self.macro.items()}, "num-examples": float(self.num_examples)}

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (NaN as null), for metrics.json."""
        out: dict[str, Any] = {
            "task": self.task, "classes": list(self.classes), "num-examples": _clean(self.num_examples),
            "macro": {k: _clean(v) for k, v in self.macro.items()},
            "per-class": {c: {k: _clean(v) for k, v in m.items()} for c, m in self.per_class.items()},
            "support": {c: _clean(v) for c, v in self.support.items()},
            "confusion": _clean_nested(self.confusion),
            "class-confusion": {c: _clean_nested(m) for c, m in self.class_confusion.items()},
            "undefined": dict(self.undefined),
        }
        if self.loss is not None:
            out["loss"] = _clean(self.loss)
        return out


def _clean(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def _clean_nested(m: list[list[float]] | None) -> list[list[float | None]] | None:
    return None if m is None else [[_clean(x) for x in row] for row in m]


def _ratio(num: float, den: float) -> float:
    """num/den clipped to [0, 1] (noisy counts can push it out); NaN when the denominator is not positive."""
    return float(min(1.0, max(0.0, num / den))) if den > 0 else float("nan")


def _threshold_figures(tp: float, fp: float, fn: float, tn: float, name: str,
                       undefined: dict[str, str]) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, precision and F1 of one class from its (possibly noisy) counts."""
    figures = {
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }
    why = {
        "accuracy": "no examples",
        "sensitivity": f"no examples with {name}",
        "specificity": f"no examples without {name}",
        "precision": f"no example predicted {name}",
        "f1": f"no example with or predicted {name}",
    }
    for k, v in figures.items():
        if math.isnan(v):
            undefined[f"{k}[{name}]"] = why[k]
    return figures


def _macro(per_class: dict[str, dict[str, float]], undefined: dict[str, str]) -> dict[str, float]:
    """Unweighted mean over the classes where a figure is defined; NaN (with why) where it is nowhere."""
    out: dict[str, float] = {}
    for k in CLASS_METRICS:
        values = [m[k] for m in per_class.values() if not math.isnan(m[k])]
        out[k] = float(np.mean(values)) if values else float("nan")
        if not values:
            undefined[f"{k}[macro]"] = "undefined for every class"
        elif len(values) < len(per_class):
            undefined[f"{k}[macro]"] = f"mean over the {len(values)} of {len(per_class)} classes where it is defined"
    return out


def _assemble(study: Study, n: float, per_class: dict[str, dict[str, float]], class_conf: dict[str, np.ndarray],
              support: dict[str, float], confusion: np.ndarray | None, undefined: dict[str, str]) -> MetricReport:
    macro = _macro(per_class, undefined)
    if study.task == "multiclass" and confusion is not None:
        total = float(confusion.sum())
        macro["accuracy"] = _ratio(float(np.trace(confusion)), total)  # overall accuracy, read off the matrix
        undefined.pop("accuracy[macro]", None)
        if math.isnan(macro["accuracy"]):
            undefined["accuracy[macro]"] = "no examples"
    if study.task == "binary":
        confusion = class_conf[study.classes[1]]
    return MetricReport(
        task=study.task, classes=reported_classes(study), num_examples=float(n), per_class=per_class, macro=macro,
        confusion=None if confusion is None else np.asarray(confusion, dtype=np.float64).tolist(),
        class_confusion={c: np.asarray(m, dtype=np.float64).tolist() for c, m in class_conf.items()},
        support=support, undefined=undefined,
    )


# ---- exact route ---------------------------------------------------------------------------------------------
def _auc(scores: np.ndarray, truth: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(compute_roc_auc(torch.as_tensor(scores), torch.as_tensor(truth.astype(np.float64))))


def _ece(scores: np.ndarray, truth: np.ndarray, edges: Sequence[float]) -> float:
    """Expected calibration error: sum over bins of (share of examples) x |observed frequency - mean score|."""
    if scores.size == 0:
        return float("nan")
    bins = bin_index(scores, edges)
    total = 0.0
    for b in np.unique(bins):
        sel = bins == b
        total += sel.sum() * abs(truth[sel].mean() - scores[sel].mean())
    return float(total / scores.size)


def compute_metrics(probs: np.ndarray, targets: np.ndarray, study: Study) -> MetricReport:
    """Every figure from the probabilities and the targets (exact)."""
    scores, truth = one_vs_rest(probs, targets, study)
    n = truth.shape[0]
    names = reported_classes(study)
    undefined: dict[str, str] = {}
    per_class: dict[str, dict[str, float]] = {}
    class_conf: dict[str, np.ndarray] = {}
    support: dict[str, float] = {}
    confusion: np.ndarray | None = None
    if study.task == "multiclass":
        k = len(names)
        pred = scores.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
        true = truth.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
        confusion = np.bincount(true * k + pred, minlength=k * k).reshape(k, k).astype(np.float64)
        predicted = np.eye(k, dtype=bool)[pred]
    else:
        predicted = scores >= study.metrics.threshold
    edges = calibration_edges(study)
    for c, name in enumerate(names):
        s, t, p = scores[:, c], truth[:, c], predicted[:, c]
        tp, fp = float((p & t).sum()), float((p & ~t).sum())
        fn, tn = float((~p & t).sum()), float((~p & ~t).sum())
        figures = _threshold_figures(tp, fp, fn, tn, name, undefined)
        if t.all() or not t.any():
            auc = float("nan")
            undefined[f"auc[{name}]"] = f"no examples {'without' if t.all() and n else 'with'} {name} in this split"
        else:
            auc = _auc(s, t)
        ece = _ece(s, t.astype(np.float64), edges)
        if math.isnan(ece):
            undefined[f"calibration-error[{name}]"] = "no examples"
        per_class[name] = {"auc": auc, **figures, "calibration-error": ece}
        class_conf[name] = np.array([[tn, fp], [fn, tp]])
        support[name] = float(t.sum())
    return _assemble(study, n, per_class, class_conf, support, confusion, undefined)


def metrics_from_logits(logits: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor,
                        study: Study) -> MetricReport:
    """:func:`compute_metrics` on the network's raw outputs."""
    return compute_metrics(probabilities(logits, study.task), np.asarray(targets), study)


# ---- binned route: what the DP release carries and the coordinator pools ---------------------------------------
@dataclass(frozen=True)
class BinnedCounts:
    """Per reported class c, examples per score bin with and without c; multiclass also the K x K confusion.

    Counts may be noisy (negative, fractional): every figure derived from them is post-processing.
    """

    with_class: np.ndarray  # (C, bins)
    without_class: np.ndarray  # (C, bins)
    confusion: np.ndarray | None = None  # (K, K), multiclass

    def __add__(self, other: BinnedCounts) -> BinnedCounts:
        if self.with_class.shape != other.with_class.shape or (self.confusion is None) != (other.confusion is None):
            raise ValueError("counts of different studies cannot be pooled")
        conf = None if self.confusion is None else self.confusion + other.confusion  # type: ignore[operator]
        return BinnedCounts(self.with_class + other.with_class, self.without_class + other.without_class, conf)


def binned_counts(probs: np.ndarray, targets: np.ndarray, study: Study) -> BinnedCounts:
    """The exact counts of a split (never released as they are)."""
    scores, truth = one_vs_rest(probs, targets, study)
    nbins = len(release_edges(study)) + 1
    bins = bin_index(scores, release_edges(study))
    with_c = np.stack([np.bincount(bins[truth[:, c], c], minlength=nbins) for c in range(scores.shape[1])])
    without = np.stack([np.bincount(bins[~truth[:, c], c], minlength=nbins) for c in range(scores.shape[1])])
    confusion = None
    if study.task == "multiclass":
        k = scores.shape[1]
        pred = scores.argmax(axis=1) if len(scores) else np.zeros(0, dtype=np.int64)
        true = truth.argmax(axis=1) if len(scores) else np.zeros(0, dtype=np.int64)
        confusion = np.bincount(true * k + pred, minlength=k * k).reshape(k, k).astype(np.float64)
    return BinnedCounts(with_c.astype(np.float64), without.astype(np.float64), confusion)


def _binned_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC of binned scores: a positive beats every negative in a lower bin and ties half of its own bin's."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if not (n_pos > 0 and n_neg > 0):
        return float("nan")
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return _ratio(float((pos * (below + 0.5 * neg)).sum()), float(n_pos * n_neg))


def _binned_ece(pos: np.ndarray, neg: np.ndarray, midpoints: np.ndarray) -> float:
    """ECE from the per-bin positive fraction against the bin's midpoint (noisy bins of no mass are skipped)."""
    mass = np.maximum(pos + neg, 0.0)
    if mass.sum() <= 0:
        return float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.clip(np.where(mass > 0, pos / np.where(mass > 0, pos + neg, 1.0), 0.0), 0.0, 1.0)
    return float((mass * np.abs(frac - midpoints)).sum() / mass.sum())


def metrics_from_counts(counts: BinnedCounts, study: Study) -> MetricReport:
    """Every figure from binned (possibly noisy) counts alone.

    Sums are unbiased (counts are not clipped at 0, which would bias small sites towards chance); ratios are
    clipped to [0, 1] and NaN when a noisy denominator is not positive. Calibration uses each bin's midpoint
    as its score, so it differs from the exact ECE by at most half a bin.
    """
    names = reported_classes(study)
    edges = release_edges(study)
    midpoints = _bin_midpoints(edges)
    undefined: dict[str, str] = {}
    per_class: dict[str, dict[str, float]] = {}
    class_conf: dict[str, np.ndarray] = {}
    support: dict[str, float] = {}
    first = None if study.task == "multiclass" else first_positive_bin(edges, study.metrics.threshold)
    conf = counts.confusion
    for c, name in enumerate(names):
        pos, neg = counts.with_class[c], counts.without_class[c]
        if first is not None:
            tp, fn, fp, tn = pos[first:].sum(), pos[:first].sum(), neg[first:].sum(), neg[:first].sum()
        else:
            assert conf is not None
            tp = conf[c, c]
            fn, fp = conf[c, :].sum() - tp, conf[:, c].sum() - tp
            tn = conf.sum() - tp - fn - fp
        figures = _threshold_figures(float(tp), float(fp), float(fn), float(tn), name, undefined)
        auc = _binned_auc(pos, neg)
        if math.isnan(auc):
            undefined[f"auc[{name}]"] = f"no (noisy) count of examples both with and without {name}"
        ece = _binned_ece(pos, neg, midpoints)
        if math.isnan(ece):
            undefined[f"calibration-error[{name}]"] = "no examples"
        per_class[name] = {"auc": auc, **figures, "calibration-error": ece}
        class_conf[name] = np.array([[tn, fp], [fn, tp]], dtype=np.float64)
        support[name] = float(pos.sum())
    totals = counts.with_class.sum(axis=1) + counts.without_class.sum(axis=1)  # C estimates of N: average them
    n = float(max(0.0, totals.mean())) if totals.size else 0.0
    return _assemble(study, n, per_class, class_conf, support, conf, undefined)


def count_lengths(study: Study) -> dict[str, int]:
    """The length of each count list in an evaluation reply for ``study``."""
    c, bins, k = len(reported_classes(study)), len(release_edges(study)) + 1, len(study.classes)
    return {HISTOGRAM_WITH: c * bins, HISTOGRAM_WITHOUT: c * bins,
            CONFUSION: k * k if study.task == "multiclass" else 4 * c}


def counts_to_reply(counts: BinnedCounts, study: Study) -> dict[str, list[float]]:
    """The counts as flat lists: histograms class-major; the confusion row-major.

    Multiclass sends its K x K matrix; binary and multilabel send each class's [[TN, FP], [FN, TP]] read off
    the histograms at the threshold bin (post-processing, so the reader need not know the bins).
    """
    if study.task == "multiclass":
        assert counts.confusion is not None
        conf = counts.confusion.reshape(-1)
    else:
        first = first_positive_bin(release_edges(study), study.metrics.threshold)
        conf = np.concatenate([[n[:first].sum(), n[first:].sum(), p[:first].sum(), p[first:].sum()]
                               for p, n in zip(counts.with_class, counts.without_class, strict=True)])
    return {HISTOGRAM_WITH: [float(x) for x in counts.with_class.reshape(-1)],
            HISTOGRAM_WITHOUT: [float(x) for x in counts.without_class.reshape(-1)],
            CONFUSION: [float(x) for x in conf]}


def counts_from_reply(metrics: Mapping[str, Any], study: Study) -> BinnedCounts:
    """The counts a site's evaluation reply carries, checked against the study; ValueError says what is wrong."""
    want = count_lengths(study)
    got: dict[str, np.ndarray] = {}
    for key, length in want.items():
        value = metrics.get(key)
        if not isinstance(value, (list, tuple)) or len(value) != length:
            size = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
            raise ValueError(f"'{key}' must be a list of {length} counts for this {study.task} study of "
                             f"{len(study.classes)} classes (got {size})")
        arr = np.asarray(value, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ValueError(f"'{key}' holds a non-finite count")
        got[key] = arr
    c = len(reported_classes(study))
    k = len(study.classes)
    return BinnedCounts(got[HISTOGRAM_WITH].reshape(c, -1), got[HISTOGRAM_WITHOUT].reshape(c, -1),
                        got[CONFUSION].reshape(k, k) if study.task == "multiclass" else None)
