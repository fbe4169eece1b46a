"""The audit trail anchored off-site: each reply carries the trail's head, the coordinator keeps it, and
`medfed audit verify --anchors` catches a trail rewritten and re-sealed with the site's own key."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from typer.testing import CliRunner

from anonymization.audit import AuditTrail, read_records
from anonymization.audit.anchors import ANCHORS_FILE, anchor_fields
from anonymization.audit.keys import SIGNING_KEY_NAME, AuditSigner, load_signing_key
from coordinator.federation import initial_state
from coordinator.history import RunHistory
from coordinator.receipts import Receipts, read_jsonl
from coordinator.strategy import build_strategy
from medfed.cli.audit import audit_app
from medfed.settings import RunConfig, SiteConfig
from medfed.wire import pack
from site_client.client_app import build_app, make_egress_guard
from site_client.egress import EgressViolation, check_reply, check_secagg_reply
from site_client.trail import audit_for
from tests.audit_factory import reseal_without
from tests.grid_factory import Sites

runner = CliRunner()
CFG = RunConfig().with_overrides(image_size=32, batch_size=8, lr=0.05, optimizer="sgd", local_epochs=1,
                                  noise_multiplier=1.0, calibrate_noise=False, num_server_rounds=3)
NODE = 7  # the site's SuperNode id, as the coordinator sees it
RUN = "42"  # Flower's run id: what both sides key the run on without a run-name


# Messages are built here as the coordinator would, outside Flower's runtime (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("task_identity")


def _site(root: Path, data_dir: Path | None = None, name: str = "hospital-t") -> SiteConfig:
    return SiteConfig(name=name, data_dir=data_dir or root / "data", state_dir=root / "state",
                      audit_dir=root / "audit", epsilon_cap=50.0, delta=1e-3)


def _context(site: SiteConfig, root: Path) -> Context:
    toml = root / "site.toml"
    toml.write_text(site.to_toml())
    return Context(run_id=int(RUN), node_id=NODE, node_config={"site-config": str(toml)}, state=RecordDict(),
                   run_config={})


def _msg(message_type: str, server_round: int) -> Message:
    content = RecordDict({"arrays": pack(initial_state(CFG)), "config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, dst_node_id=NODE, message_type=message_type)


def _quick_app(smuggle: dict[str, Any] | None = None, secagg_reply: RecordDict | None = None) -> ClientApp:
    """The site's egress guard around handlers that answer at once (no training), as build_app wires it."""
    app = ClientApp(mods=[make_egress_guard(CFG)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if secagg_reply is not None:
            return Message(content=secagg_reply, reply_to=msg)
        content = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 3})})
        if smuggle is not None:
            content["audit"] = ConfigRecord(smuggle)
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 3, "auc": 0.5})}), reply_to=msg)

    return app


def _coordinator(out: Path) -> Any:
    """The coordinator's strategy writing receipts to ``out``, as run_federation wires it, for the one site."""
    cfg = CFG.with_overrides(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
    return build_strategy(cfg, RunHistory(), receipts=Receipts(out, run=RUN))


def _exchange(app: ClientApp, strategy: Any, ctx: Context, phase: str, server_round: int) -> Message:
    """One message to the site and its reply through the coordinator's strategy (which keeps receipts)."""
    configure = strategy.configure_train if phase == "train" else strategy.configure_evaluate
    (sent,) = configure(server_round, pack(initial_state(CFG)), ConfigRecord(), Sites(NODE))
    reply = app(sent, ctx)
    assert not reply.has_error(), reply.error.reason
    aggregate = strategy.aggregate_train if phase == "train" else strategy.aggregate_evaluate
    aggregate(server_round, [reply])
    return reply


def _verify(directory: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(audit_app, ["verify", str(directory), *args])
    return result.exit_code, result.output


@dataclass
class Anchored:
    site: SiteConfig
    trail: Path
    out: Path  # the coordinator's run folder (receipts)
    pub: Path
    signer: AuditSigner

    def anchors(self) -> list[dict[str, Any]]:
        return read_jsonl(self.out / ANCHORS_FILE)


@pytest.fixture
def anchored(tmp_path: Path) -> Anchored:
    """Four rounds of train and evaluate replies through the site's guard, with de-identification writing
    to the same trail between rounds; the coordinator's receipts of them."""
    site = _site(tmp_path)
    (tmp_path / "data").mkdir()
    ctx = _context(site, tmp_path)
    app, strategy = _quick_app(), _coordinator(tmp_path / "run")
    for rnd in range(1, 5):
        with audit_for(site) as trail:  # another writer (e.g. `medfed deid run`) between rounds
            for i in range(3):
                trail.append("deidentified", input_digest=f"{rnd * 10 + i:064x}", sop_uid=f"2.25.{rnd}{i}")
        _exchange(app, strategy, ctx, "train", rnd)
        _exchange(app, strategy, ctx, "evaluate", rnd)
    signer = load_signing_key(site.state_dir / SIGNING_KEY_NAME)
    pub = tmp_path / "site-audit.pub"
    pub.write_bytes(signer.public_pem())
    return Anchored(site, site.audit_path, tmp_path / "run", pub, signer)


def _seq_of(trail: Path, kind: str, server_round: int) -> int:
    return next(r["seq"] for r in read_records(trail) if r["kind"] == kind and r.get("server_round") == server_round)


# ---- the reply carries the anchor, the coordinator keeps it ----------------------------------------------
def test_reply_carries_the_trail_head_and_the_receipts_keep_it(tmp_path: Path) -> None:
    """Real DP training through build_app: the anchor is the head before the reply's egress record."""
    from tests.models_factory import make_store

    store = tmp_path / "store"
    make_store(store, n_patients=16, images_per_patient=2, size=64, seed=1)
    site = _site(tmp_path, data_dir=store)
    ctx = _context(site, tmp_path)
    strategy = _coordinator(tmp_path / "run")
    app = build_app(CFG)
    train = _exchange(app, strategy, ctx, "train", 1)
    evaluate = _exchange(app, strategy, ctx, "evaluate", 1)

    records = read_records(site.audit_path)
    egress = [r for r in records if r["kind"] == "egress"]
    assert len(egress) == 2
    for reply, record in zip((train, evaluate), egress, strict=True):
        anchor = dict(reply.content["audit"])
        assert anchor == {"site": "hospital-t", "seq": anchor["seq"], "head": anchor["head"]}
        # the head is the record just before the egress record, which keeps the anchor it sent
        assert (record["seq"], record["prev"]) == (anchor["seq"] + 1, anchor["head"])
        assert record["anchor"] == anchor
    assert any(r["kind"] == "round_trained" and r["seq"] < egress[0]["seq"] for r in records)

    kept = read_jsonl(tmp_path / "run" / ANCHORS_FILE)
    assert kept == [
        {"site": "hospital-t", "run": RUN, "round": 1, "phase": phase, "node": NODE, **dict(reply.content["audit"])}
        for phase, reply in (("train", train), ("evaluate", evaluate))
    ]
    received = read_jsonl(tmp_path / "run" / "received.jsonl")
    assert received[0]["records"]["audit"] == {"type": "config", "keys": ["head", "seq", "site"], "bytes": 0}

    code, out = _verify(site.audit_path, "--anchors", str(tmp_path / "run"))
    assert code == 0 and "2 anchor(s) of site hospital-t" in out, out


# ---- the attack: delete, re-chain, re-seal with the site's own key ----------------------------------------
def test_untouched_trail_passes_with_anchors(anchored: Anchored) -> None:
    assert len(anchored.anchors()) == 8
    code, out = _verify(anchored.trail, "--public-key", str(anchored.pub), "--anchors", str(anchored.out))
    assert code == 0, out
    assert out.startswith("OK:") and "8 anchor(s) of site hospital-t from the coordinator's receipts match" in out
    assert "round 4 evaluate reply" in out


def test_record_deleted_and_resealed_with_the_sites_key_is_caught_by_the_anchors(anchored: Anchored) -> None:
    """Someone with the site account hides round 2's egress record: the trail alone still verifies."""
    victim = _seq_of(anchored.trail, "egress", 2)
    reseal_without(anchored.trail, anchored.signer, {victim})
    assert _seq_of(anchored.trail, "egress", 2) != victim  # gone: round 2's evaluate egress moved up
    code, out = _verify(anchored.trail, "--public-key", str(anchored.pub))
    assert code == 0 and out.startswith("OK:"), out  # the seals alone cannot tell

    code, out = _verify(anchored.trail, "--public-key", str(anchored.pub), "--anchors", str(anchored.out))
    assert code == 1 and out.startswith("BROKEN:"), out
    # the first anchor after the deleted record: round 2's evaluate reply
    first = next(a for a in anchored.anchors() if a["seq"] > victim)
    assert (first["round"], first["phase"]) == (2, "evaluate")
    assert f"anchor of the site hospital-t, run {RUN}, round 2 evaluate reply (record #{first['seq']})" in out
    assert f"record #{first['seq']} of the trail hashes to" in out and "re-sealed" in out
    assert f"{ANCHORS_FILE} line 4" in out


def test_rewritten_trail_with_an_unsealed_end_is_broken_not_incomplete(anchored: Anchored) -> None:
    """A rewrite hidden behind a run still going (exit 3 alone) is tampering once the anchors are checked."""
    from tests.audit_factory import forge_append

    reseal_without(anchored.trail, anchored.signer, {_seq_of(anchored.trail, "egress", 1)})
    forge_append(anchored.trail, [{"kind": "deidentified", "input_digest": "cd" * 32}])
    assert _verify(anchored.trail, "--public-key", str(anchored.pub))[0] == 3
    code, out = _verify(anchored.trail, "--anchors", str(anchored.out))
    assert code == 1 and out.startswith("BROKEN:") and "round 1 evaluate reply" in out, out


def test_record_altered_and_resealed_is_caught(anchored: Anchored) -> None:
    """An edit that keeps every record in place: the hash of the anchored record changes."""
    from tests.audit_factory import lines_of, locate, write_lines

    seq = _seq_of(anchored.trail, "egress", 3)
    path, i = locate(anchored.trail, seq)
    lines = lines_of(path)
    lines[i] = lines[i].replace(b'"server_round":3', b'"server_round":30')
    write_lines(path, lines)
    reseal_without(anchored.trail, anchored.signer)  # nothing deleted: re-chain and re-seal only
    assert _verify(anchored.trail, "--public-key", str(anchored.pub))[0] == 0
    code, out = _verify(anchored.trail, "--anchors", str(anchored.out))
    assert code == 1 and "round 3 evaluate reply" in out, out


def test_trail_cut_back_to_an_earlier_run_and_resealed_is_caught(anchored: Anchored) -> None:
    """Cut back to the end of round 2 (a whole-run boundary): alone it verifies, the later anchors fail."""
    records = read_records(anchored.trail)
    round_3 = next(r["seq"] for r in records if r.get("sop_uid") == "2.25.30")  # its first record
    end = max(r["seq"] for r in records if r["kind"] == "seal" and r["reason"] == "end of run" and r["seq"] < round_3)
    reseal_without(anchored.trail, anchored.signer, upto=end)
    assert _verify(anchored.trail, "--public-key", str(anchored.pub))[0] == 0
    code, out = _verify(anchored.trail, "--anchors", str(anchored.out))
    assert code == 1 and "round 3 train reply" in out and f"it ends at #{end}" in out, out


def test_anchors_of_other_sites_are_ignored(anchored: Anchored, tmp_path: Path) -> None:
    """Another site's anchors in the same receipts are not this trail's; --site picks whose to check."""
    other = Receipts(tmp_path / "other-run", run="43")
    sent = Message(RecordDict(), dst_node_id=9, message_type="train")
    for seq in (1, 5, 9):
        anchor = anchor_fields("hospital-u", seq, hashlib.sha256(str(seq).encode()).hexdigest())
        other.received(1, "train", Message(RecordDict({"metrics": MetricRecord({"num-examples": 1}),
                                                       "audit": ConfigRecord(anchor)}), reply_to=sent), node=9)
    args = ["--anchors", str(anchored.out), "--anchors", str(tmp_path / "other-run" / ANCHORS_FILE)]
    code, out = _verify(anchored.trail, *args)
    assert code == 0 and "8 anchor(s) of site hospital-t" in out, out
    code, out = _verify(anchored.trail, *args, "--site", "hospital-u")
    assert code == 1 and "anchor of the site hospital-u, run 43, round 1 train reply (record #1)" in out
    code, out = _verify(anchored.trail, "--anchors", str(tmp_path / "other-run"))
    assert code == 1 and out.startswith("NOT ANCHORED:") and "no anchors of site hospital-t" in out
    assert "hospital-u" in out


def test_receipts_that_are_not_anchors_are_an_error(anchored: Anchored, tmp_path: Path) -> None:
    bad = tmp_path / "bad" / ANCHORS_FILE
    bad.parent.mkdir()
    bad.write_text(json.dumps({"site": "hospital-t", "seq": 3, "head": "XYZ"}) + "\n")
    code, out = _verify(anchored.trail, "--anchors", str(bad))
    assert code == 2 and f"{bad} line 1 is not an anchor receipt" in out and "64 lowercase hex" in out
    code, out = _verify(anchored.trail, "--anchors", str(tmp_path / "nowhere"))
    assert code == 2 and "does not exist" in out
    code, out = _verify(anchored.trail, "--site", "hospital-t")
    assert code == 2 and "--anchors" in out


# ---- the egress allow-list ----------------------------------------------------------------------------
GOOD = anchor_fields("hospital-t", 12, "ab" * 32)


@pytest.mark.parametrize(
    ("anchor", "why"),
    [
        ({**GOOD, "head": "ab" * 31}, "64 lowercase hex"),  # wrong length
        ({**GOOD, "head": "ab" * 33}, "64 lowercase hex"),
        ({**GOOD, "head": "zz" * 32}, "64 lowercase hex"),  # not hex
        ({**GOOD, "head": "AB" * 32}, "64 lowercase hex"),
        ({**GOOD, "head": "ab" * 32 + "\n"}, "64 lowercase hex"),
        ({**GOOD, "note": "DOE^JOHN"}, "differ from the allowed"),  # an extra key
        ({"site": "hospital-t", "head": "ab" * 32}, "differ from the allowed"),  # a key missing
        ({**GOOD, "seq": "12"}, "record number"),
        ({**GOOD, "seq": 0}, "record number"),
        ({**GOOD, "seq": True}, "record number"),
        ({**GOOD, "seq": 1.5}, "record number"),
        ({**GOOD, "site": "DOE JOHN 1957-03-02"}, "site name"),
        ({**GOOD, "site": "h" * 129}, "site name"),
        ({**GOOD, "site": "hospital-t\n"}, "site name"),
        ({**GOOD, "head": b"\xab" * 32}, "64 lowercase hex"),
    ],
)
def test_egress_blocks_a_malformed_anchor(anchor: dict[str, Any], why: str) -> None:
    reply = RecordDict({"metrics": MetricRecord({"num-examples": 1}), "audit": ConfigRecord(anchor)})
    with pytest.raises(EgressViolation, match=why):
        check_reply(reply, "evaluate", None)


def test_egress_wants_the_anchor_as_its_one_config_record() -> None:
    metrics = MetricRecord({"num-examples": 1})
    assert check_reply(RecordDict({"metrics": metrics, "audit": ConfigRecord(GOOD)}), "evaluate", None).anchor == GOOD
    with pytest.raises(EgressViolation, match="differ from the allowed"):
        check_reply(RecordDict({"metrics": metrics}), "evaluate", None)  # no anchor
    with pytest.raises(EgressViolation, match="must be a ConfigRecord"):
        check_reply(RecordDict({"metrics": metrics, "audit": MetricRecord({"seq": 12})}), "evaluate", None)
    with pytest.raises(EgressViolation, match="differ from the allowed"):
        check_reply(RecordDict({"metrics": metrics, "audit": ConfigRecord(GOOD), "audit2": ConfigRecord(GOOD)}),
                    "evaluate", None)


def test_guard_sends_its_own_anchor_not_the_handlers(tmp_path: Path) -> None:
    """A handler that fills the anchor record itself (a digest of a name) sends the trail's head instead."""
    site = _site(tmp_path)
    (tmp_path / "data").mkdir()
    smuggled = anchor_fields("hospital-t", 1, hashlib.sha256(b"DOE^JOHN").hexdigest())
    reply = _quick_app(smuggle=smuggled)(_msg("train", 1), _context(site, tmp_path))
    assert not reply.has_error(), reply.error.reason
    sent = dict(reply.content["audit"])
    assert sent["head"] != smuggled["head"]
    egress = next(r for r in read_records(site.audit_path) if r["kind"] == "egress")
    assert egress["anchor"] == sent and egress["prev"] == sent["head"]


def test_secagg_replies_carry_no_anchor(tmp_path: Path) -> None:
    """SecAgg+ replies keep exactly their protocol's records: the guard adds none, the check refuses one."""
    site = _site(tmp_path)
    (tmp_path / "data").mkdir()
    setup = RecordDict({"secaggplus_configs": ConfigRecord({"pk1": b"\x01" * 65, "pk2": b"\x02" * 65})})
    reply = _quick_app(secagg_reply=setup)(_msg("train", 1), _context(site, tmp_path))
    assert not reply.has_error(), reply.error.reason
    assert list(reply.content.keys()) == ["secaggplus_configs"]
    egress = [r for r in AuditTrail(site.audit_path).records() if r["kind"].startswith("egress")]
    assert len(egress) == 1 and "anchor" not in egress[0]
    setup["audit"] = ConfigRecord(GOOD)
    with pytest.raises(EgressViolation, match="may not leave with SecAgg"):
        check_secagg_reply(setup, "train", None)


def test_coordinator_keeps_no_malformed_anchor(tmp_path: Path) -> None:
    """What arrives may be hostile: an anchor that is not one is logged, never written as a receipt."""
    receipts = Receipts(tmp_path, run=RUN)
    sent = Message(RecordDict(), dst_node_id=NODE, message_type="evaluate")
    for anchor in ({**GOOD, "head": "not a hash"}, {**GOOD, "extra": 1}):
        msg = Message(RecordDict({"metrics": MetricRecord({"num-examples": 1}), "audit": ConfigRecord(anchor)}),
                      reply_to=sent)
        receipts.received(1, "evaluate", msg, node=NODE)
    receipts.received(1, "evaluate", Message(RecordDict({"metrics": MetricRecord({"num-examples": 1}),
                                                         "audit": ConfigRecord(GOOD)}), reply_to=sent), node=NODE)
    assert read_jsonl(tmp_path / ANCHORS_FILE) == [{"site": "hospital-t", "run": RUN, "round": 1,
                                                    "phase": "evaluate", "node": NODE, **GOOD}]
    assert len(read_jsonl(tmp_path / "received.jsonl")) == 3
