"""Membership-inference attacks: an empirical check of what a trained model leaks.

Two attacks on a binary classifier, given examples known to be in its training
set (members) and examples known not to be (non-members):

* loss threshold (Yeom et al. 2018): a member tends to have a lower loss; the
  score is the negative per-example loss.
* LiRA, online variant with a global variance (Carlini et al. 2022): shadow
  models are trained on random halves of members ∪ non-members with the
  target's recipe; for each example the logit-scaled confidence of its label is
  compared with the Gaussian fitted to shadows that did ("in") and did not
  ("out") train on it. With few shadows the per-example variances are noisy, so
  one pooled variance per side is used, as the paper advises.

Both report the attack's ROC AUC and its TPR at 1% FPR. DP-SGD at ε bounds the
TPR at any FPR α by e^ε·α + δ, so a DP model should sit near AUC 0.5.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from models.evaluation import predict

log = logging.getLogger(__name__)

#: The FPR at which the TPR is reported (low-FPR performance is what matters for privacy).
LOW_FPR = 0.01


@dataclass(frozen=True)
class AttackResult:
    """One attack's success: AUC over members vs non-members, TPR at :data:`LOW_FPR`."""

    attack: str
    auc: float
    tpr_at_low_fpr: float
    members: int
    non_members: int


def attack_metrics(attack: str, member_scores: np.ndarray, non_member_scores: np.ndarray) -> AttackResult:
    """AUC and TPR at 1% FPR of ``scores`` (higher = more likely a member)."""
    scores = np.concatenate([member_scores, non_member_scores])
    truth = np.concatenate([np.ones(len(member_scores)), np.zeros(len(non_member_scores))])
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{attack}: non-finite attack scores")
    fpr, tpr, _ = roc_curve(truth, scores)
    # Largest TPR whose FPR does not exceed 1% (the ROC curve is a step function).
    tpr_low = float(np.max(tpr[fpr <= LOW_FPR])) if np.any(fpr <= LOW_FPR) else 0.0
    return AttackResult(attack=attack, auc=float(roc_auc_score(truth, scores)), tpr_at_low_fpr=tpr_low,
                        members=len(member_scores), non_members=len(non_member_scores))


def logits_and_labels(model: nn.Module, dataset: Dataset, device: str = "cpu",
                      batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The model's logit and the label of every example, in dataset order."""
    logits, labels = predict(model, dataset, batch_size=batch_size, device=device)
    return logits.numpy().astype(np.float64), labels.numpy().astype(np.float64)


def per_example_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Binary cross-entropy of each example (numerically stable)."""
    return np.logaddexp(0.0, logits) - labels * logits


def label_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's logit-scaled confidence log(p / (1 - p)) of the true label: ±logit for a binary model."""
    return np.where(labels > 0.5, logits, -logits)


def loss_threshold_attack(model: nn.Module, members: Dataset, non_members: Dataset,
                          device: str = "cpu") -> AttackResult:
    """Yeom et al.'s attack: members have lower loss; the score is -loss."""
    zm, ym = logits_and_labels(model, members, device)
    zn, yn = logits_and_labels(model, non_members, device)
    return attack_metrics("loss-threshold", -per_example_loss(zm, ym), -per_example_loss(zn, yn))


#: Trains a fresh shadow model on a dataset and returns it (the target's recipe).
ShadowTrainer = Callable[[Dataset, int], nn.Module]


def lira_attack(
    model: nn.Module,
    members: Dataset,
    non_members: Dataset,
    train_shadow: ShadowTrainer,
    num_shadows: int = 8,
    seed: int = 0,
    device: str = "cpu",
) -> AttackResult:
    """Online LiRA with a global variance; ``train_shadow(dataset, seed)`` trains one shadow model."""
    if num_shadows < 2:
        raise ValueError(f"LiRA needs at least 2 shadow models (got {num_shadows})")
    pool: Dataset = ConcatDataset([members, non_members])
    n = len(pool)  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    # Each example is in exactly half of the shadows' training sets (balanced, as in the paper).
    inclusion = np.zeros((num_shadows, n), dtype=bool)
    for j in range(n):
        inclusion[rng.permutation(num_shadows)[: num_shadows // 2], j] = True
    conf = np.zeros((num_shadows, n))
    for k in range(num_shadows):
        subset = Subset(pool, np.flatnonzero(inclusion[k]).tolist())
        shadow = train_shadow(subset, seed * 1000 + k)
        z, y = logits_and_labels(shadow, pool, device)
        conf[k] = label_confidence(z, y)
        log.info("LiRA shadow %d/%d trained on %d examples", k + 1, num_shadows, len(subset))
    mu_in = np.array([conf[inclusion[:, j], j].mean() for j in range(n)])
    mu_out = np.array([conf[~inclusion[:, j], j].mean() for j in range(n)])
    sd_in = max(float(np.std(conf[inclusion] - mu_in[np.nonzero(inclusion)[1]])), 1e-6)
    sd_out = max(float(np.std(conf[~inclusion] - mu_out[np.nonzero(~inclusion)[1]])), 1e-6)
    z, y = logits_and_labels(model, pool, device)
    target = label_confidence(z, y)
    # Log-likelihood ratio of "in" over "out" (Gaussian densities, constants cancel but the sd terms).
    score = (-0.5 * ((target - mu_in) / sd_in) ** 2 - np.log(sd_in)) - (
        -0.5 * ((target - mu_out) / sd_out) ** 2 - np.log(sd_out)
    )
    m = len(members)  # type: ignore[arg-type]
    return attack_metrics("lira", score[:m], score[m:])
