"""A site serves only a study its privacy officer approved, and refuses one it cannot serve, saying why.

The coordinator ships the study with the run; a hostile one could swap the task, the classes or the
network to learn something else from the site's patients. Each refusal happens before any spend.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from anonymization.audit import read_records
from coordinator.federation import initial_state
from medfed.protocol import SITE_REFUSED
from medfed.settings import RunConfig, SiteConfig
from medfed.wire import pack
from models.study import DEFAULT_STUDY, Study, study_of
from site_client.client_app import build_app
from tests.models_factory import make_store

pytestmark = pytest.mark.usefixtures("task_identity")

STUDY = DEFAULT_STUDY.model_copy(update={"name": "soft-tissue", "image_size": 32})


def _site(tmp_path: Path, approved: tuple[str, ...]) -> tuple[SiteConfig, Path]:
    store = tmp_path / "store"
    if not store.exists():
        make_store(store, n_patients=6, images_per_patient=1, size=32, seed=4)
    site = SiteConfig.model_validate({"name": "hospital-b", "data-dir": str(store), "state-dir": str(tmp_path / "st"),
                                      "audit-dir": str(tmp_path / "audit"), "epsilon-cap": 50.0, "delta": 1e-3,
                                      "approved-studies": list(approved)})
    toml = tmp_path / "site.toml"
    toml.write_text(site.to_toml())
    return site, toml


def _train(toml: Path, cfg: RunConfig, state: dict | None = None) -> Message:
    ctx = Context(run_id=7, node_id=1, node_config={"site-config": str(toml)}, state=RecordDict(),
                  run_config=cfg.to_flower())
    arrays = pack(state if state is not None else initial_state(cfg))
    msg = Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=1, message_type="train")
    return build_app()(msg, ctx)


def _cfg(study: Study) -> RunConfig:
    return RunConfig().with_overrides(study=study.canonical_json(), batch_size=4, local_epochs=1, run_name="s1")


@pytest.mark.adversarial
def test_a_study_the_privacy_officer_did_not_approve_is_refused_before_any_spend(tmp_path: Path) -> None:
    site, toml = _site(tmp_path, approved=())
    reply = _train(toml, _cfg(STUDY))
    assert reply.has_error() and reply.error.code == SITE_REFUSED
    assert STUDY.digest() in reply.error.reason and "approved-studies" in reply.error.reason
    assert not (site.state_dir / "privacy-ledger.sqlite").exists()
    refused = [r for r in read_records(site.audit_path) if r.get("kind") == "round_refused"]
    assert refused and STUDY.digest() in refused[-1]["reason"]


@pytest.mark.adversarial
def test_a_swapped_study_is_not_the_approved_one(tmp_path: Path) -> None:
    """Approving one study approves exactly it: the same file with other classes is another study."""
    site, toml = _site(tmp_path, approved=(STUDY.digest(),))
    swapped = STUDY.model_copy(update={"classes": ("benign", "malignant")})
    assert swapped.digest() != STUDY.digest()
    reply = _train(toml, _cfg(swapped), state=initial_state(_cfg(STUDY)))
    assert reply.has_error() and reply.error.code == SITE_REFUSED and swapped.digest() in reply.error.reason


def test_an_approved_study_is_served_and_trains(tmp_path: Path) -> None:
    site, toml = _site(tmp_path, approved=(STUDY.digest(),))
    reply = _train(toml, _cfg(STUDY))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content["metrics"]["epsilon"] > 0


@pytest.mark.adversarial
def test_a_malformed_study_is_refused_naming_the_field(tmp_path: Path) -> None:
    site, toml = _site(tmp_path, approved=(STUDY.digest(),))
    body = json.loads(STUDY.canonical_json())
    body["task"] = "regression"
    cfg = RunConfig().with_overrides(study=json.dumps(body), batch_size=4, local_epochs=1, run_name="s2")
    ctx = Context(run_id=7, node_id=1, node_config={"site-config": str(toml)}, state=RecordDict(),
                  run_config=cfg.to_flower())
    msg = Message(content=RecordDict({"arrays": pack(initial_state(_cfg(STUDY))),
                                      "config": ConfigRecord({"server-round": 1})}), dst_node_id=1,
                  message_type="train")
    reply = build_app()(msg, ctx)
    assert reply.has_error() and reply.error.code == SITE_REFUSED
    assert "task" in reply.error.reason and not (site.state_dir / "privacy-ledger.sqlite").exists()


def test_the_default_study_needs_no_approval_and_takes_the_run_image_size() -> None:
    cfg = RunConfig().with_overrides(image_size=48)
    assert study_of(cfg) == DEFAULT_STUDY.model_copy(update={"image_size": 48})
