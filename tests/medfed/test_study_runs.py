"""A study on your own folders: `medfed train` at one site and `medfed simulate` across sites, end to end.

Real commands on real files: `medfed synth` makes the hospitals and their study.toml, `medfed deid run`
makes each store, and the same ServerApp and ClientApp as a deployment train the study under DP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.release import public_key_of, verify_release
from models.study import load_study

MEDFED = str(Path(sys.executable).parent / "medfed")


def _medfed(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([MEDFED, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"medfed {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def _stores(root: Path, task: str, classes: int, modality: str, patients: int) -> tuple[Path, dict[str, Path]]:
    _medfed("synth", str(root / "raw"), "--sites", "2", "--patients", str(patients), "--task", task,
            "--classes", str(classes), "--modality", modality, "--image-size", "32", "--seed", "4")
    stores = {}
    for site in ("a", "b"):
        raw = root / "raw" / f"hospital-{site}"
        stores[f"hospital-{site}"] = root / f"deid-{site}"
        _medfed("deid", "run", str(raw / "dicom"), str(root / f"deid-{site}"), "--key", str(root / f"{site}.key"),
                "--labels", str(raw / "labels.csv"), "--no-progress")
    return root / "raw" / "study.toml", stores


@pytest.mark.e2e
def test_a_three_class_study_runs_in_the_simulation_with_per_class_metrics(tmp_path: Path) -> None:
    study_file, stores = _stores(tmp_path, "multiclass", 3, "DX", 16)
    study = load_study(study_file)
    check = _medfed("data", "check", str(stores["hospital-a"]), "--study", str(study_file))
    assert check.stdout.strip().splitlines()[-1].endswith("0 refused, 0 unlabelled")
    out = tmp_path / "sim"
    sites = [a for name, store in stores.items() for a in ("--site", f"{name}={store}")]
    done = _medfed("simulate", "--study", str(study_file), *sites, "--rounds", "2", "--out", str(out),
                   "--epsilon-cap", "50", "--delta", "1e-3", "--run-config", "batch-size=16")
    assert "model:" in done.stdout
    metrics = json.loads((out / "coordinator" / "metrics.json").read_text())
    last = metrics["rounds"][-1]
    assert {s["status"] for s in last["sites"].values()} == {"trained"}
    pooled = last["pooled"] if "pooled" in last else last["evaluate"]
    text = json.dumps(pooled)
    assert all(c in text for c in study.classes), "pooled figures are per class"
    rel = verify_release(out / "coordinator" / "release", public_key_of(out / "release-signing.pub"))
    assert rel.study == study and rel.card["classes"] == list(study.classes)
    assert {name for name in rel.card["sites"]} == set(stores)  # the card names the sites
    # The run's last message carried the release; each site verified it with its own key and kept it.
    delivery = json.loads((out / "coordinator" / "release-delivery.json").read_text())
    assert "release sent to the sites: kept by 2 of 2 (hospital-a, hospital-b)" in " ".join(done.stdout.split())
    outcomes = sorted((n["site"], n["outcome"]) for n in delivery["nodes"].values())
    assert outcomes == [(s, "kept") for s in sorted(stores)]
    for name in stores:
        kept = list((out / "sites" / name / "state" / "releases").iterdir())
        assert len(kept) == 1 and verify_release(kept[0], public_key_of(out / "release-signing.pub")).weights_sha256 \
            == rel.weights_sha256


@pytest.mark.e2e
def test_a_two_finding_multilabel_study_trains_at_one_site(tmp_path: Path) -> None:
    study_file, stores = _stores(tmp_path, "multilabel", 2, "CT", 16)
    study = load_study(study_file)
    out = tmp_path / "local"
    done = _medfed("train", str(stores["hospital-a"]), "--study", str(study_file), "--epsilon-cap", "20",
                   "--out", str(out), "--rounds", "2", "--delta", "1e-3", "--run-config", "batch-size=16")
    body = json.loads((out / "metrics.json").read_text())
    assert body["rounds_trained"] == 2 and 0 < body["epsilon"] <= 20
    assert set(study.classes) <= set(json.dumps(body["test"]).replace('"', " ").split())
    assert "macro" in done.stdout
