"""The whole pipeline through a real Flower simulation: synth → de-identify → DP FedAvg.

Two small hospitals, two rounds, 32×32 images. A second run over the same
sites gives one of them a tiny privacy cap: it declines, the run completes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
import torch

from coordinator.federation import initial_state
from medfed.demo import DemoSummary, run_demo, simulate
from medfed.settings import RunConfig, SiteConfig
from medfed.wire import MODEL_ARRAY
from site_client.egress import EVALUATE_METRICS, RELEASE_METRICS, TRAIN_METRICS
from site_client.task import ledger_for

pytestmark = pytest.mark.e2e

OVERRIDES = {"image_size": 32, "batch_size": 8, "lr": 0.05}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoSummary:
    out = tmp_path_factory.mktemp("demo")
    # A test split of a few images: low evaluation noise keeps its noisy class totals (and AUC) defined.
    return run_demo(out, sites=2, rounds=2, patients=24, seed=3, epsilon_caps=[50.0, 50.0], delta=1e-4,
                    run_overrides=OVERRIDES, progress=False, evaluation_noise=0.5)


def _sites(demo: DemoSummary) -> list[SiteConfig]:
    return [SiteConfig.from_toml(p / "site.toml") for p in sorted((demo.out / "sites").iterdir())]


def test_model_trained_and_outputs_written(demo: DemoSummary) -> None:
    cfg = RunConfig().with_overrides(seed=3, **OVERRIDES)
    initial = initial_state(cfg)
    final = torch.load(demo.model, weights_only=True)
    assert final.keys() == initial.keys()
    assert any(not torch.equal(final[k], initial[k]) for k in final)
    assert [r["round"] for r in demo.rounds] == [1, 2]
    assert all(r["auc"] is not None and 0.0 <= r["auc"] <= 1.0 for r in demo.rounds)
    assert demo.plot.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (demo.out / "coordinator" / "checkpoints").iterdir()) == [
        "round-0001.pt", "round-0002.pt"]


def test_each_site_spent_epsilon_within_cap(demo: DemoSummary) -> None:
    assert len(demo.sites) == 2
    for site in demo.sites:
        assert site.rounds_trained == 2 and site.rounds_declined == 0
        assert 0.0 < site.epsilon <= site.epsilon_cap
    # the coordinator saw the same spend the sites recorded
    last = demo.rounds[-1]["sites"]
    assert sorted(round(v["epsilon"], 6) for v in last.values()) == sorted(round(s.epsilon, 6) for s in demo.sites)


def _raw_identifiers(raw_dir: Path) -> set[str]:
    values: set[str] = set()
    for path in raw_dir.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        values.update({str(ds.PatientName), str(ds.PatientID), str(ds.AccessionNumber), str(ds.PatientBirthDate),
                       str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                       str(ds.FrameOfReferenceUID)})
        family = str(ds.PatientName).split("^")[0]
        if len(family) >= 5:
            values.add(family)
    return {v for v in values if len(v) >= 6}


def test_no_original_identifier_in_any_byte_of_the_store(demo: DemoSummary) -> None:
    raw = demo.out / "raw"
    identifiers = _raw_identifiers(raw)
    assert len(identifiers) > 50
    needles = [v.encode() for v in identifiers]
    scanned = 0
    for site in _sites(demo):
        for path in site.data_dir.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                scanned += 1
                leaked = [n for n in needles if n in data]
                assert not leaked, f"{path.relative_to(demo.out)} contains original identifiers {leaked[:3]}"
    assert scanned > 20


def test_every_reply_stayed_on_the_allow_list(demo: DemoSummary) -> None:
    model_keys = {MODEL_ARRAY}  # the model travels as one flat array (medfed.wire)
    for site in _sites(demo):
        lines = (site.audit_path / "audit.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        egress = [r for r in records if r["kind"] == "egress"]
        assert not [r for r in records if r["kind"] == "egress_blocked"]
        assert len([r for r in egress if r["message_type"].startswith("train")]) == 2
        assert len([r for r in egress if r["message_type"].startswith("evaluate")]) == 2
        assert [r["metrics"] for r in egress if r["message_type"] == "query"] == [["release-kept"]]  # the release
        for r in egress:
            kind = r["message_type"].split(".")[0]
            allowed = {"train": TRAIN_METRICS, "evaluate": EVALUATE_METRICS, "query": RELEASE_METRICS}[kind]
            assert set(r["metrics"]) <= allowed
            if r["message_type"].startswith("train"):
                assert {a["name"] for a in r["arrays"]} == model_keys and r["bytes"] > 0
            else:
                assert r["arrays"] == []
    for rnd in demo.rounds:
        for site in rnd["sites"].values():
            assert set(site["train"]) <= TRAIN_METRICS and set(site["evaluate"]) <= EVALUATE_METRICS


def test_site_over_its_cap_declines_and_run_completes(demo: DemoSummary) -> None:
    sites = _sites(demo)
    tiny = sites[1].model_copy(update={"epsilon_cap": 0.05})
    (tiny.data_dir.parent / "site.toml").write_text(tiny.to_toml())
    out = demo.out / "coordinator-capped"
    cfg = RunConfig().with_overrides(num_server_rounds=2, demo_dir=str(demo.out), out_dir=str(out), min_train_nodes=1,
                                     min_evaluate_nodes=2, min_available_nodes=2, seed=3, **OVERRIDES)
    simulate(cfg, 2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    statuses = [sorted(s["status"] for s in r["sites"].values()) for r in metrics["rounds"]]
    # a cap that not even one round can meet is refused before training (issue 5), every round
    assert statuses == [["refused", "trained"], ["refused", "trained"]]
    reasons = [s["reason"] for r in metrics["rounds"] for s in r["sites"].values() if s["status"] == "refused"]
    assert all("cap" in reason and tiny.name in reason for reason in reasons)
    assert (out / "model.pt").exists()
    # the declining site spent nothing in that run; its ledger says why
    ledger = ledger_for(tiny)
    declined = [r for r in ledger.rounds() if r["status"] == "declined"]
    assert len(declined) == 2 and all("cap" in r["reason"] for r in declined)
    assert all(ledger.epsilon(r["run_id"], tiny.delta) == 0.0 for r in declined)


def test_every_sites_trail_matches_the_anchors_the_coordinator_kept(demo: DemoSummary) -> None:
    """Through Flower's runtime each train and evaluate reply carried its trail's head; the run's receipts
    hold them, keyed on the run as the site keys it, and each site's trail verifies against them."""
    from typer.testing import CliRunner

    from anonymization.audit import read_records
    from anonymization.audit.anchors import ANCHORS_FILE
    from coordinator.receipts import read_jsonl
    from medfed.cli.audit import audit_app

    anchors = read_jsonl(demo.out / "coordinator" / ANCHORS_FILE)
    for site in _sites(demo):
        mine = [a for a in anchors if a["site"] == site.name]
        assert sorted((a["round"], a["phase"]) for a in mine) == [(1, "evaluate"), (1, "train"), (2, "evaluate"),
                                                                   (2, "train")]
        egress = {(r["anchor"]["seq"], r["anchor"]["head"]): r["run_id"] for r in read_records(site.audit_path)
                  if r["kind"] == "egress" and "anchor" in r}
        assert all(egress.get((a["seq"], a["head"])) == a["run"] for a in mine)  # the anchor it sent, same run
        result = CliRunner().invoke(audit_app, ["verify", str(site.audit_path), "--anchors",
                                                str(demo.out / "coordinator")])
        assert result.exit_code == 0 and f"4 anchor(s) of site {site.name}" in result.output, result.output
