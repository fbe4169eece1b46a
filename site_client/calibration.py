"""The operating point chosen at the site, on its own labelled store; nothing leaves.

The threshold is picked on the store's training split (the largest threshold that still reaches the
target sensitivity) and reported on its held-out test split, so the figures a clinician reads are
not flattered by the choice. It is written beside the release, bound to the weights' hash, and
`medfed predict --threshold auto` uses it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from medfed.files import write_file
from models.release import Release


class CalibrationError(Exception):
    """No operating point can be chosen or used as asked; the message says what to do."""


@dataclass
class Calibration:
    """The site's operating point for one release."""

    weights_sha256: str
    study_sha256: str
    target_sensitivity: float
    thresholds: tuple[float, ...]
    chosen_on: dict[str, list[float]]  # per class: sensitivity, specificity on the split it was picked on
    test: dict[str, list[float]]  # the same on the held-out test split
    images: dict[str, int]
    created: str


def calibration_path(release_dir: Path) -> Path:
    """Where a release's site calibration lives: beside the release folder (the release stays as signed)."""
    release_dir = Path(release_dir)
    return release_dir.with_name(release_dir.name + ".calibration.json")


def threshold_for(scores: np.ndarray, positives: np.ndarray, target: float) -> float:
    """The largest threshold whose sensitivity on (scores, positives) is at least ``target``."""
    pos = np.sort(scores[positives.astype(bool)])[::-1]
    if pos.size == 0:
        raise CalibrationError("the split has no positive example of this class, so no sensitivity can be set; "
                               "label more images of it")
    k = int(np.ceil(target * pos.size)) - 1  # the k-th highest positive score keeps k+1 of them above it
    return float(pos[max(0, min(k, pos.size - 1))])


def operating(scores: np.ndarray, positives: np.ndarray, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) at ``threshold``; NaN where a class is absent."""
    called = scores >= threshold
    p = positives.astype(bool)
    sens = float(called[p].mean()) if p.any() else float("nan")
    spec = float((~called[~p]).mean()) if (~p).any() else float("nan")
    return sens, spec


def _columns(release: Release, deid_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores and 0/1 targets per score column on one split of the store."""
    import torch

    from models.dataset import StudyDataset
    from models.evaluation import predict
    from site_client.inference import load_model, probabilities

    study = release.study
    logits, targets = predict(load_model(release, "cpu"), StudyDataset(deid_dir, study, split=split))
    scores = probabilities(torch.as_tensor(logits).reshape(len(logits), -1), study)
    targets = np.asarray(targets).reshape(len(scores), -1)
    if study.task == "binary":
        return scores[:, :1], targets[:, :1]
    return scores, targets


def calibrate(release: Release, deid_dir: Path, target_sensitivity: float) -> Calibration:
    """Pick the threshold of each score column on the train split; report it on the test split."""
    study = release.study
    if study.task == "multiclass":
        raise CalibrationError("a multiclass study decides by the highest score, so it has no threshold to "
                               "calibrate; calibrate binary or multilabel studies")
    if not 0.0 < target_sensitivity <= 1.0:
        raise CalibrationError(f"--target-sensitivity {target_sensitivity} must lie in (0, 1]")
    pick_s, pick_t = _columns(release, deid_dir, "train")
    test_s, test_t = _columns(release, deid_dir, "test")
    names = study.classes[1:] if study.task == "binary" else study.classes
    thresholds, chosen, test = [], {}, {}
    for k, name in enumerate(names):
        try:
            t = threshold_for(pick_s[:, k], pick_t[:, k], target_sensitivity)
        except CalibrationError as err:
            raise CalibrationError(f"class {name}: {err}") from None
        thresholds.append(t)
        chosen[name] = list(operating(pick_s[:, k], pick_t[:, k], t))
        test[name] = list(operating(test_s[:, k], test_t[:, k], t))
    return Calibration(weights_sha256=release.weights_sha256, study_sha256=study.digest(),
                       target_sensitivity=target_sensitivity, thresholds=tuple(thresholds), chosen_on=chosen,
                       test=test, images={"train": len(pick_s), "test": len(test_s)},
                       created=datetime.now(UTC).isoformat(timespec="seconds"))


def save(release: Release, cal: Calibration) -> Path:
    path = calibration_path(release.path)
    write_file(path, (json.dumps(asdict(cal), indent=2) + "\n").encode())
    return path


def load_thresholds(release: Release) -> tuple[float, ...]:
    """The site's calibrated thresholds for exactly this release's weights (``--threshold auto``)."""
    path = calibration_path(release.path)
    if not path.is_file():
        raise CalibrationError(f"--threshold auto needs {path}; run `medfed model calibrate {release.path} "
                               "DEID_DIR --target-sensitivity S` first, or give --threshold X")
    try:
        data = json.loads(path.read_text())
        thresholds = tuple(float(t) for t in data["thresholds"])
        weights = data["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CalibrationError(f"{path} is not a calibration medfed wrote; calibrate again") from None
    if weights != release.weights_sha256:
        raise CalibrationError(f"{path} was calibrated for other weights ({weights[:12]}…, this release has "
                               f"{release.weights_sha256[:12]}…); calibrate this release again")
    want = 1 if release.study.task == "binary" else len(release.study.classes)
    if len(thresholds) != want or not all(0.0 <= t <= 1.0 for t in thresholds):
        raise CalibrationError(f"{path} holds {len(thresholds)} threshold(s) for a study that needs {want}; "
                               "calibrate again")
    return thresholds
