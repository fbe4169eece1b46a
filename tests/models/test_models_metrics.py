"""models.metrics: per-class and macro figures for every task, checked against scikit-learn and MONAI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    confusion_matrix,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)
from torch import nn
from torch.utils.data import TensorDataset

from models.evaluation import evaluate_study, predict
from models.metrics import (
    CLASS_METRICS,
    binned_counts,
    calibration_edges,
    compute_metrics,
    counts_from_reply,
    counts_to_reply,
    metrics_from_counts,
    metrics_from_logits,
    probabilities,
    release_edges,
)
from models.study import Study
from tests.models_factory import signal_logits

BINARY = Study()
MULTICLASS = Study(task="multiclass", classes=("normal", "benign", "malignant"))
MULTILABEL = Study(task="multilabel", classes=("effusion", "nodule", "edema"))


def _data(study: Study, n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits that carry some signal about random targets of ``study``'s task."""
    return signal_logits(study, n, seed)


def _ece(p: np.ndarray, y: np.ndarray, bins: int) -> float:
    """Textbook ECE with equal-width bins (the last closed), written independently of models.metrics."""
    idx = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum((idx == b).sum() / len(p) * abs(y[idx == b].mean() - p[idx == b].mean())
                     for b in range(bins) if (idx == b).any()))


@pytest.mark.parametrize("study", [BINARY, MULTICLASS, MULTILABEL], ids=lambda s: s.task)
def test_every_figure_matches_scikit_learn(study: Study) -> None:
    logits, y = _data(study)
    report = metrics_from_logits(logits, y, study)
    p = probabilities(logits, study.task)
    if study.task == "binary":
        truth, scores, pred = y[:, None], p[:, None], (p >= 0.5)[:, None].astype(int)
        assert report.classes == ("present",)  # binary reports its positive class
        tn, fp, fn, tp = confusion_matrix(y, pred[:, 0]).ravel()
        assert report.confusion == [[tn, fp], [fn, tp]]
    elif study.task == "multiclass":
        truth, scores = np.eye(3)[y], p
        pred = np.eye(3)[p.argmax(axis=1)].astype(int)
        assert report.confusion == confusion_matrix(y, p.argmax(axis=1)).tolist()
        assert report.macro["accuracy"] == pytest.approx((p.argmax(axis=1) == y).mean())  # from the K x K matrix
    else:
        truth, scores, pred = y, p, (p >= 0.5).astype(int)
        assert report.confusion is None
    if study.task == "binary":  # scikit-learn reads one 0/1 column as two classes: ask for the positive one
        mcm = multilabel_confusion_matrix(y, pred[:, 0], labels=[1])
        precision, recall, f1, _ = precision_recall_fscore_support(y, pred[:, 0], labels=[1], average=None)
    else:
        mcm = multilabel_confusion_matrix(truth, pred)
        precision, recall, f1, _ = precision_recall_fscore_support(truth, pred, average=None, zero_division=np.nan)
    for c, name in enumerate(report.classes):
        m = report.per_class[name]
        tn, fp, fn, tp = mcm[c].ravel()
        assert report.class_confusion[name] == [[tn, fp], [fn, tp]]
        assert m["auc"] == pytest.approx(roc_auc_score(truth[:, c], scores[:, c]))
        assert m["sensitivity"] == pytest.approx(recall[c]) and m["precision"] == pytest.approx(precision[c])
        assert m["f1"] == pytest.approx(f1[c]) and m["specificity"] == pytest.approx(tn / (tn + fp))
        assert m["accuracy"] == pytest.approx((tp + tn) / len(truth))
        assert m["calibration-error"] == pytest.approx(_ece(scores[:, c], truth[:, c], 10))
        assert report.support[name] == truth[:, c].sum()
    if study.task != "binary":
        assert report.macro["auc"] == pytest.approx(roc_auc_score(truth, scores, average="macro"))
        assert report.macro["f1"] == pytest.approx(f1.mean())
        assert report.macro["sensitivity"] == pytest.approx(recall.mean())
    assert report.num_examples == len(y) and not report.undefined


def test_monai_and_scikit_learn_agree() -> None:
    """The AUC (MONAI's compute_roc_auc) and the confusion counts, cross-checked between the two libraries."""
    from monai.metrics import compute_roc_auc, get_confusion_matrix

    logits, y = _data(MULTILABEL, seed=3)
    p = probabilities(logits, "multilabel")
    monai_auc = compute_roc_auc(torch.as_tensor(p), torch.as_tensor(y), average="none")
    assert np.allclose(monai_auc, roc_auc_score(y, p, average=None))
    # MONAI's per-class [TP, FP, TN, FN] against scikit-learn's per-class [[TN, FP], [FN, TP]]
    monai_cm = get_confusion_matrix(torch.as_tensor((p >= 0.5).astype(np.float32)),
                                    torch.as_tensor(y, dtype=torch.float32))
    tp, fp, tn, fn = monai_cm.sum(dim=0).unbind(-1)
    sk = multilabel_confusion_matrix(y, (p >= 0.5).astype(int))
    assert (tp.numpy() == sk[:, 1, 1]).all() and (fp.numpy() == sk[:, 0, 1]).all()
    assert (tn.numpy() == sk[:, 0, 0]).all() and (fn.numpy() == sk[:, 1, 0]).all()
    report = compute_metrics(p, y, MULTILABEL)
    assert [report.class_confusion[c][1][1] for c in MULTILABEL.classes] == tp.tolist()


def test_a_class_absent_from_the_split_is_nan_with_a_reason() -> None:
    logits, y = _data(MULTICLASS, n=60)
    y = np.where(y == 2, 0, y)  # no "malignant" example at all
    report = metrics_from_logits(logits, y, MULTICLASS)
    m = report.per_class["malignant"]
    assert math.isnan(m["auc"]) and math.isnan(m["sensitivity"])
    assert "no examples with malignant" in report.undefined["auc[malignant]"]
    assert report.undefined["sensitivity[malignant]"] == "no examples with malignant"
    assert not math.isnan(m["specificity"])
    assert report.macro["auc"] == pytest.approx(np.mean([report.per_class[c]["auc"] for c in ("normal", "benign")]))
    assert "2 of 3 classes" in report.undefined["auc[macro]"]
    json = report.to_json()
    assert json["per-class"]["malignant"]["auc"] is None  # NaN is null in metrics.json


def test_an_empty_split_and_one_class_give_nan_not_a_crash() -> None:
    for study in (BINARY, MULTICLASS, MULTILABEL):
        k = len(study.classes)
        shape = (0,) if study.task == "binary" else (0, k)
        targets = np.zeros((0, k)) if study.task == "multilabel" else np.zeros(0)
        report = metrics_from_logits(np.zeros(shape), targets, study)
        assert report.num_examples == 0
        assert all(math.isnan(v) for v in report.macro.values())
        assert all(math.isnan(report.macro[k]) for k in CLASS_METRICS)
    one = metrics_from_logits(np.array([2.0, 3.0]), np.array([1, 1]), BINARY)
    assert math.isnan(one.macro["auc"]) and "no examples without present" in one.undefined["auc[present]"]
    assert one.macro["sensitivity"] == 1.0


def test_shapes_that_do_not_fit_the_study_are_refused_with_a_message() -> None:
    with pytest.raises(ValueError, match=r"scores of shape \(4, 3\)"):
        compute_metrics(np.full((4, 2), 0.5), np.zeros(4), MULTICLASS)
    with pytest.raises(ValueError, match="class indices 0-2"):
        compute_metrics(np.full((2, 3), 1 / 3), np.array([0, 5]), MULTICLASS)


@pytest.mark.parametrize("study", [BINARY, MULTICLASS, MULTILABEL], ids=lambda s: s.task)
def test_binned_figures_match_the_exact_ones_up_to_binning(study: Study) -> None:
    """From exact counts, the threshold figures are exact and AUC/ECE are within the bins' resolution."""
    logits, y = _data(study, n=2000, seed=1)
    p = probabilities(logits, study.task)
    exact, binned = compute_metrics(p, y, study), metrics_from_counts(binned_counts(p, y, study), study)
    for name in exact.classes:
        for k in ("accuracy", "sensitivity", "specificity", "precision", "f1"):
            assert binned.per_class[name][k] == pytest.approx(exact.per_class[name][k])
        assert binned.per_class[name]["auc"] == pytest.approx(exact.per_class[name]["auc"], abs=0.02)
        assert binned.per_class[name]["calibration-error"] == pytest.approx(
            exact.per_class[name]["calibration-error"], abs=0.05)
    assert binned.confusion == exact.confusion and binned.num_examples == len(y)


def test_the_threshold_is_a_bin_edge_and_the_reply_round_trips() -> None:
    study = Study(task="multilabel", classes=("a", "b"), metrics={"threshold": 0.33, "calibration-bins": 5})
    assert release_edges(study) == (0.2, 0.33, 0.4, 0.6, 0.8) and calibration_edges(study) == (0.2, 0.4, 0.6, 0.8)
    logits, y = _data(study, seed=4)
    p = probabilities(logits, "multilabel")
    counts = binned_counts(p, y, study)
    back = counts_from_reply(counts_to_reply(counts, study), study)
    assert (back.with_class == counts.with_class).all() and back.confusion is None
    # the threshold figures use the study's threshold
    assert metrics_from_counts(counts, study).per_class["a"]["sensitivity"] == pytest.approx(
        compute_metrics(p, y, study).per_class["a"]["sensitivity"])
    assert compute_metrics(p, y, study).class_confusion["a"][1][1] == ((p[:, 0] >= 0.33) & (y[:, 0] == 1)).sum()
    with pytest.raises(ValueError, match="'histogram-with' must be a list of 12 counts"):
        counts_from_reply({**counts_to_reply(counts, study), "histogram-with": [1.0] * 11}, study)


class _Linear(nn.Module):
    """A tiny K-output network, enough for predict and evaluate_study."""

    def __init__(self, k: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_evaluate_study_on_a_multiclass_and_a_multilabel_model() -> None:
    x = torch.randn(30, 1, 2, 2)
    model = _Linear(3)
    cls = TensorDataset(x, torch.arange(30) % 3)
    logits, labels = predict(model, cls, batch_size=7)
    assert logits.shape == (30, 3) and labels.shape == (30,)
    report = evaluate_study(model, cls, MULTICLASS, batch_size=7)
    want = float(nn.functional.cross_entropy(model(x).detach(), torch.arange(30) % 3))
    assert report.loss == pytest.approx(want, rel=1e-5)
    assert sum(map(sum, report.confusion or [])) == 30
    multi = TensorDataset(x, (torch.rand(30, 3) > 0.5).float())
    logits, labels = predict(model, multi, batch_size=4)
    assert logits.shape == labels.shape == (30, 3)
    report = evaluate_study(model, multi, MULTILABEL)
    assert set(report.per_class) == set(MULTILABEL.classes) and report.loss is not None and report.loss > 0
