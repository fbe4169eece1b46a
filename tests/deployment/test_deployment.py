"""The deployment, for real: `flower-superlink` and three `flower-supernode`s on loopback.

Everything goes through the medfed commands an operator and site IT use
(`medfed site keygen` at each site, `medfed consortium init --site` /
`add-site` with the public keys, `medfed coordinator start`, `medfed site
start`, `medfed run`), with TLS from the consortium CA (its key
passphrase-encrypted) and SuperNode authentication.
Every process is started in its own session and stopped by its process id
(its process group); every wait is bounded; ports are chosen at run time.
One consortium and one set of synthetic sites are shared by the module.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from anonymization.audit import read_records
from coordinator.federation import initial_state
from coordinator.provision import CertificateAuthority, Layout
from coordinator.receipts import arrays_digest, read_jsonl
from coordinator.superlink import FLOWER_DETACHED, CoordinatorPaths, internal_port, list_nodes
from medfed import hardening
from medfed.demo import prepare_sites
from medfed.processes import processes_in
from medfed.settings import RunConfig, SiteConfig
from medfed.wire import MODEL_ARRAY, pack
from models.dataset import ManifestDataset
from site_client.egress import EVALUATE_METRICS, TRAIN_METRICS
from site_client.kit import generate_site_key
from site_client.ledger import PrivacyLedger
from site_client.supernode import FATAL_EXIT

pytestmark = [pytest.mark.deployment, pytest.mark.timeout(1500)]

MEDFED = str(Path(sys.executable).parent / "medfed")
SITES = ("hospital-a", "hospital-b", "hospital-c")
REVOKED = "hospital-r"
#: hospital-r is enrolled but connects only for the refusal tests: a run waits a little for it, not 120 s.
WAIT_BRIEFLY = ("--wait-for-sites", "5")
#: Small and fast: 32x32 images, batches of 8.
BASE_CONFIG = ("image-size=32 batch-size=8 min-available-nodes=3 min-train-nodes=3 min-evaluate-nodes=1 "
               "round-timeout=300.0")


DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "docker"


def entrypoint(dockerfile: str, paths: dict[str, Path]) -> list[str]:
    """The image's ENTRYPOINT as a plain process here: container paths mapped to ours, `medfed` to this venv's."""
    line = next(ln for ln in (DEPLOY / dockerfile).read_text().splitlines() if ln.startswith("ENTRYPOINT"))
    argv = json.loads(line.split(None, 1)[1])
    assert argv[0] == "medfed"
    return [MEDFED, *(str(paths.get(a, a)) for a in argv[1:])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float, what: str, poll: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class Proc:
    """A medfed command in its own session (so its Flower children go with it), logging to a file."""

    name: str
    cmd: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.log, "ab")  # noqa: SIM115 - the child holds it
        self.popen = subprocess.Popen(self.cmd, stdout=fh, stderr=subprocess.STDOUT, env=hardening.child_env(),
                                      start_new_session=True)
        fh.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)  # the group this process leads: it and the Flower processes it started

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(timeout=30)

    def stop(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=25)
        self.signal_group(signal.SIGKILL)  # whatever of the group is left
        if self.popen.poll() is None:
            self.popen.wait(timeout=30)

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout:.0f}s; log:\n{self.text()[-3000:]}"
            ) from None


@dataclass
class World:
    """A running consortium: coordinator + three sites."""

    root: Path
    cons: Path
    port: int
    data: dict[str, Path]
    coordinator: Proc | None = None
    sites: dict[str, Proc] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    passphrase: Path | None = None  # the CA key's passphrase file (add-site, revoke-site)
    outputs: dict[str, str] = field(default_factory=dict)  # what `medfed run` printed, by run name

    def kit(self, name: str) -> Path:
        """The site's own kit folder: its key made there, the operator's kit copied in."""
        return self.root / "sites" / name

    def start_coordinator(self) -> Proc:
        n = sum(1 for p in (self.root / "logs").glob("coordinator-*.log"))
        cmd = entrypoint("Dockerfile.coordinator", {"/consortium": self.cons})
        proc = Proc("coordinator", [*cmd, "--port", str(self.port), "--bind-host", "127.0.0.1"],
                    self.root / "logs" / f"coordinator-{n}.log").start()
        wait_for(lambda: "medfed coordinator ready" in proc.text() or not proc.alive(), 180, "the coordinator")
        assert proc.alive(), proc.text()[-3000:]
        self.coordinator = proc
        return proc

    def start_site(self, name: str, kit: Path | None = None, reconnect: float = 600.0, data: Path | None = None,
                   tag: str = "") -> Proc:
        port = self.ports.setdefault(name + tag, free_port())
        n = sum(1 for p in (self.root / "logs").glob(f"site-{name}{tag}-*.log"))
        cmd = entrypoint("Dockerfile.site-cpu", {"/kit": kit or self.kit(name), "/data": data or self.data[name]})
        proc = Proc(name + tag, [*cmd, "--superlink", f"localhost:{self.port}", "--clientapp-port", str(port),
                                 "--reconnect-seconds", f"{reconnect:g}"],
                    self.root / "logs" / f"site-{name}{tag}-{n}.log").start()
        if not tag:
            self.sites[name] = proc
        return proc

    def nodes(self) -> dict[str, str]:
        try:
            return {n["name"]: n["status"] for n in list_nodes(self.cons)}  # Control API: loopback, internal port
        except Exception:  # noqa: BLE001 - the SuperLink may be restarting
            return {}

    def wait_online(self, names: tuple[str, ...] = SITES, timeout: float = 240) -> None:
        wait_for(lambda: all(self.nodes().get(n) == "online" for n in names), timeout, f"sites {names} online")

    def node_ids(self) -> dict[str, int]:
        regs = json.loads((self.cons / "coordinator" / "state" / "registrations.json").read_text())
        return {k: int(v["node_id"]) for k, v in regs.items() if v["node_id"] is not None}

    def run(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        wait = () if "--wait-for-sites" in args else WAIT_BRIEFLY
        return subprocess.run([MEDFED, "run", str(self.cons), *args, *wait], capture_output=True, text=True,
                              timeout=timeout, env=hardening.child_env())

    def run_dir(self, name: str) -> Path:
        return self.cons / "coordinator" / "runs" / name

    def site_config(self, name: str) -> SiteConfig:
        return SiteConfig.from_toml(self.kit(name) / "site.toml")

    def stop_all(self) -> None:
        for proc in [*self.sites.values(), self.coordinator]:
            if proc is not None:
                proc.stop()


def _set_kit_template(kit: Path, **values: str) -> None:
    text = (kit / "kit.toml").read_text()
    for key, value in values.items():
        text = re.sub(rf"(?m)^{re.escape(key)} = .*$", f"{key} = {value}", text)
    (kit / "kit.toml").write_text(text)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("deployment")
    sites = prepare_sites(root / "data", sites=3, patients=24, seed=5, epsilon_caps=[1000.0] * 3, delta=1e-5,
                          progress=False)
    data = {s.name: s.data_dir for s in sites}
    data[REVOKED] = data["hospital-c"]  # a fourth site for the revocation test; its data is never trained on
    port = free_port()
    cons = root / "consortium"
    w = World(root=root, cons=cons, port=port, data=data)

    def medfed(*args: str | Path) -> str:
        res = subprocess.run([MEDFED, *map(str, args)], capture_output=True, text=True, timeout=120,
                             env=hardening.child_env())
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    # each site makes its key pair; only node.pub goes to the operator
    for name in [*SITES, REVOKED]:
        assert "fingerprint SHA256:" in medfed("site", "keygen", w.kit(name))
    passphrase = root / "ca-passphrase"
    passphrase.write_text("deployment test CA passphrase\n")
    medfed("consortium", "init", cons, "--name", "deploytest", "--coordinator-host", "localhost",
           *(a for n in SITES for a in ("--site", f"{n}={w.kit(n) / 'auth' / 'node.pub'}")),
           "--port", str(port), "--bind-host", "127.0.0.1", "--ca-passphrase-file", passphrase)
    medfed("consortium", "add-site", cons, REVOKED, "--public-key", w.kit(REVOKED) / "auth" / "node.pub",
           "--csr", w.kit(REVOKED) / "auth" / "tls.csr", "--ca-passphrase-file", passphrase)
    w.passphrase = passphrase
    for name in [*SITES, REVOKED]:  # the operator's kit back to the site, copied into its folder
        shutil.copytree(cons / "kits" / name, w.kit(name), dirs_exist_ok=True)
        _set_kit_template(w.kit(name), **{"epsilon-cap": "1000.0"})
    try:
        w.start_coordinator()
        for name in SITES:
            w.start_site(name)
        w.wait_online()
        yield w
    finally:
        w.stop_all()


def test_operator_holds_no_site_private_key_and_the_ca_key_is_encrypted(world: World) -> None:
    private = {p.relative_to(world.cons).as_posix() for p in world.cons.rglob("*")
               if p.is_file() and b"PRIVATE KEY" in p.read_bytes()}
    assert private == {"ca/ca.key", "coordinator/tls/server.key", "coordinator/release-signing.key"}
    assert b"ENCRYPTED PRIVATE KEY" in (world.cons / "ca" / "ca.key").read_bytes()
    for name in [*SITES, REVOKED]:
        assert (world.kit(name) / "auth" / "node.key").stat().st_mode & 0o077 == 0


def _model_keys() -> list[str]:
    return [MODEL_ARRAY]  # the model travels as one flat array (medfed.wire)


# ---- transport: TLS only ------------------------------------------------------------------------


def _listening_ports(pid: int) -> set[int]:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    ports = set()
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    ports.add(int(c.laddr.port))
        except psutil.NoSuchProcess:
            continue
    return ports


def _listening_addresses(pid: int) -> dict[int, set[str]]:
    import psutil

    root = psutil.Process(pid)
    out: dict[int, set[str]] = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.setdefault(int(c.laddr.port), set()).add(c.laddr.ip)
        except psutil.NoSuchProcess:
            continue
    return out


def _tls_ok(port: int, ca: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost"),
    ):
        return True


def _plaintext_http_answered(port: int) -> bool:
    """Whether a plain-HTTP request gets an HTTP answer (it must not: the port speaks TLS only)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        sock.settimeout(5)
        try:
            data = sock.recv(64)
        except (TimeoutError, ConnectionResetError):
            return False
    return data.startswith(b"HTTP/")


def _internal_port(world: World) -> int:
    return internal_port(world.cons)


def test_every_listening_port_speaks_tls_only(world: World) -> None:
    assert world.coordinator is not None
    coord_ports = _listening_ports(world.coordinator.pid)
    internal = _internal_port(world)
    # nginx on the public port, the SuperLink on its loopback-only port
    assert coord_ports == {world.port, internal}, f"the coordinator listens on {coord_ports}"
    assert _listening_addresses(world.coordinator.pid)[internal] == {"127.0.0.1"}
    assert _tls_ok(internal, world.cons / "coordinator" / "tls" / "ca.pem")
    assert not _plaintext_http_answered(internal)
    ca = world.cons / "coordinator" / "tls" / "ca.pem"
    assert _tls_ok(world.port, ca)
    assert not _plaintext_http_answered(world.port)
    # A client that trusts only the system CAs (no consortium CA) cannot connect.
    with (
        pytest.raises(ssl.SSLCertVerificationError),
        socket.create_connection(("127.0.0.1", world.port), timeout=5) as sock,
    ):
        ssl.create_default_context().wrap_socket(sock, server_hostname="localhost")
    for name, proc in world.sites.items():
        ports = _listening_ports(proc.pid)
        assert ports == {world.ports[name]}, f"{name} listens on {ports}"
        for port in ports:  # the SuperNode's loopback ClientApp API, with the site's own loopback CA
            assert _tls_ok(port, world.kit(name) / "runtime-tls" / "ca.pem")
            assert not _plaintext_http_answered(port)


# ---- the control plane: only the Fleet API, only to site certificates ---------------------------------


def _post(port: int, path: str, ca: Path, cert: tuple[Path, Path] | None = None, protobuf: bool = False) -> int | None:
    """POST ``path`` over TLS (CA-verified, with ``cert`` as client certificate); its HTTP status, or None when
    the TLS handshake or connection is refused. Without ``protobuf`` the SuperLink itself answers 415."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=15)
    try:
        conn.request("POST", path, body=b"", headers={"content-type": "application/protobuf"} if protobuf else {})
        return conn.getresponse().status
    except (ssl.SSLError, ConnectionError, OSError):
        return None
    finally:
        conn.close()


#: What nginx answers a client without a valid site certificate: a failed handshake, or 401 (400 unmapped).
REFUSED = (None, 400, 401)
#: What the SuperLink answers a request without a protobuf body: it got through nginx.
REACHED = 415
CONTROL = "/v1/control/list-nodes"  # what `flwr`'s Control client (and an attacker) call
RUNTIME = "/v1/runtime/get-nodes"
FLEET = "/v1/fleet/get-run"


def _site_cert(world: World, name: str) -> tuple[Path, Path]:
    return world.kit(name) / "auth" / "tls.pem", world.kit(name) / "auth" / "tls.key"


@pytest.mark.adversarial
def test_a_client_with_only_the_ca_certificate_reaches_no_api(world: World) -> None:
    ca = world.cons / "coordinator" / "tls" / "ca.pem"
    for path in (CONTROL, RUNTIME, FLEET, "/v1/fleet/register-node"):
        assert _post(world.port, path, ca) in REFUSED, path  # nginx: no client certificate, no upstream
    # the Control API is there, on the SuperLink's loopback port, where `medfed run` uses it
    assert _post(_internal_port(world), CONTROL, ca, protobuf=True) == 200
    # a certificate signed by another CA is refused just the same
    other = CertificateAuthority.create("some other consortium")
    key, cert = other.issue_server(["localhost"])
    from cryptography.hazmat.primitives import serialization

    from coordinator.provision import private_pem

    d = world.root / "foreign-cert"
    d.mkdir(exist_ok=True)
    (d / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "c.key").write_bytes(private_pem(key))
    assert _post(world.port, FLEET, ca, (d / "c.pem", d / "c.key")) in REFUSED


@pytest.mark.adversarial
def test_a_site_certificate_reaches_the_fleet_api_and_nothing_else(world: World) -> None:
    ca = world.cons / "coordinator" / "tls" / "ca.pem"
    cert = _site_cert(world, "hospital-a")
    for path in (CONTROL, "/v1/control/register-node", "/v1/control/unregister-node", RUNTIME, "/",
                 "/v1/fleet/../control/list-nodes", "/v1/fleet/..%2fcontrol/list-nodes",
                 "/v1/fleet/%2e%2e/control/list-nodes"):
        assert _post(world.port, path, ca, cert) == 403, path
    # the Fleet API answers (a request without a protobuf body is refused by the SuperLink itself)
    assert _post(world.port, FLEET, ca, cert) == REACHED
    world.wait_online()  # and the sites, which hold the same kind of certificate, are connected


# ---- a normal run ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_run(world: World) -> dict[str, Any]:
    res = world.run("--rounds", "2", "--run-name", "basic", "--run-config", BASE_CONFIG + " fraction-evaluate=0.34")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    world.outputs["basic"] = res.stdout + res.stderr
    return json.loads((world.run_dir("basic") / "metrics.json").read_text())


def test_the_run_shows_its_progress_and_summary_and_keeps_flowers_log_in_a_file(
        world: World, basic_run: dict[str, Any]) -> None:
    text = world.outputs["basic"]
    assert "Starting logstream" not in text and "ROUND 1/2" not in text  # Flower's lines: in flower.log
    assert "Starting logstream" in (world.run_dir("basic") / "flower.log").read_text()
    assert "round 1/2 done" in text and "round 2/2 done" in text
    for name in SITES:  # per-site ε by site name, not node id
        assert any(ln.strip("│ ").startswith(name) for ln in text.splitlines()), name
    for label in ("model:", "metrics:", "plot:", "receipts:"):
        assert label in text
    assert len(text.splitlines()) < 40


def test_two_rounds_over_tls_with_auth_complete_and_change_the_model(world: World, basic_run: dict[str, Any]) -> None:
    assert [r["round"] for r in basic_run["rounds"]] == [1, 2]
    ids = world.node_ids()
    for r in basic_run["rounds"]:
        assert {int(n) for n, s in r["sites"].items() if s["status"] == "trained"} == {ids[s] for s in SITES}
    out = world.run_dir("basic")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-0001.pt", "round-0002.pt"]
    initial = initial_state(RunConfig().with_overrides(image_size=32, seed=0))
    final = torch.load(out / "model.pt", weights_only=True)
    assert final.keys() == initial.keys()
    assert any(not torch.equal(final[k], initial[k]) for k in final)
    # each site accounted the run under its run name, once per round
    for name in SITES:
        rows = PrivacyLedger(world.site_config(name).state_dir / "privacy-ledger.sqlite").rounds("basic")
        assert [r["server_round"] for r in rows if r["status"] == "spent"] == [1, 2]


def test_each_site_keeps_the_signed_release_the_run_sends_last(world: World, basic_run: dict[str, Any]) -> None:
    """The release travels to the SuperNodes in the run's last message; each site verifies it with its own
    kit's release key (never one the coordinator sends) and keeps it for `medfed predict`."""
    from models.release import public_key_of, verify_release

    out = world.run_dir("basic")
    signed = verify_release(out / "release", public_key_of(world.cons / "coordinator" / "release-signing.pub"))
    delivery = json.loads((out / "release-delivery.json").read_text())["nodes"]
    kept = {n["site"] for n in delivery.values() if n["outcome"] == "kept"}
    assert kept == set(SITES)
    for name in SITES:
        site = world.site_config(name)
        assert site.release_key == world.kit(name) / "release-signing.pub"
        (folder,) = (site.state_dir / "releases").iterdir()
        assert verify_release(folder, public_key_of(site.release_key)).weights_sha256 == signed.weights_sha256


def test_egress_only_model_arrays_and_allowed_scalars(world: World, basic_run: dict[str, Any]) -> None:
    keys = _model_keys()
    # what the sites recorded sending
    site_digests: set[str] = set()
    for name in SITES:
        recs = [r for r in read_records(world.site_config(name).audit_path) if r.get("run_id") == "basic"]
        assert not [r for r in recs if r["kind"] in ("egress_blocked", "egress_secagg")]
        egress = [r for r in recs if r["kind"] == "egress"]
        assert {r["message_type"] for r in egress} <= {"train", "evaluate", "query"} and egress
        for r in egress:
            if r["message_type"] == "query":  # the answer to the release sent last: kept or not, nothing else
                assert r["arrays"] == [] and r["metrics"] == ["release-kept"]
            elif r["message_type"] == "train":
                assert [a["name"] for a in r["arrays"]] == keys
                assert all(a["dtype"] == "float32" for a in r["arrays"])
                assert set(r["metrics"]) <= TRAIN_METRICS
                site_digests.add(r["digest"])
            else:
                assert r["arrays"] == [] and set(r["metrics"]) <= EVALUATE_METRICS
    # what the coordinator received
    received = read_jsonl(world.run_dir("basic") / "received.jsonl")
    assert {r["phase"] for r in received} == {"train", "evaluate"}
    coord_digests: set[str] = set()
    for r in received:
        assert "error" not in r, r
        recs = r["records"]
        # besides arrays and scalars, only the audit anchor: the site's trail head, nothing of its data
        assert recs["audit"]["type"] == "config" and set(recs["audit"]["keys"]) == {"site", "seq", "head"}
        if r["phase"] == "train":
            assert set(recs) == {"arrays", "metrics", "audit"}
            assert recs["arrays"]["type"] == "arrays" and [a["name"] for a in recs["arrays"]["arrays"]] == keys
            coord_digests.add(recs["arrays"]["digest"])
            assert set(recs["metrics"]["keys"]) <= TRAIN_METRICS and recs["metrics"]["scalar"]
        else:
            assert set(recs) == {"metrics", "audit"} and set(recs["metrics"]["keys"]) <= EVALUATE_METRICS
    assert len(coord_digests) == 6 and coord_digests == site_digests  # the same bytes, end to end


# ---- secure aggregation ----------------------------------------------------------------------------


def test_secagg_strategy_receives_only_the_aggregate(world: World) -> None:
    res = world.run("--rounds", "1", "--run-name", "secure", "--run-config", BASE_CONFIG + " secagg=true "
                    "fraction-evaluate=0.0")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    out = world.run_dir("secure")
    agg = read_jsonl(out / "aggregation.jsonl")
    assert len(agg) == 1 and agg[0]["secure"] is True and len(agg[0]["inputs"]) == 3
    inputs = {i["digest"] for i in agg[0]["inputs"]}
    assert len(inputs) == 1  # every input is the same secure aggregate ...
    updates, weights = [], []
    for name in SITES:
        (entry,) = [e for e in _released(world, name, "secure") if e["round"] == 1]
        state = torch.load(entry["path"], weights_only=True)
        assert arrays_digest(pack(state)) not in inputs  # ... and none is a site's own update
        updates.append(state)
        weights.append(1)  # site-weights=uniform, the default: a site's num-examples claim does not weigh it
    final = torch.load(out / "model.pt", weights_only=True)
    total = sum(weights)
    for k in final:  # the aggregate is the mean of the sites' updates (up to quantization)
        mean = sum(w * u[k].double() for w, u in zip(weights, updates, strict=True)) / total
        spread = max(float((u[k].double() - mean).abs().max()) for u in updates)
        err = float((final[k].double() - mean).abs().max())
        assert err < 5e-3 and (spread == 0 or err < spread), (k, err, spread)
    # the coordinator received key material and masked vectors only; the sites recorded each stage
    received = [r for r in read_jsonl(out / "received.jsonl") if r["phase"] == "train"]
    assert {r["stage"] for r in received} == {"setup", "share_keys", "collect_masked_vectors", "unmask"}
    for r in received:
        for rec in r["records"].values():
            assert rec["type"] != "arrays" or rec["bytes"] == 0, r
    for name in SITES:
        recs = [r for r in read_records(world.site_config(name).audit_path) if r.get("run_id") == "secure"]
        stages = {r["message_type"].rsplit(":", 1)[-1] for r in recs if r["kind"] == "egress_secagg"}
        assert stages == {"setup", "share_keys", "collect_masked_vectors", "unmask"}
        assert not [r for r in recs if r["kind"] == "egress" and r["message_type"] == "train"]


def _released(world: World, name: str, run: str) -> list[dict[str, Any]]:
    from site_client.replay import ReplayStore

    return ReplayStore(world.site_config(name).state_dir).released(run)


# ---- who may connect -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refusals(world: World) -> dict[str, Any]:
    root = world.root / "refusal-kits"
    # a key the coordinator never registered
    rogue = root / "rogue"
    shutil.copytree(world.kit("hospital-a"), rogue, ignore=shutil.ignore_patterns("state", "runtime-tls", "site.toml"))
    generate_site_key(rogue, force=True)  # its own, consistent key pair that no operator enrolled ...
    for f in ("tls.key", "tls.pem"):  # ... behind hospital-a's valid TLS client certificate: the node key still counts
        shutil.copy2(world.kit("hospital-a") / "auth" / f, rogue / "auth" / f)
    # a kit that trusts another CA than the consortium's
    noca = root / "noca"
    shutil.copytree(world.kit("hospital-a"), noca, ignore=shutil.ignore_patterns("state", "runtime-tls", "site.toml"))
    (noca / "ca.pem").write_bytes(CertificateAuthority.create("some other consortium").cert_pem)

    # a registered site that connects, is revoked while connected, and comes back
    revoked = world.start_site(REVOKED, reconnect=20.0)
    world.wait_online((REVOKED,))
    ca = world.cons / "coordinator" / "tls" / "ca.pem"
    cert_before = _post(world.port, FLEET, ca, _site_cert(world, REVOKED))
    res = subprocess.run([MEDFED, "consortium", "revoke-site", str(world.cons), REVOKED, "--ca-passphrase-file",
                          str(world.passphrase)], capture_output=True, text=True, timeout=120,
                         env=hardening.child_env())
    assert res.returncode == 0, res.stderr
    cert_after = _post(world.port, FLEET, ca, _site_cert(world, REVOKED))
    procs = {
        "rogue": world.start_site("hospital-a", kit=rogue, reconnect=10.0, tag="-rogue"),
        "noca": world.start_site("hospital-a", kit=noca, reconnect=10.0, tag="-noca"),
        "revoked": revoked,
    }
    codes = {k: p.wait(timeout=180) for k, p in procs.items()}
    assert world.coordinator is not None
    return {"codes": codes, "logs": {k: p.text() for k, p in procs.items()}, "nodes": world.nodes(),
            "cert_before": cert_before, "cert_after": cert_after,
            "superlink_log": (world.cons / "coordinator" / "state" / "superlink.log").read_text(errors="replace")}


def test_unregistered_key_is_refused(refusals: dict[str, Any]) -> None:
    assert refusals["codes"]["rogue"] != 0
    assert "Failed to activate SuperNode" in refusals["logs"]["rogue"]
    assert "No SuperNode found with the given public key" in refusals["superlink_log"]
    assert "SuperNode ID" not in refusals["logs"]["rogue"]  # it never got a node id


def test_revoked_key_is_refused(refusals: dict[str, Any]) -> None:
    assert refusals["codes"]["revoked"] != 0
    log = refusals["logs"]["revoked"]
    assert "SuperNode ID" in log  # it was connected before the revocation ...
    # ... and refused after it: nginx answers 401 (its certificate is on the CRL), the site says why once and stops
    # with the exit code systemd does not restart (RestartPreventExitStatus=), no restart is ever activated again
    assert log.count("SuperNode ID") == 1 and "refused this site (HTTP 401)" in log[log.find("SuperNode ID"):]
    assert refusals["codes"]["revoked"] == FATAL_EXIT
    assert refusals["nodes"].get(REVOKED) in (None, "unregistered")
    assert all(refusals["nodes"].get(s) == "online" for s in SITES)  # the others are unaffected


@pytest.mark.adversarial
def test_a_revoked_sites_certificate_is_refused_by_the_proxy(refusals: dict[str, Any]) -> None:
    assert refusals["cert_before"] == REACHED  # admitted to the Fleet API while enrolled ...
    assert refusals["cert_after"] in REFUSED  # ... refused at the TLS layer once on the CRL (nginx reloaded)


def test_client_without_the_ca_certificate_cannot_connect(refusals: dict[str, Any]) -> None:
    assert refusals["codes"]["noca"] != 0
    assert "CERTIFICATE_VERIFY_FAILED" in refusals["logs"]["noca"]
    assert "SuperNode ID" not in refusals["logs"]["noca"]


# ---- faults ----------------------------------------------------------------------------------------


def _count(text: str, needle: str) -> int:
    return text.count(needle)


def test_site_killed_mid_round_round_completes_and_site_rejoins(world: World) -> None:
    victim = "hospital-c"
    before = _count(world.sites[victim].text(), "Receiving: train message")
    run = Proc("run-sitekill", [MEDFED, "run", str(world.cons), "--rounds", "2", "--run-name", "sitekill",
                                *WAIT_BRIEFLY,
                                # the killed site's round-1 message may go unanswered: round 1 then ends at
                                # the round timeout, so keep it short (the others train in seconds); the
                                # restarted site is refused until its old session misses two heartbeats
                                # (20 s with the site's, 60 s with Flower's), and must be back for round 2
                                "--run-config", BASE_CONFIG.replace("min-train-nodes=3", "min-train-nodes=2")
                                .replace("round-timeout=300.0", "round-timeout=45.0")
                                + " fraction-evaluate=0.0"], world.root / "logs" / "run-sitekill.log").start()
    try:
        wait_for(lambda: _count(world.sites[victim].text(), "Receiving: train message") > before, 300,
                 f"{victim} to receive its round-1 training message")
        world.sites[victim].kill()  # SIGKILL, mid-round: no goodbye to the coordinator
        world.start_site(victim)  # site IT's service manager restarts it
        assert run.wait(timeout=900) == 0, run.text()[-4000:]
    finally:
        run.stop()
    metrics = json.loads((world.run_dir("sitekill") / "metrics.json").read_text())
    ids = world.node_ids()
    r1, r2 = metrics["rounds"]
    assert str(ids[victim]) in r1["sites"], (ids, r1["sites"])  # a silent site is named, not left out
    assert r1["sites"][str(ids[victim])]["status"] in ("no-reply", "failed"), r1["sites"][str(ids[victim])]
    assert all(r1["sites"][str(ids[s])]["status"] == "trained" for s in SITES if s != victim)
    assert r1["train"], "round 1 aggregated the surviving sites"
    assert all(r2["sites"][str(ids[s])]["status"] == "trained" for s in SITES)


def test_coordinator_killed_after_round_1_resumes_without_losing_or_double_counting_spend(world: World) -> None:
    out = world.run_dir("resumable")
    run = Proc("run-resumable", [MEDFED, "run", str(world.cons), "--rounds", "2", "--run-name", "resumable",
                                 *WAIT_BRIEFLY, "--run-config", BASE_CONFIG + " fraction-evaluate=0.0"],
               world.root / "logs" / "run-resumable.log").start()
    try:
        wait_for(lambda: (out / "checkpoints" / "round-0001.pt").exists(), 600, "the round-1 checkpoint")
        assert world.coordinator is not None
        state = CoordinatorPaths(Layout(world.cons)).state
        left = processes_in(state, FLOWER_DETACHED)  # in sessions of their own: the kill below misses them
        assert left, "the run's ServerApp and the SuperExec work in the coordinator's state folder"
        world.coordinator.kill()  # the coordinator dies: SuperLink and nginx at once
        assert "final_model" not in json.loads((out / "metrics.json").read_text())
    finally:
        run.stop()
    world.start_coordinator()  # same state database, same port
    assert not set(left) & set(processes_in(state, FLOWER_DETACHED))  # what the dead one left is stopped
    world.wait_online(timeout=300)  # the sites reconnect by themselves
    res = world.run("--resume", "--run-name", "resumable")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "resuming run resumable after round 1" in res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2] and metrics["final_model"] == "model.pt"
    assert (out / "checkpoints" / "round-0002.pt").exists()
    ids = world.node_ids()
    for name in SITES:
        site = world.site_config(name)
        ledger = PrivacyLedger(site.state_dir / "privacy-ledger.sqlite")
        spent = [r["server_round"] for r in ledger.rounds("resumable") if r["status"] == "spent"]
        assert spent == [1, 2], f"{name} spent for rounds {spent}: each round exactly once"
        # what the coordinator reported is what the ledger holds
        reported = metrics["rounds"][-1]["sites"][str(ids[name])]["train"]["epsilon"]
        assert np.isclose(reported, ledger.epsilon("resumable", site.delta))


# ---- the site is sovereign: approved code, its own bounds ---------------------------------------


def _site_records(name: str, world: World, kind: str) -> list[dict[str, Any]]:
    return [r for r in read_records(world.site_config(name).audit_path) if r.get("kind") == kind]


def _errors(world: World, run: str) -> dict[int, str]:
    return {int(r["node"]): r["error"]["reason"] for r in read_jsonl(world.run_dir(run) / "received.jsonl")
            if "error" in r}


@pytest.mark.adversarial
def test_a_changed_app_is_refused_before_any_of_its_code_runs(world: World, tmp_path: Path) -> None:
    from medfed.fab import build_fab, fab_sha256
    from tests.fab_factory import copy_app, plant_marker

    marker = tmp_path / "imported"
    app = copy_app(tmp_path / "app")
    plant_marker(app, marker)  # one line in site_client/client_app.py, run the moment it is imported
    digest = fab_sha256(build_fab(app))
    res = world.run("--rounds", "1", "--run-name", "unapproved", "--app", str(app), "--run-config", BASE_CONFIG,
                    timeout=600)
    errors = _errors(world, "unapproved")
    ids = world.node_ids()
    for name in SITES:
        reason = errors.get(ids[name], "")
        assert "not approved" in reason and digest in reason, (name, reason, res.stdout[-2000:])
        refused = _site_records(name, world, "app_refused")
        assert refused and refused[-1]["fab_sha256"] == digest and "not approved" in refused[-1]["reason"]
    assert not marker.exists(), "the unapproved app's code ran at a site"
    assert not any(r["phase"] == "train" and "error" not in r
                   for r in read_jsonl(world.run_dir("unapproved") / "received.jsonl"))

    # hospital-a's privacy officer reviews and approves it: there (only) it runs, in Flower's own ClientApp process
    approve = subprocess.run([MEDFED, "site", "approve", str(world.kit("hospital-a")), "--app", str(app)],
                             capture_output=True, text=True, timeout=120, env=hardening.child_env())
    assert approve.returncode == 0 and digest in approve.stdout, approve.stdout + approve.stderr
    try:
        world.run("--rounds", "1", "--run-name", "approved-at-a", "--app", str(app), "--run-config", BASE_CONFIG,
                  timeout=600)
        errors = _errors(world, "approved-at-a")
        assert ids["hospital-a"] not in errors and marker.exists()
        assert all("not approved" in errors.get(ids[n], "") for n in SITES if n != "hospital-a")
    finally:
        (world.kit("hospital-a") / "approvals.json").unlink()


@pytest.mark.adversarial
def test_a_run_outside_the_sites_bounds_is_refused_and_recorded(world: World) -> None:
    res = world.run("--rounds", "1", "--run-name", "greedy", "--run-config", BASE_CONFIG + " local-epochs=11",
                    timeout=600)
    errors = _errors(world, "greedy")
    ids = world.node_ids()
    for name in SITES:
        reason = errors.get(ids[name], "")
        assert "local-epochs 11 is above the site's bound max-local-epochs = 10" in reason, (name, res.stdout[-2000:])
        assert any("max-local-epochs" in r["reason"] for r in _site_records(name, world, "round_refused"))
        assert not PrivacyLedger(world.site_config(name).state_dir / "privacy-ledger.sqlite").rounds("greedy")


@pytest.mark.adversarial
def test_a_trail_rewritten_and_resealed_at_the_site_is_caught_by_the_coordinators_anchors(
        world: World, basic_run: dict[str, Any], tmp_path: Path) -> None:
    from anonymization.audit import resolve_key_path
    from anonymization.audit.keys import SIGNING_KEY_NAME, load_signing_key
    from tests.audit_factory import reseal_without

    site = world.site_config("hospital-a")
    # the key the trail is sealed with, as the site itself finds it (the insider has the site account)
    signer = load_signing_key(resolve_key_path(site.audit_path, site.audit_key, site.state_dir / SIGNING_KEY_NAME))
    pub = tmp_path / "site-audit.pub"
    pub.write_bytes(signer.public_pem())
    trail = tmp_path / "trail"
    shutil.copytree(site.audit_path, trail)
    anchors = world.run_dir("basic")

    def verify(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MEDFED, "audit", "verify", str(trail), *map(str, args)], capture_output=True,
                              text=True, timeout=120, env=hardening.child_env())

    assert verify("--public-key", pub, "--anchors", anchors).returncode == 0  # the real trail, anchored
    trained = next(r["seq"] for r in read_records(trail) if r.get("kind") == "round_trained"
                   and r.get("run_id") == "basic")
    reseal_without(trail, signer, {trained})  # delete a round's record, re-chain, re-seal with the site's key
    alone = verify("--public-key", pub)
    assert alone.returncode == 0, alone.stdout + alone.stderr  # the site's own key vouches for the rewrite
    anchored = verify("--public-key", pub, "--anchors", anchors)
    assert anchored.returncode == 1 and "BROKEN" in anchored.stdout + anchored.stderr


# ---- a hostile coordinator's models: crafted, poisoned ------------------------------------------


def _resume_with(
    world: World, name: str, state: dict[str, torch.Tensor], config: str
) -> subprocess.CompletedProcess[str]:
    """The coordinator plants ``state`` as round 1's global model and has the sites train round 2 on it."""
    from coordinator.checkpoint import save_checkpoint
    from coordinator.history import RunHistory

    save_checkpoint(world.run_dir(name) / "checkpoints", 1, state, RunHistory(), {})
    return world.run("--resume", "--run-name", name, "--rounds", "2", "--run-config", config, timeout=600)


def _crafted(bias: float) -> dict[str, torch.Tensor]:
    """All weights 0 and the output bias ``bias``: the loss of every image is then a function of its label only."""
    state = {k: torch.zeros_like(v) for k, v in initial_state(RunConfig().with_overrides(image_size=32)).items()}
    state["classifier.head.bias"].fill_(bias)
    return state


@pytest.mark.adversarial
def test_replies_to_a_crafted_model_carry_no_exact_count(world: World) -> None:
    from site_client.task import published_size_bucket

    # batch >= n: with bias -50 the mean training loss times n / 50 would be the site's positive count
    res = _resume_with(world, "crafted", _crafted(-50.0),
                       BASE_CONFIG.replace("batch-size=8", "batch-size=64") + " fraction-evaluate=1.0")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rounds = json.loads((world.run_dir("crafted") / "metrics.json").read_text())["rounds"]
    ids = world.node_ids()
    for name in SITES:
        site = world.site_config(name)
        train = rounds[-1]["sites"][str(ids[name])]["train"]
        assert "train-loss" not in train and set(train) <= TRAIN_METRICS
        bucket = published_size_bucket(site)
        assert bucket is not None and train["num-examples"] == bucket  # fixed at enrolment, not this round's n
        assert int(str(bucket)[1:] or "0") == 0  # one significant digit: a coarse size, not a count
        # the evaluation on the test split: noised, and paid for in the ledger before it left
        evaluated = rounds[-1]["sites"][str(ids[name])]["evaluate"]
        exact = len(ManifestDataset(site.data_dir, split="test", image_size=32))
        assert evaluated["num-examples"] != exact and "loss" not in evaluated
        ledger = PrivacyLedger(site.state_dir / "privacy-ledger.sqlite")
        assert [r["status"] for r in ledger.rounds("crafted")] == ["spent", "evaluated"]


@pytest.mark.adversarial
def test_a_poisoned_global_model_is_refused_with_no_privacy_spent(world: World) -> None:
    poisoned = initial_state(RunConfig().with_overrides(image_size=32))
    poisoned["classifier.head.weight"][0, 0] = float("nan")
    _resume_with(world, "poisoned", poisoned, BASE_CONFIG + " fraction-evaluate=0.0")
    errors = _errors(world, "poisoned")
    ids = world.node_ids()
    for name in SITES:
        assert "non-finite" in errors.get(ids[name], ""), (name, errors)
        ledger = PrivacyLedger(world.site_config(name).state_dir / "privacy-ledger.sqlite")
        assert not [r for r in ledger.rounds("poisoned") if r["status"] == "spent"]
        assert any(r.get("run_id") == "poisoned" for r in _site_records(name, world, "round_refused"))


@pytest.mark.adversarial
def test_two_runs_on_one_site_stop_at_its_lifetime_cap(world: World, tmp_path: Path) -> None:
    """A site's epsilon-cap holds over every run on its data, whatever the coordinator names its runs."""
    name = "hospital-c"
    toml = world.kit(name) / "site.toml"
    original = toml.read_text()
    fresh = world.site_config(name).model_copy(update={"state_dir": tmp_path / "state", "epsilon_cap": 3.0})
    toml.write_text(fresh.to_toml())  # read by the site's executor at every message
    try:
        config = BASE_CONFIG + " fraction-evaluate=0.0"
        first = world.run("--rounds", "2", "--run-name", "lifetime-1", "--run-config", config, timeout=600)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        second = world.run("--rounds", "2", "--run-name", "lifetime-2", "--run-config", config, timeout=600)
        ledger = PrivacyLedger(fresh.state_dir / "privacy-ledger.sqlite")
        assert [r["status"] for r in ledger.rounds("lifetime-1")] == ["spent", "spent"]
        assert not [r for r in ledger.rounds("lifetime-2") if r["status"] == "spent"]
        reason = _errors(world, "lifetime-2").get(world.node_ids()[name], "")
        assert "lifetime" in reason, (reason, second.stdout[-2000:])
        out = subprocess.run([MEDFED, "privacy", "ledger", str(world.kit(name))], capture_output=True, text=True,
                             timeout=120, env=hardening.child_env())
        assert out.returncode == 0, out.stdout + out.stderr
        last = out.stdout.strip().splitlines()[-1]
        match = re.fullmatch(r"lifetime ε ([0-9.]+) of cap 3 \(δ 1e-05\)", last)
        assert match and 2.0 < float(match.group(1)) <= 3.0, last  # calibrated to what the lifetime left
    finally:
        toml.write_text(original)


# ---- the registry cannot be turned against the coordinator ---------------------------------------


@pytest.mark.adversarial
def test_sync_removes_foreign_keys_and_survives_a_key_already_in_use(world: World) -> None:
    from flwr.proto.control_pb2 import RegisterNodeRequest

    from coordinator.superlink import control_client, key_bytes, sync_registrations

    late = generate_site_key(world.root / "sites" / "hospital-late")
    # someone with Control API access registers a key of their own ...
    with control_client(world.cons) as client:
        client.RegisterNode(RegisterNodeRequest(public_key=key_bytes(late.public.read_bytes()), name="intruder"))
    assert world.nodes().get("intruder") == "registered"
    regs = sync_registrations(world.cons)  # ... and the consortium's sync unregisters it
    assert world.nodes().get("intruder") == "unregistered" and "intruder" not in regs
    # that key is now held by an unregistered node: enrolling it is refused by Flower (HTTP 412), and neither
    # add-site nor a coordinator restart fails over it
    res = subprocess.run([MEDFED, "consortium", "add-site", str(world.cons), "hospital-late", "--public-key",
                          str(late.public), "--ca-passphrase-file", str(world.passphrase)],
                         capture_output=True, text=True, timeout=120, env=hardening.child_env())
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cannot be registered" in res.stdout + res.stderr and "keygen" in res.stdout + res.stderr
    regs = json.loads((world.cons / "coordinator" / "state" / "registrations.json").read_text())
    assert regs["hospital-late"]["status"] == "key-in-use"
    assert world.coordinator is not None and world.coordinator.alive()
    world.coordinator.stop()
    world.start_coordinator()  # asserts it is up and stays up
    assert "cannot be registered" in world.coordinator.text()
    world.wait_online()
    assert world.coordinator.alive()
