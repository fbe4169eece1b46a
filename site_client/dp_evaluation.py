"""Differentially private evaluation: noisy score histograms, and every released metric derived from them.

The site scores the global model on its test split and counts, per class, how
many examples fall in each of :data:`NUM_BINS` logit bins. One example lies in
exactly one bin of one class, so adding or removing it changes the count vector
by 1 in L2 (the add/remove relation Opacus' accounting uses): Gaussian noise
N(0, σ²) on every bin is the Gaussian mechanism with sensitivity 1, accounted as
the segment ``(σ, 1.0, 1)``. AUC, accuracy, sensitivity, specificity, F1 and the
example count are computed from the noisy counts only (post-processing), so
nothing else about the test split leaves. The noisy histograms are kept per
global-model digest: asking again for the same model re-releases them and
costs nothing more.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.evaluation import THRESHOLD

#: Bin edges on the model's logit. Finer around 0, where a trained model's scores crowd; 0 is the decision
#: threshold (probability THRESHOLD = 0.5), so the threshold metrics are sums of whole bins.
LOGIT_EDGES: tuple[float, ...] = (-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0)
NUM_BINS = len(LOGIT_EDGES) + 1
_THRESHOLD_LOGIT = math.log(THRESHOLD / (1.0 - THRESHOLD))
#: Bins at or above the threshold: an example there is predicted positive.
FIRST_POSITIVE_BIN = LOGIT_EDGES.index(_THRESHOLD_LOGIT) + 1
#: What an evaluation releases (the egress allow-list adds the privacy figures to these).
RELEASED_METRICS: tuple[str, ...] = ("auc", "accuracy", "sensitivity", "specificity", "f1", "num-examples")
STORE_DIR = "released-evaluations"


@dataclass(frozen=True)
class NoisyHistograms:
    """Per-class counts of examples per logit bin, each plus N(0, σ²): all that an evaluation releases."""

    positives: tuple[float, ...]
    negatives: tuple[float, ...]
    noise: float


def histograms(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-class counts per bin (never released as they are)."""
    bins = np.searchsorted(np.asarray(LOGIT_EDGES), np.asarray(logits, dtype=np.float64), side="right")
    pos = np.asarray(labels) >= 0.5
    return (np.bincount(bins[pos], minlength=NUM_BINS).astype(np.float64),
            np.bincount(bins[~pos], minlength=NUM_BINS).astype(np.float64))


def noisy_histograms(logits: np.ndarray, labels: np.ndarray, noise: float,
                     rng: np.random.Generator | None = None) -> NoisyHistograms:
    """The Gaussian mechanism on the count vector: σ = ``noise`` on each bin, fresh OS entropy by default."""
    if not noise > 0:
        raise ValueError(f"evaluation noise must be > 0 (got {noise})")
    rng = rng if rng is not None else np.random.default_rng()  # seeded from the OS: never reproducible
    pos, neg = histograms(logits, labels)
    return NoisyHistograms(positives=tuple(float(x) for x in pos + rng.normal(0.0, noise, NUM_BINS)),
                           negatives=tuple(float(x) for x in neg + rng.normal(0.0, noise, NUM_BINS)),
                           noise=float(noise))


def _ratio(num: float, den: float) -> float:
    """num/den clipped to [0, 1] (noise can push it out), NaN when the noisy denominator is not positive."""
    return float(min(1.0, max(0.0, num / den))) if den > 0 else float("nan")


def metrics_from_histograms(h: NoisyHistograms) -> dict[str, float]:
    """Every released metric, from the noisy counts alone (unbiased sums; ratios clipped to [0, 1]).

    The counts are not clipped at 0 first: that would bias every small site's metrics
    towards chance, and the consortium's average of unbiased figures is what it needs.
    """
    p, n = np.asarray(h.positives), np.asarray(h.negatives)
    k = FIRST_POSITIVE_BIN
    tp, fn, fp, tn = p[k:].sum(), p[:k].sum(), n[k:].sum(), n[:k].sum()
    n_pos, n_neg = p.sum(), n.sum()
    # AUC from binned scores: a positive beats every negative in a lower bin and ties half of its own bin's.
    below = np.concatenate([[0.0], np.cumsum(n)[:-1]])
    wins = float((p * (below + 0.5 * n)).sum())
    return {
        "auc": _ratio(wins, n_pos * n_neg) if n_pos > 0 and n_neg > 0 else float("nan"),
        "accuracy": _ratio(tp + tn, n_pos + n_neg),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "num-examples": float(max(0.0, n_pos + n_neg)),
    }


class EvaluationStore:
    """The noisy histograms released for each global model (by digest), in the site's state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / STORE_DIR

    def _path(self, digest: str) -> Path:
        if not digest or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
        return self.root / f"{digest}.json"

    def lookup(self, digest: str) -> tuple[NoisyHistograms, dict[str, Any]] | None:
        """The histograms already released for this model, and the record saved with them; None if none."""
        path = self._path(digest)
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        h = NoisyHistograms(tuple(data["positives"]), tuple(data["negatives"]), float(data["noise"]))
        return h, data

    def save(self, digest: str, h: NoisyHistograms, **record: Any) -> None:
        """Keep ``h`` (atomically, fsynced) once its spend is committed."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(digest)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as fh:
            json.dump({"positives": list(h.positives), "negatives": list(h.negatives), "noise": h.noise,
                       "edges": list(LOGIT_EDGES), **record}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
