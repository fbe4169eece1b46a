"""The site's ClientApp called directly (no Flower runtime): DP training, declines, the egress guard."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from anonymization.audit import AuditTrail
from coordinator.federation import initial_state
from medfed.protocol import EGRESS_BLOCKED, SITE_DECLINED, SITE_FAILED, SITE_REFUSED
from medfed.settings import RunConfig, SiteConfig
from medfed.wire import MODEL_ARRAY, pack, unpack
from models.registry import DEFAULT_MODE
from site_client.client_app import build_app, make_egress_guard
from site_client.egress import EVALUATE_METRICS
from site_client.task import ledger_for, train_round
from tests.models_factory import make_store

# A fixed noise multiplier (no calibration), so each round's spend is known in advance.
CFG = RunConfig().with_overrides(
    image_size=32,
    batch_size=8,
    lr=0.05,
    optimizer="sgd",
    local_epochs=1,
    noise_multiplier=1.0,
    calibrate_noise=False,
    num_server_rounds=3,
)


# Messages are built here as the coordinator would, outside Flower's runtime (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deid")
    make_store(root, n_patients=16, images_per_patient=2, size=64, seed=1)
    return root


def _site(tmp_path: Path, store: Path, cap: float = 50.0, delta: float = 1e-3) -> SiteConfig:
    return SiteConfig(name="hospital-t", data_dir=store, state_dir=tmp_path / "state",
                      audit_dir=tmp_path / "audit", epsilon_cap=cap, delta=delta)


def _context(site: SiteConfig, tmp_path: Path, run_id: int = 7) -> Context:
    toml = tmp_path / "site.toml"
    toml.write_text(site.to_toml())
    return Context(run_id=run_id, node_id=1, node_config={"site-config": str(toml)}, state=RecordDict(),
                   run_config={})


def _train_msg(server_round: int = 1) -> Message:
    content = RecordDict({"arrays": pack(initial_state(CFG)),
                          "config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, dst_node_id=1, message_type="train")


def test_train_round_spends_and_composes(tmp_path: Path, store: Path) -> None:
    site = _site(tmp_path, store)
    first = train_round(site, CFG, "run-1", 1, initial_state(CFG))
    second = train_round(site, CFG, "run-1", 2, first.state_dict)
    assert first.declined is None and second.declined is None
    assert 0 < first.metrics["epsilon"] < second.metrics["epsilon"] <= site.epsilon_cap
    assert ledger_for(site).epsilon("run-1", site.delta) == pytest.approx(second.metrics["epsilon"])
    assert any(not torch.equal(first.state_dict[k], initial_state(CFG)[k]) for k in first.state_dict)


def test_train_round_declines_over_cap_without_spending(tmp_path: Path, store: Path) -> None:
    first = train_round(_site(tmp_path, store), CFG, "run-1", 1, initial_state(CFG))
    eps = first.metrics["epsilon"]
    site = _site(tmp_path, store, cap=round(eps * 1.2, 3))  # the cap lowered: room for no second round
    reply = train_round(site, CFG, "run-1", 2, first.state_dict)
    assert reply.state_dict is None and reply.declined is not None
    assert f"cap of {site.epsilon_cap:g}" in reply.declined
    assert ledger_for(site).epsilon("run-1", site.delta) == pytest.approx(eps)
    assert [r["kind"] for r in AuditTrail(site.audit_path).records()] == ["round_trained", "round_declined"]


def test_auto_mode_trains_in_the_networks_fastest_mode_and_says_so(tmp_path: Path, store: Path) -> None:
    """The run's default ``auto`` is resolved per network before training; the record names the mode used."""
    assert CFG.grad_sample_mode == "auto"
    site = _site(tmp_path, store)
    train_round(site, CFG, "run-1", 1, initial_state(CFG))
    (trained,) = [r for r in AuditTrail(site.audit_path).records() if r["kind"] == "round_trained"]
    assert trained["grad_sample_mode"] == DEFAULT_MODE["scatter-head"]


def test_delta_not_below_one_over_the_bucket_is_refused(tmp_path: Path, store: Path) -> None:
    from models.dataset import ManifestDataset
    from site_client.task import size_bucket

    app = build_app(CFG)
    site = _site(tmp_path, store, delta=0.5)
    reply = app(_train_msg(), _context(site, tmp_path))
    assert reply.has_error() and reply.error.code == SITE_REFUSED
    n = len(ManifestDataset(store, split="train", image_size=CFG.image_size))
    assert "delta" in reply.error.reason and f"1/size-bucket = 1/{size_bucket(n)}" in reply.error.reason
    assert str(n) not in reply.error.reason  # the exact count never leaves, not even in a refusal


def test_client_app_reply_passes_guard_and_is_audited(tmp_path: Path, store: Path) -> None:
    app = build_app(CFG)
    site = _site(tmp_path, store)
    ctx = _context(site, tmp_path)
    reply = app(_train_msg(), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    # the model leaves as one flat array (medfed.wire) and cuts back into the network's tensors
    assert list(reply.content["arrays"].keys()) == [MODEL_ARRAY]
    back = unpack(reply.content["arrays"], initial_state(CFG))
    assert [(k, v.shape) for k, v in back.items()] == [(k, v.shape) for k, v in initial_state(CFG).items()]
    egress = [r for r in AuditTrail(site.audit_path).records() if r["kind"] == "egress"]
    assert len(egress) == 1 and egress[0]["run_id"] == "7" and egress[0]["server_round"] == 1
    assert egress[0]["bytes"] > 0 and "epsilon" in egress[0]["metrics"]

    ev = app(
        Message(
            content=RecordDict({"arrays": reply.content["arrays"], "config": ConfigRecord({"server-round": 1})}),
            dst_node_id=1,
            message_type="evaluate",
        ),
        ctx,
    )
    assert not ev.has_error()
    metrics = ev.content["metrics"]
    # a DP release (noisy histograms): on a split of a few images a noisy class total may be <= 0 (AUC NaN)
    assert set(metrics.keys()) == EVALUATE_METRICS and metrics["epsilon"] > 0
    assert math.isnan(metrics["auc"]) or 0.0 <= metrics["auc"] <= 1.0


def test_client_app_declines_with_reason(tmp_path: Path, store: Path) -> None:
    app = build_app(CFG)
    first = app(_train_msg(1), _context(_site(tmp_path, store), tmp_path))
    eps = first.content["metrics"]["epsilon"]
    reply = app(_train_msg(2), _context(_site(tmp_path, store, cap=eps * 1.2), tmp_path))
    assert reply.has_error() and reply.error.code == SITE_DECLINED
    assert "declines round 2" in reply.error.reason
    # a cap no round can meet is refused before training, with the numbers
    refused = app(_train_msg(1), _context(_site(tmp_path / "other", store, cap=0.01), tmp_path))
    assert refused.has_error() and refused.error.code == SITE_REFUSED
    assert "refuses the run" in refused.error.reason and "cap 0.01" in refused.error.reason


def _rogue_app(handler_metrics: dict[str, float], raise_exc: Exception | None = None) -> ClientApp:
    app = ClientApp(mods=[make_egress_guard(CFG)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if raise_exc is not None:
            raise raise_exc
        return Message(content=RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord(handler_metrics)}),
                       reply_to=msg)

    return app


def test_guard_blocks_a_reply_off_the_allow_list(tmp_path: Path, store: Path) -> None:
    site = _site(tmp_path, store)
    reply = _rogue_app({"num-examples": 3, "patient-age": 61.0})(_train_msg(), _context(site, tmp_path))
    assert reply.has_error() and reply.error.code == EGRESS_BLOCKED
    kinds = [r["kind"] for r in AuditTrail(site.audit_path).records()]
    assert kinds == ["egress_blocked"]


def test_guard_hides_exception_details(tmp_path: Path, store: Path) -> None:
    site = _site(tmp_path, store)
    reply = _rogue_app({}, raise_exc=RuntimeError("failed on /pacs/DOE^JOHN/1.dcm"))(
        _train_msg(), _context(site, tmp_path)
    )
    assert reply.has_error() and reply.error.code == SITE_FAILED
    assert "DOE" not in reply.error.reason and "RuntimeError" in reply.error.reason


def test_site_keeps_its_optimizer_state_on_its_own_disk(tmp_path: Path, store: Path) -> None:
    """Adam's moments carry from round to round in the site's state folder, and never ride in the reply."""
    from site_client.task import load_optimizer_state

    site = _site(tmp_path, store)
    cfg = CFG.with_overrides(optimizer="adam", lr=0.01, keep_optimizer_state=True)
    first = train_round(site, cfg, "run-1", 1, initial_state(cfg))
    steps = first.metrics["steps"]
    saved = load_optimizer_state(site, "run-1")
    assert {float(s["step"]) for s in saved["state"].values()} == {float(steps)}  # type: ignore[union-attr]
    second = train_round(site, cfg, "run-1", 2, first.state_dict)
    after = load_optimizer_state(site, "run-1")
    assert {float(s["step"]) for s in after["state"].values()} == {2.0 * steps}  # type: ignore[union-attr]
    assert set(second.state_dict) == set(initial_state(cfg))  # the model's arrays only
    assert load_optimizer_state(site, "run-2") == {}  # another run starts fresh
    # A torn state file costs only the warm-up: the round trains with a fresh optimizer.
    path = next((site.state_dir / "optimizer-state").glob("*.pt"))
    path.write_bytes(b"torn")
    assert load_optimizer_state(site, "run-1") == {}
    assert train_round(site, cfg, "run-1", 3, second.state_dict).declined is None
    off = _site(tmp_path / "off", store)
    train_round(off, cfg.with_overrides(keep_optimizer_state=False), "run-1", 1, initial_state(cfg))
    assert not (off.state_dir / "optimizer-state").exists()
