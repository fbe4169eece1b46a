"""The coordinator's SuperLink: `medfed coordinator start DIR`.

Runs Flower's own `flower-superlink` with TLS (the consortium's certificate),
SuperNode authentication on, its state in a SQLite database on disk, runtime
dependency installation and telemetry off, and then makes the SuperLink's
node registry match `consortium.toml`: every active site's public key
registered, every revoked one unregistered (through Flower's Control API, as
`flwr supernode register` does).

Flower 1.41 serves its Fleet, Control and Runtime APIs on one HTTPS port, so
that port is the only one the SuperLink opens; its gRPC health server (plain
text) is never started.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from coordinator.provision import (
    ConsortiumConfig,
    Layout,
    ProvisionError,
    load_consortium,
    public_key_line,
)
from medfed import hardening

log = logging.getLogger(__name__)

#: Name of the SuperLink connection in the coordinator's Flower configuration.
CONNECTION = "medfed"


class CoordinatorError(Exception):
    """The coordinator cannot start or be reached; the message says why and what to do."""


@dataclass(frozen=True)
class CoordinatorPaths:
    """The coordinator's working files inside the consortium folder."""

    layout: Layout

    @property
    def state(self) -> Path:
        return self.layout.coordinator / "state"

    @property
    def database(self) -> Path:
        return self.state / "superlink.db"

    @property
    def flwr_home(self) -> Path:  # Flower configuration (SuperLink connection) for `flwr run` and registration
        return self.layout.coordinator / "flwr-home"

    @property
    def runs(self) -> Path:
        return self.layout.coordinator / "runs"

    @property
    def log_file(self) -> Path:
        return self.state / "superlink.log"

    @property
    def pid_file(self) -> Path:
        return self.state / "superlink.pid"

    @property
    def registrations(self) -> Path:
        return self.state / "registrations.json"


def flower_bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    raise CoordinatorError(f"`{name}` is not installed next to {sys.executable}; install medfed with its dependencies")


def superlink_command(directory: Path, cfg: ConsortiumConfig, *, port: int | None = None,
                      bind_host: str | None = None) -> list[str]:
    """The `flower-superlink` command line for this consortium."""
    layout = Layout(directory)
    paths = CoordinatorPaths(layout)
    tls = layout.tls
    for f in ("ca.pem", "server.pem", "server.key"):
        if not (tls / f).is_file():
            raise CoordinatorError(f"{tls / f} is missing: the coordinator's TLS identity comes from "
                                   "`medfed consortium init`; restore it from the consortium folder")
    return [
        flower_bin("flower-superlink"),
        "--ssl-ca-certfile", str(tls / "ca.pem"),
        "--ssl-certfile", str(tls / "server.pem"),
        "--ssl-keyfile", str(tls / "server.key"),
        "--enable-supernode-auth",
        "--database", str(paths.database),
        "--disable-runtime-dependency-installation",
        "--isolation", "subprocess",
        "--host", bind_host or cfg.bind_host,
        "--port", str(port or cfg.port),
    ]


def coordinator_env(directory: Path) -> dict[str, str]:
    """Hardened environment: no telemetry, no update check, no `uv sync`; Flower tools from this venv."""
    paths = CoordinatorPaths(Layout(directory))
    env = hardening.child_env({"FLWR_HOME": str(paths.flwr_home)})
    if env.get("FLWR_LOG_LEVEL", "WARNING").upper() != "DEBUG":
        env["FLWR_LOG_LEVEL"] = "INFO"  # the SuperLink's log (state/superlink.log) is the operator's record
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def write_flower_config(directory: Path, cfg: ConsortiumConfig, port: int | None = None) -> Path:
    """The Flower configuration `flwr run` and registration use: one TLS connection over loopback."""
    layout = Layout(directory)
    paths = CoordinatorPaths(layout)
    paths.flwr_home.mkdir(parents=True, exist_ok=True)
    text = (
        "# Written by `medfed coordinator start`: the SuperLink's Control API over TLS.\n"
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port or cfg.port}"\n'
        f'root-certificates = "{layout.tls / "ca.pem"}"\n'
    )
    path = paths.flwr_home / "config.toml"
    tmp = path.with_name(".config.toml.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def wait_for_tls(host: str, port: int, ca_file: Path, timeout: float) -> None:
    """Wait (bounded) until ``host:port`` completes a TLS handshake against the consortium CA."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2) as sock:
                with ctx.wrap_socket(sock, server_hostname=host):
                    return
        except (OSError, ssl.SSLError) as err:
            last = err
            time.sleep(0.3)
    raise CoordinatorError(f"the SuperLink did not answer TLS on {host}:{port} within {timeout:g}s ({last}); "
                           "see its log")


@contextmanager
def control_client(directory: Path, port: int | None = None) -> Iterator[Any]:
    """Flower's own Control API client for this coordinator (TLS, consortium CA)."""
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    cfg = load_consortium(directory)
    layout = Layout(directory)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    os.environ["FLWR_HOME"] = str(CoordinatorPaths(layout).flwr_home)
    conn = SuperLinkConnection(name=CONNECTION, address=f"127.0.0.1:{port or cfg.port}",
                               root_certificates=str(layout.tls / "ca.pem"))
    client = init_http_client_from_connection(conn)
    try:
        yield client
    finally:
        client.close()


def _key_bytes(line: bytes) -> bytes:
    """An OpenSSH public key line as the bytes Flower stores (PEM SubjectPublicKeyInfo)."""
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_ssh_public_key(line)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ProvisionError("a site key is not an EC key; re-provision the site")
    return public_key_to_bytes(key)


def sync_registrations(directory: Path, port: int | None = None) -> dict[str, Any]:
    """Register every active site's key at the SuperLink and unregister every revoked one.

    Idempotent: compares public keys with what the SuperLink holds. Returns
    {site: {"node_id": ..., "status": ...}} and writes it to state/registrations.json.
    """
    from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest, UnregisterNodeRequest

    cfg = load_consortium(directory)
    paths = CoordinatorPaths(Layout(directory))
    out: dict[str, Any] = {}
    with control_client(directory, port) as client:
        nodes = list(client.ListNodes(ListNodesRequest()).nodes_info)
        by_key = {bytes(n.public_key): n for n in nodes if n.status != "unregistered"}
        for site in cfg.sites:
            key = _key_bytes(public_key_line(directory, site))
            node = by_key.get(key)
            if site.status == "active":
                if node is None:
                    res = client.RegisterNode(RegisterNodeRequest(public_key=key, name=site.name))
                    log.info("registered site %s as SuperNode %d", site.name, res.node_id)
                    out[site.name] = {"node_id": int(res.node_id), "status": "registered"}
                else:
                    out[site.name] = {"node_id": int(node.node_id), "status": node.status}
            else:
                if node is not None:
                    client.UnregisterNode(UnregisterNodeRequest(node_id=node.node_id))
                    log.info("unregistered revoked site %s (SuperNode %d)", site.name, node.node_id)
                out[site.name] = {"node_id": int(node.node_id) if node is not None else None, "status": "revoked"}
    paths.state.mkdir(parents=True, exist_ok=True)
    tmp = paths.registrations.with_name(".registrations.json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, paths.registrations)
    return out


def list_nodes(directory: Path, port: int | None = None) -> list[dict[str, Any]]:
    """The SuperLink's node registry (for status output and tests)."""
    from flwr.proto.control_pb2 import ListNodesRequest

    with control_client(directory, port) as client:
        return [{"node_id": int(n.node_id), "name": n.name, "status": n.status}
                for n in client.ListNodes(ListNodesRequest()).nodes_info]


def running_pid(directory: Path) -> int | None:
    """The pid of this consortium's SuperLink if it is running (a stale pid file, e.g. after a crash, is not)."""
    pid_file = CoordinatorPaths(Layout(directory)).pid_file
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    proc = Path("/proc") / str(pid)
    if Path("/proc/self").exists():  # Linux: a zombie or a reused pid is not our SuperLink
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state in ("Z", "X") or b"flower-superlink" not in (proc / "cmdline").read_bytes():
                return None
            return pid
        except (OSError, IndexError):
            return None
    try:
        os.kill(pid, 0)
        return pid
    except OSError:
        return None


def start_coordinator(directory: Path, *, port: int | None = None, bind_host: str | None = None,
                      ready_timeout: float = 120.0, foreground: bool = True) -> int:
    """Start the SuperLink, register the sites, then (``foreground``) wait until it exits."""
    directory = directory.resolve()
    cfg = load_consortium(directory)
    paths = CoordinatorPaths(Layout(directory))
    if (pid := running_pid(directory)) is not None:
        raise CoordinatorError(f"a SuperLink for {directory} is already running (pid {pid}); stop it first")
    for d in (paths.state, paths.runs):
        d.mkdir(parents=True, exist_ok=True)
    write_flower_config(directory, cfg, port)
    cmd = superlink_command(directory, cfg, port=port, bind_host=bind_host)
    logf = open(paths.log_file, "ab")  # noqa: SIM115 - handed to the child for its lifetime
    child = subprocess.Popen(cmd, env=coordinator_env(directory), cwd=paths.state, stdout=logf,
                             stderr=subprocess.STDOUT)
    paths.pid_file.write_text(str(child.pid))
    stopping = False

    def _stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        try:
            wait_for_tls("127.0.0.1", port or cfg.port, Layout(directory).tls / "ca.pem", ready_timeout)
        except CoordinatorError:
            if child.poll() is not None:
                raise CoordinatorError(
                    f"flower-superlink exited with code {child.returncode} while starting; see {paths.log_file}"
                ) from None
            raise
        regs = sync_registrations(directory, port)
        active = sum(1 for r in regs.values() if r["status"] != "revoked")
        log.info("coordinator %s up on port %d: %d site(s) registered, TLS and SuperNode authentication on",
                 cfg.name, port or cfg.port, active)
        print(f"medfed coordinator ready: https://{cfg.coordinator_hosts[0]}:{port or cfg.port} "
              f"({active} sites registered)", flush=True)
        if not foreground:
            return child.pid
        while child.poll() is None:
            time.sleep(0.5)
        return 0 if stopping else (child.returncode or 0)
    except BaseException:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
        raise
    finally:
        if foreground:
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    child.kill()
            paths.pid_file.unlink(missing_ok=True)
            logf.close()
