"""The consortium's signed release: every byte is signed, and a release altered or signed by another key is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coordinator.federation import initial_state
from coordinator.release import release_run
from medfed.settings import RunConfig
from medfed.signing import Signer as AuditSigner
from medfed.signing import write_private_key
from models.release import (
    RELEASE_PUBLIC_KEY,
    SIGNED_FILES,
    ReleaseError,
    device_uid,
    model_card,
    public_key_of,
    verify_release,
)
from models.study import DEFAULT_STUDY

MEDFED = str(Path(sys.executable).parent / "medfed")
STUDY = DEFAULT_STUDY.model_copy(update={"name": "nodule", "image_size": 32})


def _run_dir(tmp_path: Path) -> Path:
    """A finished run's folder as the coordinator leaves it: model.pt and metrics.json."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = RunConfig().with_overrides(study=STUDY.canonical_json(), run_name="r1")
    torch.save(initial_state(cfg), run / "model.pt")
    rounds = [{"round": 3, "evaluate": {"auc": 0.81, "accuracy": 0.77},
               "sites": {"hospital-a": {"epsilon": 2.5, "epsilon_cap": 8.0, "train": {"delta": 1e-5},
                                        "evaluate": {"auc": 0.8, "epsilon": 2.5}}}}]
    (run / "metrics.json").write_text(json.dumps({"run_config": cfg.to_flower(), "rounds": rounds}))
    return run


@pytest.fixture
def released(tmp_path: Path) -> tuple[Path, AuditSigner]:
    signer = AuditSigner.generate()
    return release_run(_run_dir(tmp_path), signer), signer


def test_a_release_verifies_and_carries_its_card(released: tuple[Path, AuditSigner]) -> None:
    path, signer = released
    rel = verify_release(path, signer.public_raw)
    assert rel.study == STUDY
    card = rel.card
    assert card["network"] == "scatter-head" and card["classes"] == ["absent", "present"] and card["rounds"] == 3
    assert card["sites"]["hospital-a"]["epsilon"] == 2.5 and card["sites"]["hospital-a"]["delta"] == 1e-5
    assert card["metrics"]["auc"] == 0.81 and card["medfed_version"] and card["run"] == "r1"
    assert card["weights_sha256"] == rel.weights_sha256 and rel.device_uid == device_uid(rel.weights_sha256)
    assert rel.device_uid.startswith("2.25.") and len(rel.device_uid) <= 64
    model_state = torch.load(path.parent / "model.pt", weights_only=True)
    assert all(torch.equal(model_state[k], rel.state_dict[k]) for k in model_state)


@pytest.mark.parametrize(("run", "name"), [("r1", "nodule-r1"), ("nodule-20261207T1200", "nodule-20261207T1200"),
                                          ("noduleX", "nodule-noduleX")])
def test_the_card_names_the_study_and_the_run_once(run: str, name: str) -> None:
    assert model_card(study=STUDY, run_name=run, rounds=1, fab_sha256=None, metrics={}, sites={})["name"] == name


@pytest.mark.adversarial
@pytest.mark.parametrize("name", [*SIGNED_FILES, "manifest.json", "signature"])
def test_any_changed_byte_is_refused(released: tuple[Path, AuditSigner], name: str) -> None:
    path, signer = released
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / name).write_bytes(bytes(data))
    with pytest.raises(ReleaseError, match="altered|refused"):
        verify_release(path, signer.public_raw)


@pytest.mark.adversarial
def test_a_release_signed_by_another_key_is_refused(tmp_path: Path) -> None:
    """A hostile coordinator re-signs its own weights with its own key: the sites' kit key rejects it."""
    mallory = AuditSigner.generate()
    path = release_run(_run_dir(tmp_path), mallory)
    with pytest.raises(ReleaseError, match="another key"):
        verify_release(path, AuditSigner.generate().public_raw)


@pytest.mark.adversarial
def test_a_missing_file_or_a_symlink_is_refused(released: tuple[Path, AuditSigner], tmp_path: Path) -> None:
    path, signer = released
    (path / "study.json").rename(tmp_path / "study.json")
    (path / "study.json").symlink_to(tmp_path / "study.json")
    with pytest.raises(ReleaseError, match="not a regular file"):
        verify_release(path, signer.public_raw)


def test_cli_verify_prints_the_card_and_refuses_a_tampered_release(released: tuple[Path, AuditSigner],
                                                                  tmp_path: Path) -> None:
    path, signer = released
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / RELEASE_PUBLIC_KEY).write_bytes(signer.public_pem())
    ok = subprocess.run([MEDFED, "model", "verify", str(path), "--public-key", str(kit)], capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "verified" in ok.stdout and "scatter-head" in ok.stdout and "hospital-a" in ok.stdout
    weights = bytearray((path / "model.pt").read_bytes())
    weights[-10] ^= 0xFF
    (path / "model.pt").write_bytes(bytes(weights))
    bad = subprocess.run([MEDFED, "model", "verify", str(path), "--public-key", str(kit)], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and "refused" in bad.stdout and "Traceback" not in bad.stdout + bad.stderr


def test_cli_release_signs_a_checkpoint_round(tmp_path: Path) -> None:
    from coordinator.checkpoint import save_checkpoint
    from coordinator.history import RunHistory

    run = _run_dir(tmp_path)
    cfg = RunConfig().with_overrides(study=STUDY.canonical_json(), run_name="r1")
    save_checkpoint(run / "checkpoints", 2, initial_state(cfg), RunHistory(), cfg.to_flower())
    signer = AuditSigner.generate()
    key = tmp_path / "release-signing.key"
    write_private_key(key, signer)
    done = subprocess.run([MEDFED, "model", "release", str(run), "--key", str(key), "--round", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rel = verify_release(run / "release-round-0002", public_key_of(_pem(tmp_path, signer)))
    assert rel.card["rounds"] == 0  # metrics.json knows no round up to 2 in this fixture
    missing = subprocess.run([MEDFED, "model", "release", str(run), "--key", str(key), "--round", "9"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "round-0009.pt does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr and missing.stdout == ""


def _pem(tmp_path: Path, signer: AuditSigner) -> Path:
    pub = tmp_path / "pub.pem"
    pub.write_bytes(signer.public_pem())
    return pub


def test_the_delivery_report_names_every_site_the_run_knew_kept_refused_or_silent(tmp_path: Path) -> None:
    """A site that refuses the release sends no anchor: the report names it by the name the run knew."""
    from flwr.app import ConfigRecord, Error, Message, MessageType, Metadata, RecordDict

    from anonymization.audit.anchors import ANCHOR_RECORD, anchor_fields
    from coordinator.release import DELIVERY_FILE, delivery_line, delivery_outcomes

    def reply(node: int, **kw: object) -> Message:
        meta = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="m",
                        group_id="", created_at=0.0, ttl=60.0, message_type=MessageType.QUERY)
        return Message(metadata=meta, **kw)  # type: ignore[arg-type]

    kept = reply(11, content=RecordDict({ANCHOR_RECORD: ConfigRecord(anchor_fields("hospital-a", 3, "a" * 64))}))
    refused = reply(12, error=Error(code=0, reason="signed by another key"))
    names = {"11": "hospital-a", "12": "hospital-b", "13": "hospital-c"}
    out = delivery_outcomes([11, 12, 13], [kept, refused], names)
    assert out == {"11": {"site": "hospital-a", "outcome": "kept"},
                   "12": {"site": "hospital-b", "outcome": "not kept: signed by another key"},
                   "13": {"site": "hospital-c", "outcome": "no answer"}}
    (tmp_path / DELIVERY_FILE).write_text(json.dumps({"release": "release", "nodes": out}))
    assert delivery_line(tmp_path / "release") == (
        "sent to the sites: kept by 1 of 3 (hospital-a); hospital-b: not kept: signed by another key; "
        "hospital-c: no answer")
    # a node the run never named stays a node, in the words `medfed run` replaces with its enrolled name
    (tmp_path / DELIVERY_FILE).write_text(json.dumps({"nodes": delivery_outcomes([12], [refused], {})}))
    assert delivery_line(tmp_path / "release").endswith("(none); site node 12: not kept: signed by another key")
