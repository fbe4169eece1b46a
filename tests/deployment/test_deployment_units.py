"""Deployment pieces without processes: re-release on resume, the SecAgg+ egress allow-list, receipts."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from medfed.settings import RunConfig, SiteConfig
from site_client.egress import EgressViolation, check_secagg_reply, is_secagg_reply
from site_client.replay import ReplayStore, arrays_digest, train_once
from site_client.task import TrainReply, ledger_for

# ---- re-release instead of re-spend --------------------------------------------------------------


class Crash(Exception):
    pass


def _site(tmp_path: Path) -> SiteConfig:
    return SiteConfig(name="s", data_dir=tmp_path / "deid", state_dir=tmp_path / "state", epsilon_cap=50.0)


def _fake_train(crash: str | None = None, calls: list[int] | None = None) -> Any:
    """Stands in for task.train_round: spends one round on the real ledger, around ``before_commit``."""

    def train(site: SiteConfig, cfg: RunConfig, run: str, server_round: int, state: dict, before_commit: Any) -> Any:
        if calls is not None:
            calls.append(server_round)
        update = {k: v + 0.5 for k, v in state.items()}
        before_commit(update)
        if crash == "before-commit":
            raise Crash("died before the spend was committed")
        ledger = ledger_for(site)
        acc = ledger.accountant(run)
        for _ in range(3):
            acc.step(noise_multiplier=1.0, sample_rate=0.5)
        ledger.commit_spend(run, server_round, acc, delta=site.delta, epsilon_cap=site.epsilon_cap, steps=3,
                            sample_rate=0.5, noise_multiplier=1.0)
        if crash == "after-commit":
            raise Crash("died after the spend was committed, before sending")
        return TrainReply(state_dict=update, metrics={"num-examples": 4, "epsilon": ledger.epsilon(run, site.delta)})

    return train


def _spent(site: SiteConfig, run: str) -> list[int]:
    return [r["server_round"] for r in ledger_for(site).rounds(run) if r["status"] == "spent"]


def test_repeated_request_resends_the_released_update_without_spending(tmp_path: Path) -> None:
    site, cfg = _site(tmp_path), RunConfig()
    state = {"w": torch.zeros(3)}
    calls: list[int] = []
    first = train_once(site, cfg, "run-x", 1, state, _fake_train(calls=calls))
    again = train_once(site, cfg, "run-x", 1, {"w": torch.zeros(3)}, _fake_train(calls=calls))
    assert calls == [1] and _spent(site, "run-x") == [1]
    assert torch.equal(again.state_dict["w"], first.state_dict["w"])
    # another global model for the same round is a new release: it is trained and paid for
    train_once(site, cfg, "run-x", 1, {"w": torch.ones(3)}, _fake_train(calls=calls))
    assert calls == [1, 1] and _spent(site, "run-x") == [1, 1]


def test_crash_before_the_commit_trains_again_and_pays_once(tmp_path: Path) -> None:
    site, cfg, state = _site(tmp_path), RunConfig(), {"w": torch.zeros(3)}
    with pytest.raises(Crash):
        train_once(site, cfg, "r", 2, state, _fake_train("before-commit"))
    assert _spent(site, "r") == []
    calls: list[int] = []
    train_once(site, cfg, "r", 2, state, _fake_train(calls=calls))
    assert calls == [2] and _spent(site, "r") == [2]


def test_crash_after_the_commit_sends_the_paid_update_without_paying_again(tmp_path: Path) -> None:
    site, cfg, state = _site(tmp_path), RunConfig(), {"w": torch.zeros(3)}
    with pytest.raises(Crash):
        train_once(site, cfg, "r", 1, state, _fake_train("after-commit"))
    assert _spent(site, "r") == [1]
    calls: list[int] = []
    reply = train_once(site, cfg, "r", 1, state, _fake_train(calls=calls))
    assert calls == [] and _spent(site, "r") == [1]  # not lost, not counted twice
    assert torch.equal(reply.state_dict["w"], torch.full((3,), 0.5))
    assert reply.metrics["epsilon"] == pytest.approx(ledger_for(site).epsilon("r", site.delta))


def test_old_rounds_are_pruned_and_digest_covers_names_and_dtypes(tmp_path: Path) -> None:
    site, cfg = _site(tmp_path), RunConfig()
    for r in range(1, 7):
        train_once(site, cfg, "r", r, {"w": torch.full((2,), float(r))}, _fake_train())
    assert [e["round"] for e in ReplayStore(site.state_dir).released("r")] == [4, 5, 6]
    a = arrays_digest({"w": torch.zeros(2)})
    assert a != arrays_digest({"v": torch.zeros(2)}) and a != arrays_digest({"w": torch.zeros(2, dtype=torch.float64)})


# ---- the SecAgg+ egress allow-list ----------------------------------------------------------------


def _blob(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


MODEL = ArrayRecord(
    {"conv.weight": Array(np.zeros((2, 3), dtype=np.float32)), "head.bias": Array(np.zeros(1, np.float32))}
)


def _masked(arrays: list[np.ndarray] | None = None, metrics: dict[str, Any] | None = None) -> RecordDict:
    arrays = arrays if arrays is not None else [np.array([7]), np.ones((2, 3), np.int64), np.ones(1, np.int64)]
    return RecordDict({
        "fitres.parameters": ArrayRecord({"0": Array(data=b"", dtype="", stype="", shape=())}),
        "fitres.num_examples": MetricRecord({"num_examples": 4}),
        "fitres.metrics": ConfigRecord(metrics if metrics is not None else {"epsilon": 1.5, "num-examples": 4}),
        "fitres.status": ConfigRecord({"code": 0, "message": ""}),
        "secaggplus_configs": ConfigRecord({"masked_params": [_blob(a) for a in arrays]}),
    })


def test_each_secagg_stage_passes_with_exactly_its_records() -> None:
    setup = RecordDict({"secaggplus_configs": ConfigRecord({"pk1": b"k" * 200, "pk2": b"k" * 200})})
    share = RecordDict({"secaggplus_configs": ConfigRecord({"dsts": [2, 3], "ctxts": [b"c" * 500, b"c" * 500]})})
    unmask = RecordDict({"secaggplus_configs": ConfigRecord({"nids": [1, 2], "shares": [b"s" * 100, b"s" * 100]})})
    for content, stage in ((setup, "setup"), (share, "share_keys"), (unmask, "unmask")):
        assert is_secagg_reply(content)
        report = check_secagg_reply(content, "train", None)
        assert report.message_type == f"train:secagg:{stage}" and report.bytes > 0 and report.arrays == []
    report = check_secagg_reply(_masked(), "train", MODEL)
    assert [a["name"] for a in report.arrays] == ["(weight)", "conv.weight", "head.bias"]
    assert all(a["masked"] for a in report.arrays) and report.metrics == ["epsilon", "num-examples"]


@pytest.mark.parametrize("content, match", [
    (RecordDict({"secaggplus_configs": ConfigRecord({"pk1": b"k", "pk2": b"k", "extra": b"x"})}), "no protocol stage"),
    (RecordDict({"secaggplus_configs": ConfigRecord({"pk1": b"k", "pk2": b"k"}),
                 "smuggled": ConfigRecord({"x": b"y"})}), "may not leave"),
    (RecordDict({"secaggplus_configs": ConfigRecord({"nids": [1], "shares": [b"s" * 5000]})}), "over"),
    (RecordDict({"secaggplus_configs": ConfigRecord({"dsts": [1, 2], "ctxts": [b"c"]})}), "differ in length"),
    (_masked(arrays=[np.array([7]), np.ones((2, 3), np.int64)]), "model needs 3"),
    (_masked(arrays=[np.array([7]), np.ones((2, 3), np.float32), np.ones(1, np.int64)]), "not an integer array"),
    (_masked(arrays=[np.array([7]), np.ones((3, 2), np.int64), np.ones(1, np.int64)]), "shape"),
    (_masked(metrics={"patient-age": 71}), "not on the train allow-list"),
    (_masked(metrics={"epsilon": "high"}), "single finite number"),
])
def test_anything_else_in_a_secagg_reply_is_blocked(content: RecordDict, match: str) -> None:
    with pytest.raises(EgressViolation, match=match):
        check_secagg_reply(content, "train", MODEL)


def test_unmasked_arrays_never_leave_with_secagg() -> None:
    content = _masked()
    content["fitres.parameters"] = ArrayRecord({"0": Array(np.ones(3, np.float32))})
    with pytest.raises(EgressViolation, match="unmasked"):
        check_secagg_reply(content, "train", MODEL)
    with pytest.raises(EgressViolation, match="only answer a train"):
        check_secagg_reply(_masked(), "evaluate", MODEL)


# ---- receipts: which site a reply is about ---------------------------------------------------------


def _msg(src: int, dst: int, mid: str, reply_to: str, error: bool = False) -> Any:
    from flwr.app import Error, Message, Metadata

    md = Metadata(run_id=1, message_id=mid, src_node_id=src, dst_node_id=dst, reply_to_message_id=reply_to,
                  group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    if error:
        return Message(error=Error(code=1, reason="Node Unavailable"), metadata=md)
    return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 1})}), metadata=md)


def test_a_superlink_generated_error_is_attributed_to_the_site_it_stands_for() -> None:
    from coordinator.strategy import reply_sites

    sent = [_msg(1, 11, "m11", ""), _msg(1, 22, "m22", ""), _msg(1, 33, "m33", "")]
    replies = [_msg(11, 1, "r1", "m11"), _msg(1, 1, "r2", "m33", error=True), _msg(22, 1, "r3", "m22")]
    assert reply_sites(sent, replies) == [11, 33, 22]
    # without a matching id it is one of the sites that did not answer
    replies[1] = _msg(1, 1, "r2", "unknown", error=True)
    assert reply_sites(sent, replies) == [11, 33, 22]


def test_a_resumed_run_tells_the_sites_its_global_round() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from coordinator.history import RunHistory
    from coordinator.strategy import build_strategy

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1

    class Grid:
        def get_node_ids(self) -> list[int]:
            return [5, 6]

    # resumed after round 3: the strategy's round 1 is the run's round 4
    strategy = build_strategy(RunConfig(), RunHistory(), round_offset=3)
    arrays = ArrayRecord([np.zeros(2, np.float32)])
    train = list(strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), Grid()))
    evaluate = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), Grid()))
    assert [m.content["config"]["server-round"] for m in train + evaluate] == [4, 4, 4, 4]


def test_medfed_run_refuses_an_app_that_would_ship_a_site_or_consortium_folder(tmp_path: Path) -> None:
    import shutil

    from coordinator.launch import check_app_contents
    from coordinator.superlink import CoordinatorError

    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "pyproject.toml", app / "pyproject.toml")
    for pkg in ("medfed", "anonymization", "models", "site_client", "coordinator"):
        (app / pkg).mkdir()
        (app / pkg / "__init__.py").write_text("")
    (app / "anonymization" / "audit").mkdir()
    for module in ("__init__.py", "trail.py", "verify.py"):
        (app / "anonymization" / "audit" / module).write_text("")
    check_app_contents(app)  # code only, the audit package's included: fine
    (app / "deploy" / "sites" / "a").mkdir(parents=True)
    (app / "deploy" / "sites" / "a" / "site.toml").write_text('name = "a"\n')
    check_app_contents(app)  # outside the packages fab-include ships: never in the FAB
    demo = app / "coordinator" / "demo-data" / "sites" / "a"
    (demo / "deid" / "audit").mkdir(parents=True)
    (demo / "site.toml").write_text('name = "a"\n')
    (demo / "deid" / "audit" / "audit-0001.jsonl").write_text("{}\n")
    with pytest.raises(CoordinatorError, match="site.toml"):
        check_app_contents(app)
    (demo / "site.toml").unlink()
    (demo / "deid" / "audit" / "audit-0001.jsonl").unlink()
    for trail in (demo / "deid" / "audit", app / "anonymization" / "audit"):  # a trail's meta, even beside our code
        (trail / "trail.json").write_text("{}\n")
        with pytest.raises(CoordinatorError, match="audit/trail.json"):
            check_app_contents(app)
        (trail / "trail.json").unlink()
    check_app_contents(app)


# ---- the SuperNode presents the site's TLS client certificate ---------------------------------------


@pytest.mark.adversarial
def test_the_supernodes_fleet_client_presents_the_site_certificate(tmp_path: Path, monkeypatch: Any) -> None:
    """A TLS server that demands a client certificate from the consortium CA, as nginx does on the public port."""
    import socket
    import ssl
    import threading

    import httpx
    from flwr.supernode import fleet_http_connection

    from coordinator.provision import Layout, init_consortium
    from site_client import supernode
    from site_client.kit import generate_site_key

    cons = tmp_path / "c"
    site = generate_site_key(tmp_path / "site")
    init_consortium(cons, "n", ["localhost"], [("a", site.public)])
    tls = Layout(cons).tls
    cert, key = cons / "kits" / "a" / "auth" / "tls.pem", tmp_path / "site" / "auth" / "tls.key"
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls / "ca.pem"))
    server_ctx.load_cert_chain(str(tls / "server.pem"), str(tls / "server.key"))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[str] = []

    def serve() -> None:
        for _ in range(2):
            conn, _addr = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tconn:
                    peer = tconn.getpeercert()
                    seen.append(dict(x[0] for x in peer["subject"])["commonName"])
                    data = b""
                    while b"\r\n\r\n" not in data:  # read the whole request: unread bytes would reset the reply
                        data += tconn.recv(65536)
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = int(next((ln.split(b":")[1] for ln in head.lower().split(b"\r\n")
                                       if ln.startswith(b"content-length:")), b"0"))
                    while len(body) < length:
                        body += tconn.recv(65536)
                    tconn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/protobuf\r\ncontent-length: 0\r\n"
                                  b"connection: close\r\n\r\n")
            except (ssl.SSLError, OSError):
                seen.append("refused")

    threading.Thread(target=serve, daemon=True).start()
    from flwr.proto.run_pb2 import GetRunRequest as Req

    def get_run() -> None:
        with fleet_http_connection.FleetHttpClient.from_server_address(
                f"localhost:{port}", False, str(tls / "ca.pem"), []) as client:
            client.GetRun(Req(run_id=1))

    with pytest.raises(httpx.TransportError, match="CERTIFICATE_REQUIRED"):  # Flower's client as it is: refused
        get_run()
    monkeypatch.setattr(fleet_http_connection, "FleetHttpClient", fleet_http_connection.FleetHttpClient)
    supernode.present_client_certificate(str(cert), str(key))
    get_run()  # patched: the handshake presents the site certificate
    listener.close()
    assert seen == ["refused", "a"]


def test_the_supernode_tries_a_lost_coordinator_again_within_seconds(monkeypatch: Any) -> None:
    """Flower waits up to 20 s between attempts; a site must be back soon after its coordinator restarts."""
    import itertools

    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supernode import fleet_http_connection

    from site_client import supernode

    flowers = make_simple_http_retry_invoker()
    assert max(itertools.islice(flowers.wait_gen_factory(), 8)) == 20  # what it would be left alone
    monkeypatch.setattr(fleet_http_connection, "make_simple_http_retry_invoker", make_simple_http_retry_invoker)
    supernode.cap_reconnect_wait()
    ours = fleet_http_connection.make_simple_http_retry_invoker()
    assert list(itertools.islice(ours.wait_gen_factory(), 6)) == [1, 2, 4, 4, 4, 4]
    # everything else is Flower's: what it retries, when it gives up, how it waits
    assert ours.recoverable_exceptions == flowers.recoverable_exceptions and ours.max_time is None
    assert ours.should_giveup is not None and ours.jitter is flowers.jitter


def test_the_site_executor_finds_its_restarted_supernode_within_seconds(tmp_path: Path) -> None:
    """`medfed site start` restarts a SuperNode the coordinator refused; the executor beside it retries its
    loopback Runtime API with the same capped waits, not Flower's growing 20 s."""
    import itertools

    from coordinator.provision import Layout, init_consortium
    from site_client.executor import Runtime
    from site_client.kit import generate_site_key

    cons = tmp_path / "c"
    init_consortium(cons, "n", ["localhost"], [("a", generate_site_key(tmp_path / "site").public)])
    client = Runtime("127.0.0.1:9", Layout(cons).tls / "ca.pem").client()
    try:
        invoker = client._retry_invoker  # Flower's ProtobufClient keeps the invoker it retries every call with
        assert list(itertools.islice(invoker.wait_gen_factory(), 6)) == [1, 2, 4, 4, 4, 4]
    finally:
        client.close()


def test_the_supernode_heartbeats_so_a_crashed_site_rejoins_within_20_seconds(monkeypatch: Any) -> None:
    """The coordinator refuses a restarted site until its old session misses two heartbeats: 60 s with
    Flower's interval. Ours is announced and kept at 10 s, the least Flower's SuperLink accepts."""
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_MIN_INTERVAL, HEARTBEAT_PATIENCE
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    from site_client import supernode

    assert HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL == 60  # what it would be left alone
    for module in (heartbeat, fleet_http_connection):
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", HEARTBEAT_DEFAULT_INTERVAL)
    supernode.shorten_heartbeat()
    # the interval the SuperNode announces on activation and with each beat, and the one its sender keeps
    assert fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL == heartbeat.HEARTBEAT_DEFAULT_INTERVAL == 10
    assert HEARTBEAT_MIN_INTERVAL <= supernode.HEARTBEAT_SECONDS  # the SuperLink refuses a shorter one
    assert HEARTBEAT_PATIENCE * supernode.HEARTBEAT_SECONDS == 20
