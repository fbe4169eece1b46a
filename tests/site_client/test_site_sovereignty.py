"""The site decides what runs and what a run may ask: FAB approvals and the site's run bounds.

The deployment tests (tests/deployment/test_deployment.py) show the same against real SuperNodes; these
check the pieces without Flower's runtime: approvals by FAB hash, and the ClientApp's refusal of
a run outside the site's ``[run-bounds]``, recorded in its audit trail.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from anonymization.audit import read_records
from coordinator.federation import initial_state
from medfed.fab import build_fab, fab_sha256, release_fab_sha256
from medfed.protocol import SITE_REFUSED
from medfed.settings import OutOfBounds, RunBounds, RunConfig, SiteConfig
from medfed.wire import pack
from site_client.approval import ApprovalError, approvals, approve, approved_hashes
from site_client.client_app import build_app
from site_client.executor import refusal_reason
from tests.fab_factory import copy_app, plant_marker
from tests.models_factory import make_store

MEDFED = str(Path(sys.executable).parent / "medfed")


def test_the_installed_release_builds_the_same_fab_from_a_copy(tmp_path: Path) -> None:
    # `flwr build` is reproducible and fab-include keeps the bundle to the packages: a copy of the
    # release elsewhere (another checkout, the container image) has the same hash.
    release = release_fab_sha256()
    assert release is not None
    assert fab_sha256(build_fab(copy_app(tmp_path / "app"))) == release


def test_one_changed_line_changes_the_hash_and_is_not_approved(tmp_path: Path) -> None:
    app = copy_app(tmp_path / "app")
    plant_marker(app, tmp_path / "marker")
    changed = fab_sha256(build_fab(app))
    kit = tmp_path / "kit"
    kit.mkdir()
    assert changed != release_fab_sha256()
    assert changed not in approved_hashes(kit)
    assert approved_hashes(kit) == {release_fab_sha256()}  # default: exactly the installed release


def test_approve_adds_a_fab_by_its_hash_and_lists_it(tmp_path: Path) -> None:
    app = copy_app(tmp_path / "app")
    (app / "models" / "extra.py").write_text("X = 1\n")
    fab = tmp_path / "other.fab"
    fab.write_bytes(build_fab(app))
    kit = tmp_path / "kit"
    kit.mkdir()
    out = subprocess.run([MEDFED, "site", "approve", str(kit), "--app", str(fab)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    digest = fab_sha256(fab.read_bytes())
    assert digest in out.stdout and digest in approved_hashes(kit)
    assert approve(kit, app).sha256 == digest  # the folder builds the same FAB: one entry, not two
    assert [a.sha256 for a in approvals(kit)] == [release_fab_sha256(), digest]
    listing = subprocess.run([MEDFED, "site", "approvals", str(kit)], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0
    assert f"sha256:{release_fab_sha256()}  installed release" in listing.stdout
    assert f"sha256:{digest}" in listing.stdout


def test_approve_refuses_what_is_not_a_fab_and_a_torn_list_approves_nothing(tmp_path: Path) -> None:
    kit = tmp_path / "kit"
    kit.mkdir()
    junk = tmp_path / "junk.fab"
    junk.write_text("not a zip")
    out = subprocess.run([MEDFED, "site", "approve", str(kit), "--app", str(junk)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "is not a FAB" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    (kit / "approvals.json").write_text("{torn")
    with pytest.raises(ApprovalError, match="runs no app"):
        approved_hashes(kit)


def test_refusal_names_the_hash_and_nothing_of_the_site() -> None:
    reason = refusal_reason("hospital-a", "ab" * 32)
    assert "not approved" in reason and "ab" * 32 in reason


# ---- run bounds ------------------------------------------------------------------------------------


def test_bounds_name_each_field_and_its_bound() -> None:
    bounds = RunBounds.model_validate({"max-local-epochs": 2, "max-server-rounds": 5, "strategies": ["fedavg"],
                                       "max-lr": 0.1, "min-batch-size": 16, "max-evaluations": 3})
    cfg = RunConfig().with_overrides(local_epochs=3, num_server_rounds=6, strategy="fedprox", lr=0.5, batch_size=8)
    text = "; ".join(bounds.violations(cfg))
    for part in ("local-epochs 3 is above the site's bound max-local-epochs = 2",
                 "num-server-rounds 6 is above the site's bound max-server-rounds = 5",
                 "batch-size 8 is below the site's bound min-batch-size = 16",
                 "lr 0.5 is above the site's bound max-lr = 0.1",
                 "max-evaluations = 3", "strategy 'fedprox'"):
        assert part in text
    assert RunBounds().violations(RunConfig()) == []  # the defaults admit the default run


def test_site_toml_round_trips_its_bounds_and_refuses_unknown_keys(tmp_path: Path) -> None:
    site = SiteConfig.model_validate({"name": "a", "data-dir": str(tmp_path), "state-dir": str(tmp_path),
                                      "epsilon-cap": 8.0, "run-bounds": {"max-local-epochs": 3}})
    assert SiteConfig.model_validate(tomllib.loads(site.to_toml())) == site
    path = tmp_path / "site.toml"
    path.write_text(site.to_toml().replace("max-local-epochs = 3", "max-local-epoch = 3"))
    from medfed.settings import ConfigError

    with pytest.raises(ConfigError, match="run-bounds.max-local-epoch"):
        SiteConfig.from_toml(path)


# Messages are built here as the coordinator would, outside Flower's runtime (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("task_identity")


def test_clientapp_refuses_a_run_outside_the_bounds_before_training(tmp_path: Path) -> None:
    store = tmp_path / "store"
    make_store(store, n_patients=4, images_per_patient=1, size=32, seed=3)
    site = SiteConfig.model_validate({"name": "hospital-b", "data-dir": str(store), "state-dir": str(tmp_path / "st"),
                                      "audit-dir": str(tmp_path / "audit"), "epsilon-cap": 50.0, "delta": 1e-3,
                                      "run-bounds": {"max-local-epochs": 1}})
    toml = tmp_path / "site.toml"
    toml.write_text(site.to_toml())
    cfg = RunConfig().with_overrides(image_size=32, batch_size=8, local_epochs=5, run_name="greedy")
    ctx = Context(run_id=7, node_id=1, node_config={"site-config": str(toml)}, state=RecordDict(),
                  run_config=cfg.to_flower())
    msg = Message(content=RecordDict({"arrays": pack(initial_state(cfg)), "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=1, message_type="train")
    reply = build_app()(msg, ctx)
    assert reply.has_error() and reply.error.code == SITE_REFUSED
    assert "local-epochs 5 is above the site's bound max-local-epochs = 1" in reply.error.reason
    assert not (site.state_dir / "privacy-ledger.sqlite").exists()  # nothing trained, nothing spent
    refused = [r for r in read_records(site.audit_path) if r.get("kind") == "round_refused"]
    assert refused and "max-local-epochs" in refused[-1]["reason"]
    with pytest.raises(OutOfBounds):
        site.check_run(cfg)


def test_evaluations_beyond_the_sites_bound_are_refused_and_a_repeat_is_free(tmp_path: Path) -> None:
    from site_client.task import evaluate_round, ledger_for

    store = tmp_path / "store"
    make_store(store, n_patients=8, images_per_patient=2, size=32, seed=4)
    site = SiteConfig.model_validate({"name": "hospital-e", "data-dir": str(store), "state-dir": str(tmp_path / "st"),
                                      "audit-dir": str(tmp_path / "audit"), "epsilon-cap": 50.0, "delta": 1e-3,
                                      "run-bounds": {"max-evaluations": 1}})
    cfg = RunConfig().with_overrides(image_size=32)
    first, other = initial_state(cfg), initial_state(cfg.with_overrides(seed=1))
    released = evaluate_round(site, cfg, "run-e", first, 1)
    again = evaluate_round(site, cfg, "run-e", first, 2)  # the same model again: the same release, no new spend
    assert {k: repr(v) for k, v in again.items()} == {k: repr(v) for k, v in released.items()}
    with pytest.raises(OutOfBounds, match="max-evaluations = 1"):
        evaluate_round(site, cfg, "run-e", other, 3)
    assert sum(r["status"] == "evaluated" for r in ledger_for(site).rounds("run-e")) == 1
