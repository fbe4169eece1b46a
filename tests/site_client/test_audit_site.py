"""The site client's records when a round goes wrong: each ends its run sealed, with no identifier."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from anonymization.audit import read_records
from anonymization.audit.verify import verify_trail
from coordinator.federation import initial_state
from medfed.protocol import EGRESS_BLOCKED, SITE_FAILED
from medfed.settings import RunConfig, SiteConfig
from medfed.wire import pack
from site_client.client_app import make_egress_guard

CFG = RunConfig().with_overrides(image_size=32, batch_size=8)


# Messages are built here as the coordinator would, outside Flower's runtime (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("task_identity")


def _app(metrics: dict[str, float], raise_exc: Exception | None = None) -> ClientApp:
    app = ClientApp(mods=[make_egress_guard(CFG)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if raise_exc is not None:
            raise raise_exc
        return Message(content=RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord(metrics)}),
                       reply_to=msg)

    return app


def _call(app: ClientApp, tmp_path: Path) -> tuple[Message, Path]:
    (tmp_path / "store").mkdir(exist_ok=True)
    site = SiteConfig(name="hospital-t", data_dir=tmp_path / "store", state_dir=tmp_path / "state",
                      audit_dir=tmp_path / "audit", epsilon_cap=10.0, delta=1e-3)
    toml = tmp_path / "site.toml"
    toml.write_text(site.to_toml())
    ctx = Context(run_id=7, node_id=1, node_config={"site-config": str(toml)}, state=RecordDict(), run_config={})
    msg = Message(
        content=RecordDict({"arrays": pack(initial_state(CFG)), "config": ConfigRecord({"server-round": 3})}),
        dst_node_id=1,
        message_type="train",
    )
    return app(msg, ctx), site.audit_path


def test_a_failed_round_is_recorded_and_sealed_without_the_exception_text(tmp_path: Path) -> None:
    reply, audit = _call(_app({}, raise_exc=RuntimeError("failed on /pacs/DOE^JOHN/1.dcm")), tmp_path)
    assert reply.has_error() and reply.error.code == SITE_FAILED
    records = read_records(audit)
    failed = [r for r in records if r["kind"] == "round_failed"]
    assert len(failed) == 1 and (failed[0]["run_id"], failed[0]["server_round"]) == ("7", 3)
    assert failed[0]["reason"] == reply.error.reason and "RuntimeError" in failed[0]["reason"]
    assert records[-1]["kind"] == "seal" and records[-1]["reason"] == "end of run"
    assert verify_trail(audit).ok
    for path in audit.iterdir():
        assert b"DOE" not in path.read_bytes() and b"/pacs/" not in path.read_bytes()


def test_a_blocked_reply_is_recorded_and_sealed(tmp_path: Path) -> None:
    reply, audit = _call(_app({"num-examples": 3, "patient-age": 61.0}), tmp_path)
    assert reply.has_error() and reply.error.code == EGRESS_BLOCKED
    records = read_records(audit)
    blocked = [r for r in records if r["kind"] == "egress_blocked"]
    assert len(blocked) == 1 and "patient-age" in blocked[0]["reason"]
    assert not [r for r in records if r["kind"] == "egress"]  # nothing recorded as sent
    assert records[-1]["kind"] == "seal" and verify_trail(audit).ok
