"""How noisy a site's released evaluation is, per study shape, test-split size and ``evaluation-noise``.

A site releases its evaluation only as Gaussian-noised counts (site_client/dp_evaluation.py). Whether the
figures are worth their ε depends on the study: K classes put more noise into every macro figure (each
class's histogram carries its own noise) and cost √K or √(K+1) times as much at the same σ. This scores
simulated logits of a fixed quality (per-class AUC about 0.85) through the same release path a site uses
(``noisy_histograms`` then ``metrics_from_histograms``) many times, and prints the standard deviation of the
released macro AUC and macro sensitivity against the exact figures, with the ε of one evaluation alone.

    python bench/evaluation_noise.py [--draws 300] [--sizes 100,300,1000,3000] [--noise 5,10,20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from models.accounting import epsilon_of_history  # noqa: E402
from models.metrics import metrics_from_logits  # noqa: E402
from models.study import Study  # noqa: E402
from site_client.dp_evaluation import (  # noqa: E402
    metrics_from_histograms,
    noise_multiplier,
    noisy_histograms,
)

DELTA = 1e-5
#: Logit shift of a positive: N(SHIFT, 1) against N(0, 1) gives AUC Φ(SHIFT / √2) ≈ 0.85.
SHIFT = 1.47
PREVALENCE = 0.3
STUDIES: dict[str, Study] = {
    "binary": Study(),
    "multiclass K=3": Study(task="multiclass", classes=("normal", "benign", "malignant")),
    "multiclass K=5": Study(task="multiclass", classes=("a", "b", "c", "d", "e")),
    "multilabel K=2": Study(task="multilabel", classes=("effusion", "nodule")),
    "multilabel K=5": Study(task="multilabel", classes=("a", "b", "c", "d", "e")),
}


def simulated_split(study: Study, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of a model of fixed quality on a test split of ``n`` examples."""
    k = len(study.classes)
    if study.task == "binary":
        y = (rng.random(n) < PREVALENCE).astype(np.int64)
        return rng.normal(0.0, 1.0, n) + SHIFT * y - 1.0, y
    if study.task == "multiclass":
        y = rng.integers(0, k, n)
        logits = rng.normal(0.0, 1.0, (n, k))
        logits[np.arange(n), y] += SHIFT
        return logits, y
    y = (rng.random((n, k)) < PREVALENCE).astype(np.int64)
    return rng.normal(0.0, 1.0, (n, k)) + SHIFT * y - 1.0, y


def spread(study: Study, n: int, noise: float, draws: int, seed: int) -> tuple[float, float, float, float]:
    """(exact macro AUC, sd of released macro AUC, its mean bias, sd of released macro sensitivity)."""
    rng = np.random.default_rng(seed)
    logits, labels = simulated_split(study, n, rng)
    exact = metrics_from_logits(logits, labels, study).macro
    auc, sens = [], []
    for _ in range(draws):
        released = metrics_from_histograms(noisy_histograms(logits, labels, noise, rng, study=study), study)
        auc.append(released["auc"])
        sens.append(released["sensitivity"])
    auc_a, sens_a = np.asarray(auc, dtype=float), np.asarray(sens, dtype=float)
    return (exact["auc"], float(np.nanstd(auc_a)), float(np.nanmean(auc_a) - exact["auc"]),
            float(np.nanstd(sens_a)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=300, help="noisy releases per cell")
    parser.add_argument("--sizes", default="100,300,1000,3000", help="test-split sizes")
    parser.add_argument("--noise", default="5,10,20", help="evaluation-noise values (σ on every count)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    noises = [float(s) for s in args.noise.split(",")]
    print(f"simulated per-class AUC ~0.85, prevalence {PREVALENCE:g} (binary, multilabel); {args.draws} releases "
          f"per cell; ε of one evaluation alone at δ = {DELTA:g}\n")
    print("| study | evaluation-noise | ε one evaluation | test split | exact macro AUC | sd released AUC "
          "| bias | sd released sensitivity |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, study in STUDIES.items():
        for noise in noises:
            eps = epsilon_of_history([(noise_multiplier(noise, study), 1.0, 1)], DELTA, "prv")
            for n in sizes:
                exact, sd, bias, sd_sens = spread(study, n, noise, args.draws, args.seed)
                print(f"| {name} | {noise:g} | {eps:.2f} | {n} | {exact:.3f} | {sd:.3f} | {bias:+.3f} "
                      f"| {sd_sens:.3f} |", flush=True)


if __name__ == "__main__":
    main()
