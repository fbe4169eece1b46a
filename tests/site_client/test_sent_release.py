"""The release sent in a run's last message: a site keeps it only if the release key of its own kit
verifies it, records what it kept or refused, and answers with one allowed metric."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from anonymization.audit import AuditTrail
from coordinator.federation import initial_state
from medfed.protocol import RELEASE_KEPT, RELEASE_RECORD, SITE_DECLINED, SITE_REFUSED
from medfed.settings import RunConfig, SiteConfig
from medfed.signing import Signer
from models.release import RELEASE_FILES, RELEASE_PUBLIC_KEY, model_card, release_bytes, write_release
from models.study import study_of
from site_client.client_app import build_app
from site_client.releases import RELEASES_DIR

CFG = RunConfig().with_overrides(image_size=32)
pytestmark = pytest.mark.usefixtures("task_identity")


def _signed(root: Path, signer: Signer) -> dict[str, bytes]:
    study = study_of(CFG)
    card = model_card(study=study, run_name="run-1", rounds=2, fab_sha256=None, metrics={}, sites={})
    return release_bytes(write_release(root, initial_state(CFG), study, card, signer))


def _site(root: Path, consortium: Signer | None) -> tuple[SiteConfig, Context]:
    key = None
    if consortium is not None:
        key = root / "kit" / RELEASE_PUBLIC_KEY
        key.parent.mkdir(parents=True)
        key.write_bytes(consortium.public_pem())
    site = SiteConfig(name="hospital-r", data_dir=root / "data", state_dir=root / "state", audit_dir=root / "audit",
                      release_key=key, epsilon_cap=8.0, delta=1e-5)
    (root / "site.toml").write_text(site.to_toml())
    return site, Context(run_id=5, node_id=3, node_config={"site-config": str(root / "site.toml")},
                         state=RecordDict(), run_config={})


def _send(files: dict[str, object], context: Context) -> Message:
    content = RecordDict({RELEASE_RECORD: ConfigRecord(files),  # type: ignore[arg-type]
                          "config": ConfigRecord({"server-round": 2})})
    return build_app(CFG)(Message(content=content, dst_node_id=3, message_type=MessageType.QUERY), context)


def _kinds(site: SiteConfig) -> list[str]:
    return [r["kind"] for r in AuditTrail(site.audit_path).records()]


def test_a_release_signed_by_the_consortium_is_kept_once_and_recorded(tmp_path: Path) -> None:
    consortium = Signer.generate()
    site, context = _site(tmp_path, consortium)
    files = _signed(tmp_path / "release", consortium)
    for _ in range(2):  # sent again (a resumed run's end): kept once
        reply = _send(files, context)
        assert not reply.has_error()
        assert dict(reply.content["metrics"]) == {RELEASE_KEPT: 1}  # nothing else leaves
    (kept,) = (site.state_dir / RELEASES_DIR).iterdir()
    assert kept.name.endswith("-" + hashlib.sha256(files["model.pt"]).hexdigest()[:12])  # one folder per model
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == files
    assert _kinds(site) == ["release_kept", "egress"] * 2


def _tampered(files: dict[str, bytes]) -> dict[str, object]:
    weights = bytearray(files["model.pt"])
    weights[len(weights) // 2] ^= 1
    return {**files, "model.pt": bytes(weights)}


ATTACKS = {
    "a byte of the weights changed": _tampered,
    "signed by another key": None,  # built in the test
    "a file outside the release": lambda f: {**f, "../../evil.sh": b"#!/bin/sh\n"},
    "the signature left out": lambda f: {k: v for k, v in f.items() if k != "signature"},
    "a file that is not bytes": lambda f: {**f, "card.json": "{}"},
}


@pytest.mark.adversarial
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_release_the_consortium_did_not_sign_as_sent_is_refused_and_nothing_is_kept(tmp_path: Path,
                                                                                       attack: str) -> None:
    consortium = Signer.generate()
    site, context = _site(tmp_path, consortium)
    if attack == "signed by another key":  # e.g. a malicious coordinator signing its own model
        files: dict[str, object] = dict(_signed(tmp_path / "release", Signer.generate()))
    else:
        files = ATTACKS[attack](_signed(tmp_path / "release", consortium))  # type: ignore[misc]
    reply = _send(files, context)
    assert reply.has_error() and reply.error.code == SITE_REFUSED
    assert "refused the release sent" in reply.error.reason
    releases = site.state_dir / RELEASES_DIR
    assert not releases.exists() or not any(releases.iterdir())  # no kept release, no half-written folder
    assert not (tmp_path / "evil.sh").exists() and not (site.state_dir / "evil.sh").exists()
    assert _kinds(site)[:1] == ["release_refused"]


def test_a_site_without_a_release_key_declines_the_release(tmp_path: Path) -> None:
    site, context = _site(tmp_path, None)
    reply = _send(dict(_signed(tmp_path / "release", Signer.generate())), context)
    assert reply.has_error() and reply.error.code == SITE_DECLINED and "release-key is not set" in reply.error.reason
    assert not (site.state_dir / RELEASES_DIR).exists()
    assert _kinds(site)[:1] == ["release_declined"]


def test_the_release_files_are_those_verify_reads() -> None:
    assert set(RELEASE_FILES) == {"model.pt", "study.json", "card.json", "manifest.json", "signature"}
