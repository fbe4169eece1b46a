"""Differentially private evaluation: noisy score histograms, and every released figure derived from them.

The site scores the global model on its test split and, for each reported class c (binary: the positive
class; multiclass and multilabel: every class), counts the examples with c and the examples without c per
bin of class c's probability (the study's calibration bins plus its decision threshold as an edge:
models.metrics.release_edges). Multiclass also counts the K x K confusion matrix of the arg-max. Gaussian
noise N(0, σ²), σ = the site's ``evaluation-noise``, goes on every count.

Adding or removing one example changes one bin of one histogram per reported class, and for multiclass one
confusion cell, each by 1: the L2 sensitivity is 1 (binary), √K (multilabel) or √(K+1) (multiclass)
(:func:`sensitivity`). The release is then the Gaussian mechanism with noise multiplier σ / sensitivity,
accounted as the segment ``(σ / sensitivity, 1.0, 1)`` (:func:`evaluation_segment`). Every released figure is
computed from the noisy counts only (post-processing), so nothing else about the test split leaves. The
noisy counts are kept per (global model, study): asking again re-releases them and costs nothing more.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.accounting import Segment
from models.metrics import (
    COUNT_KEYS,
    BinnedCounts,
    binned_counts,
    counts_to_reply,
    first_positive_bin,
    metrics_from_counts,
    probabilities,
    release_edges,
    reported_classes,
)
from models.study import DEFAULT_STUDY, Study
from site_client.ledger import EVALUATION_SAMPLE_RATE

#: The default study's histogram: 10 equal bins of the positive class's probability, the threshold 0.5 an edge.
EDGES: tuple[float, ...] = release_edges(DEFAULT_STUDY)
NUM_BINS = len(EDGES) + 1
#: Bins at or above the default threshold: an example there is predicted positive.
FIRST_POSITIVE_BIN = first_positive_bin(EDGES, DEFAULT_STUDY.metrics.threshold)
#: The scalar figures an evaluation releases (macro-averaged; binary: the positive class) and the noisy counts
#: they come from (models.metrics.COUNT_KEYS); the egress allow-list adds the privacy figures to these.
RELEASED_SCALARS: tuple[str, ...] = (
    "auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "calibration-error", "num-examples",
)
RELEASED_METRICS: tuple[str, ...] = RELEASED_SCALARS + COUNT_KEYS
STORE_DIR = "released-evaluations"


def sensitivity(study: Study) -> float:
    """L2 sensitivity of the released count vector under adding or removing one example.

    One example is one count in one bin of the with- or the without-histogram of each reported class, and
    (multiclass) one count in one confusion cell: √(classes reported (+1)).
    """
    cells = len(reported_classes(study)) + (1 if study.task == "multiclass" else 0)
    return math.sqrt(cells)


def noise_multiplier(noise: float, study: Study) -> float:
    """The release's noise multiplier (σ over the sensitivity): what the accountant prices."""
    return float(noise) / sensitivity(study)


def evaluation_segment(noise: float, study: Study) -> Segment:
    """One evaluation of ``study`` at ``evaluation-noise`` = ``noise``, as a segment of the run's history."""
    return (noise_multiplier(noise, study), EVALUATION_SAMPLE_RATE, 1)


@dataclass(frozen=True)
class NoisyHistograms:
    """The noisy counts an evaluation releases: all that its figures are computed from.

    ``positives``/``negatives``: per reported class (class-major), examples with / without the class per bin.
    ``confusion``: the K x K confusion matrix, row-major (multiclass only).
    """

    positives: tuple[float, ...]
    negatives: tuple[float, ...]
    noise: float
    confusion: tuple[float, ...] | None = None

    def counts(self, study: Study = DEFAULT_STUDY) -> BinnedCounts:
        c = len(reported_classes(study))
        k = len(study.classes)
        pos, neg = np.asarray(self.positives, dtype=np.float64), np.asarray(self.negatives, dtype=np.float64)
        if pos.size != c * (len(release_edges(study)) + 1) or neg.size != pos.size:
            raise ValueError(f"these histograms do not fit the {study.task} study {study.name!r}")
        conf = None
        if study.task == "multiclass":
            if self.confusion is None or len(self.confusion) != k * k:
                raise ValueError(f"a {study.task} release needs a {k} x {k} confusion matrix")
            conf = np.asarray(self.confusion, dtype=np.float64).reshape(k, k)
        return BinnedCounts(pos.reshape(c, -1), neg.reshape(c, -1), conf)


def release_counts(logits: np.ndarray, labels: np.ndarray, study: Study = DEFAULT_STUDY) -> BinnedCounts:
    """The exact counts of the split (never released as they are)."""
    return binned_counts(probabilities(logits, study.task), np.asarray(labels), study)


def histograms(logits: np.ndarray, labels: np.ndarray, study: Study = DEFAULT_STUDY) -> tuple[np.ndarray, np.ndarray]:
    """Exact with- and without-class counts per bin, flat and class-major (never released as they are)."""
    counts = release_counts(logits, labels, study)
    return counts.with_class.reshape(-1), counts.without_class.reshape(-1)


def noisy_histograms(logits: np.ndarray, labels: np.ndarray, noise: float, rng: np.random.Generator | None = None,
                     *, study: Study = DEFAULT_STUDY) -> NoisyHistograms:
    """The Gaussian mechanism on every count: σ = ``noise``, fresh OS entropy by default."""
    if not noise > 0:
        raise ValueError(f"evaluation noise must be > 0 (got {noise})")
    rng = rng if rng is not None else np.random.default_rng()  # seeded from the OS: never reproducible
    exact = release_counts(logits, labels, study)

    def noisy(a: np.ndarray) -> tuple[float, ...]:
        flat = a.reshape(-1)
        return tuple(float(x) for x in flat + rng.normal(0.0, noise, flat.size))

    return NoisyHistograms(positives=noisy(exact.with_class), negatives=noisy(exact.without_class),
                           noise=float(noise), confusion=None if exact.confusion is None else noisy(exact.confusion))


def metrics_from_histograms(h: NoisyHistograms, study: Study = DEFAULT_STUDY) -> dict[str, float | list[float]]:
    """What an evaluation releases: the macro figures and the example count, and the noisy counts themselves.

    All of it from the noisy counts alone (models.metrics.metrics_from_counts: unbiased sums, ratios clipped
    to [0, 1], NaN where a noisy denominator is not positive). The counts go out so the coordinator can show
    per-class figures and pool the consortium's counts; they are what was noised, so this costs nothing more.
    """
    counts = h.counts(study)
    return {**metrics_from_counts(counts, study).flat(), **counts_to_reply(counts, study)}


def store_key(model_digest: str, study: Study) -> str:
    """What a release is kept under: the model's digest (the default study) or a hash of model and study."""
    if study == DEFAULT_STUDY:
        return model_digest
    return hashlib.sha256(f"{model_digest}:{study.digest()}".encode()).hexdigest()


class EvaluationStore:
    """The noisy histograms released for each global model and study, in the site's state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / STORE_DIR

    def _path(self, digest: str) -> Path:
        if not digest or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
        return self.root / f"{digest}.json"

    def lookup(self, digest: str, study: Study = DEFAULT_STUDY) -> tuple[NoisyHistograms, dict[str, Any]] | None:
        """The histograms already released under ``digest`` (:func:`store_key`) and their record; None if none.

        A release binned otherwise (an older layout) is not re-used: the site pays for a new one rather
        than compute figures from bins it cannot read.
        """
        path = self._path(digest)
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if [float(e) for e in data.get("edges", [])] != list(release_edges(study)):
            return None
        conf = data.get("confusion")
        h = NoisyHistograms(tuple(data["positives"]), tuple(data["negatives"]), float(data["noise"]),
                            None if conf is None else tuple(conf))
        return h, data

    def save(self, digest: str, h: NoisyHistograms, study: Study = DEFAULT_STUDY, **record: Any) -> None:
        """Keep ``h`` (atomically, fsynced) once its spend is committed."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(digest)
        tmp = path.with_name(f".{path.name}.tmp")
        doc: dict[str, Any] = {"positives": list(h.positives), "negatives": list(h.negatives), "noise": h.noise,
                               "edges": list(release_edges(study)), "task": study.task, **record}
        if h.confusion is not None:
            doc["confusion"] = list(h.confusion)
        with open(tmp, "w") as fh:
            json.dump(doc, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
