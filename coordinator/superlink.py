"""The coordinator's SuperLink: `medfed coordinator start DIR`.

Runs Flower's own `flower-superlink` with TLS (the consortium's certificate),
SuperNode authentication on, its state in a SQLite database on disk, runtime
dependency installation and telemetry off, and then makes the SuperLink's
node registry match `consortium.toml`: every active site's public key
registered, every revoked one unregistered (through Flower's Control API, as
`flwr supernode register` does).

Flower 1.41 serves its Fleet, Control and Runtime APIs on one HTTPS port.
Sites need only the Fleet API, so the SuperLink binds loopback on an internal
port (where `medfed run` and registration use the Control API) and Debian's
nginx, a child of this command, holds the public port: mutual TLS (a site
certificate from the consortium CA, not on its CRL), only ``/v1/fleet/``
proxied, 403 for everything else (docs/deployment.md, "The control plane").
The SuperLink's gRPC health server (plain text) is never started.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.provision import (
    ConsortiumConfig,
    Layout,
    ProvisionError,
    load_consortium,
    public_key_line,
)
from medfed import hardening
from medfed.processes import stop_child, stop_processes_in

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

    @property
    def internal_port(self) -> Path:  # the SuperLink's loopback port, chosen at each start
        return self.state / "superlink.port"

    @property
    def nginx_conf(self) -> Path:
        return self.state / "nginx.conf"

    @property
    def nginx_pid(self) -> Path:
        return self.state / "nginx.pid"

    @property
    def nginx_error_log(self) -> Path:
        return self.state / "nginx-error.log"

    @property
    def nginx_access_log(self) -> Path:
        return self.state / "nginx-access.log"


def flower_bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    raise CoordinatorError(f"`{name}` is not installed next to {sys.executable}; install medfed with its dependencies")


def superlink_command(directory: Path, cfg: ConsortiumConfig, *, internal_port: int) -> list[str]:
    """The `flower-superlink` command line: loopback only, on ``internal_port`` (nginx holds the public one)."""
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
        "--host", "127.0.0.1",
        "--port", str(internal_port),
    ]


def coordinator_env(directory: Path) -> dict[str, str]:
    """Hardened environment: no telemetry, no update check, no `uv sync`; Flower tools from this venv."""
    paths = CoordinatorPaths(Layout(directory))
    env = hardening.child_env({"FLWR_HOME": str(paths.flwr_home)})
    if env.get("FLWR_LOG_LEVEL", "WARNING").upper() != "DEBUG":
        env["FLWR_LOG_LEVEL"] = "INFO"  # the SuperLink's log (state/superlink.log) is the operator's record
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def write_flower_config(directory: Path, internal_port: int) -> Path:
    """The Flower configuration `flwr run` and registration use: TLS to the SuperLink's own loopback port."""
    layout = Layout(directory)
    paths = CoordinatorPaths(layout)
    paths.flwr_home.mkdir(parents=True, exist_ok=True)
    text = (
        "# Written by `medfed coordinator start`: the SuperLink's Control API over TLS.\n"
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{internal_port}"\n'
        f'root-certificates = "{layout.tls / "ca.pem"}"\n'
    )
    path = paths.flwr_home / "config.toml"
    tmp = path.with_name(".config.toml.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def wait_for_tls(host: str, port: int, ca_file: Path, timeout: float, proc: subprocess.Popen[bytes] | None = None,
                 stopped: Callable[[], bool] = lambda: False) -> None:
    """Wait (bounded) until ``host:port`` completes a TLS handshake against the consortium CA.

    Ends at once when ``proc`` (the server) exits or ``stopped()`` (SIGTERM arrived): a SuperLink that died
    at bind must not keep `coordinator start` waiting, deaf to its service manager, for the whole timeout.
    """
    ctx = ssl.create_default_context(cafile=str(ca_file))
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if stopped():
            raise CoordinatorError("stopped (SIGTERM or Ctrl-C) while the SuperLink was starting")
        if proc is not None and proc.poll() is not None:
            raise CoordinatorError(f"the SuperLink exited with code {proc.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=2) as sock, ctx.wrap_socket(sock, server_hostname=host):
                return
        except (OSError, ssl.SSLError) as err:
            last = err
            time.sleep(0.3)
    raise CoordinatorError(f"the SuperLink did not answer TLS on {host}:{port} within {timeout:g}s ({last}); "
                           "see its log")


def internal_port(directory: Path) -> int:
    """The loopback port the running SuperLink serves its Control API on (written by `coordinator start`)."""
    path = CoordinatorPaths(Layout(directory)).internal_port
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        raise CoordinatorError(f"{path} is missing: the coordinator of {directory} is not running here; start it "
                               f"with `medfed coordinator start {directory}` (the Control API is on loopback "
                               "only)") from None


@contextmanager
def control_client(directory: Path, port: int | None = None) -> Iterator[Any]:
    """Flower's own Control API client for this coordinator: TLS over loopback to the SuperLink's internal port."""
    import httpx
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    directory = directory.resolve()  # Flower wants an absolute CA path
    load_consortium(directory)
    port = port or internal_port(directory)
    layout = Layout(directory)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    os.environ["FLWR_HOME"] = str(CoordinatorPaths(layout).flwr_home)
    conn = SuperLinkConnection(name=CONNECTION, address=f"127.0.0.1:{port}",
                               root_certificates=str(layout.tls / "ca.pem"))
    with contextlib.redirect_stdout(io.StringIO()):  # Flower prints "Using SuperLink: ..." on our stdout
        client = init_http_client_from_connection(conn)
    try:
        yield client
    except httpx.TransportError as err:
        raise CoordinatorError(
            f"the coordinator of {directory} does not answer on its Control API (127.0.0.1:{port}: {err}): it is not "
            f"running, or it was killed and left {CoordinatorPaths(layout).internal_port} behind; start it with "
            f"`medfed coordinator start {directory}`") from None
    except httpx.HTTPStatusError as err:
        raise CoordinatorError(f"the coordinator's Control API refused {err.request.url.path} (HTTP "
                               f"{err.response.status_code}: {err.response.text[:200]}); see "
                               f"{CoordinatorPaths(layout).log_file}") from None
    finally:
        client.close()


def key_bytes(line: bytes) -> bytes:
    """An OpenSSH public key line as the bytes Flower stores (PEM SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    key = serialization.load_ssh_public_key(line)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ProvisionError("a site key is not an EC key; re-provision the site")
    return public_key_to_bytes(key)


#: HTTP status of Flower's Control API when a public key is held by another (e.g. unregistered) node.
KEY_IN_USE = 412


def sync_registrations(directory: Path, port: int | None = None) -> dict[str, Any]:
    """Make the SuperLink's node registry match consortium.toml; never raises for one site's trouble.

    Registers every active site's key, unregisters revoked sites' keys and any
    key the consortium does not list (registered behind the operator's back).
    A key Flower refuses as "already in use" (HTTP 412: an unregistered node
    still holds it) is reported with what to do, and the others go on.
    Returns {site: {"node_id": ..., "status": ...}} and writes it to state/registrations.json.
    """
    import httpx
    from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest, UnregisterNodeRequest

    cfg = load_consortium(directory)
    paths = CoordinatorPaths(Layout(directory))
    out: dict[str, Any] = {}
    with control_client(directory, port) as client:
        nodes = list(client.ListNodes(ListNodesRequest()).nodes_info)
        by_key = {bytes(n.public_key): n for n in nodes if n.status != "unregistered"}
        active_keys: set[bytes] = set()
        for site in cfg.sites:
            key = key_bytes(public_key_line(directory, site))
            node = by_key.get(key)
            if site.status == "active":
                active_keys.add(key)
                if node is not None:
                    out[site.name] = {"node_id": int(node.node_id), "status": node.status}
                    continue
                try:
                    res = client.RegisterNode(RegisterNodeRequest(public_key=key, name=site.name))
                except httpx.HTTPStatusError as err:
                    if err.response.status_code != KEY_IN_USE:
                        raise
                    log.error("site %s cannot be registered: the SuperLink holds its public key for an unregistered "
                              "node (someone unregistered it through the Control API). The site must make a new key "
                              "(`medfed site keygen KIT --force`) and be enrolled again under a new name; the other "
                              "sites are unaffected", site.name)
                    out[site.name] = {"node_id": None, "status": "key-in-use"}
                    continue
                log.info("registered site %s as SuperNode %d", site.name, res.node_id)
                out[site.name] = {"node_id": int(res.node_id), "status": "registered"}
            else:
                if node is not None:
                    client.UnregisterNode(UnregisterNodeRequest(node_id=node.node_id))
                    log.info("unregistered revoked site %s (SuperNode %d)", site.name, node.node_id)
                out[site.name] = {"node_id": int(node.node_id) if node is not None else None, "status": "revoked"}
        for key, node in by_key.items():
            if key not in active_keys and not any(v["node_id"] == int(node.node_id) for v in out.values()):
                client.UnregisterNode(UnregisterNodeRequest(node_id=node.node_id))
                log.warning("unregistered SuperNode %d (%r): its key is not in %s", node.node_id, node.name,
                            directory / "consortium.toml")
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


# ---- the public port: nginx, mutual TLS, Fleet API only ------------------------------------------


#: The only API sites need; everything else on the public port gets 403.
FLEET_PREFIX = "/v1/fleet/"


def nginx_bin() -> str:
    """Debian's nginx (in /usr/sbin, which a non-root PATH may lack)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if found is None:
        raise CoordinatorError("nginx is not installed: the coordinator's public port is served by it "
                               "(`apt-get install nginx` on Debian; `make` installs it when run as root)")
    return found


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def nginx_config(directory: Path, *, public_port: int, bind_host: str, internal: int) -> str:
    """nginx.conf for the public port: client certificates from the CA (not on the CRL), Fleet API only."""
    layout = Layout(directory)
    paths = CoordinatorPaths(layout)
    tls, state = layout.tls, paths.state
    # As root, nginx would run its workers as "nobody"; keep them the coordinator's own user instead.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    temp = "\n".join(f"    {d}_temp_path {state / 'nginx-temp' / d};" for d in
                      ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""# Written by `medfed coordinator start`; rewritten at every start. Do not edit.
{user}worker_processes 1;
pid {paths.nginx_pid};
error_log {paths.nginx_error_log} warn;
events {{ worker_connections 1024; }}
http {{
    access_log {paths.nginx_access_log};
{temp}
    server_tokens off;
    client_max_body_size 0;              # model updates; the SuperLink bounds what it accepts
    server {{
        listen {_listen(bind_host, public_port)} ssl;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {tls / "server.pem"};
        ssl_certificate_key {tls / "server.key"};
        # mutual TLS: only a site certificate from the consortium CA, not revoked, gets an HTTP answer
        ssl_verify_client on;
        ssl_verify_depth 1;
        ssl_client_certificate {tls / "ca.pem"};
        ssl_crl {layout.crl};
        location {FLEET_PREFIX} {{
            # the raw request line too: no encoded '/' or '..' may reach another API upstream
            if ($request_uri !~ "^/v1/fleet/[a-z0-9-]+$") {{ return 403; }}
            limit_except POST {{ deny all; }}
            proxy_pass https://127.0.0.1:{internal};
            proxy_http_version 1.1;
            proxy_ssl_trusted_certificate {tls / "ca.pem"};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
        location / {{ return 403; }}     # Control and Runtime APIs: loopback only, on the SuperLink's own port
        # plain HTTP on this port gets no HTTP answer at all: the connection is closed (TLS only)
        error_page 497 @plaintext;
        location @plaintext {{ return 444; }}
        # no or a bad (unknown CA, revoked, expired) client certificate: 401, on which Flower's SuperNode
        # stops, as it does when the SuperLink refuses its node key (nginx's own 400 leaves it hanging)
        error_page 495 496 = @refused;
        location @refused {{ return 401; }}
    }}
}}
"""


def nginx_command(directory: Path, *extra: str) -> list[str]:
    """nginx with this consortium's config, prefix and error log (``extra``: e.g. ``-t``, ``-s reload``)."""
    paths = CoordinatorPaths(Layout(directory))
    return [nginx_bin(), "-c", str(paths.nginx_conf), "-p", f"{paths.state}/", "-e", str(paths.nginx_error_log),
            *extra]


def write_nginx_config(directory: Path, *, public_port: int, bind_host: str, internal: int) -> Path:
    """Write state/nginx.conf and check it with `nginx -t` (a clear error, before anything listens)."""
    layout = Layout(directory)
    paths = CoordinatorPaths(layout)
    if not layout.crl.is_file():
        raise CoordinatorError(f"{layout.crl} (the CA's revocation list) is missing; `medfed consortium renew-tls "
                               f"{directory}` writes it (it needs the CA key)")
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (paths.state / "nginx-temp" / d).mkdir(parents=True, exist_ok=True)
    paths.nginx_conf.write_text(nginx_config(directory, public_port=public_port, bind_host=bind_host,
                                             internal=internal))
    res = subprocess.run(nginx_command(directory, "-t", "-q"), capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise CoordinatorError(f"nginx refuses {paths.nginx_conf}: {(res.stderr or res.stdout).strip()}")
    return paths.nginx_conf


def proxy_pid(directory: Path) -> int | None:
    """The pid of this consortium's running nginx (its pid file, checked against /proc), or None."""
    paths = CoordinatorPaths(Layout(directory))
    try:
        pid = int(paths.nginx_pid.read_text().strip())
        if b"nginx" not in (Path("/proc") / str(pid) / "cmdline").read_bytes():
            return None
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def reload_proxy(directory: Path) -> bool:
    """Make the running nginx re-read its config, certificates and CRL (SIGHUP); False if none runs."""
    pid = proxy_pid(directory)
    if pid is None:
        return False
    os.kill(pid, signal.SIGHUP)
    log.info("nginx (pid %d) reloaded: the revocation list is in force for new connections", pid)
    return True


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _last_error(log_file: Path) -> str:
    """The last line of the SuperLink's log that names an error (what an operator needs first)."""
    try:
        lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "its log is unreadable"
    for ln in reversed(lines[-200:]):
        if any(w in ln for w in ("ERROR", "Error", "error", "Exception", "in use")):
            return ln[-300:]
    return lines[-1][-300:] if lines else "its log is empty"


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes], what: str) -> None:
    """Wait (bounded) until ``host:port`` accepts TCP connections, failing at once if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CoordinatorError(f"{what} exited with code {proc.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise CoordinatorError(f"{what} did not listen on {host}:{port} within {timeout:g}s")


#: Flower processes the SuperLink starts in a session of their own (its SuperExec, and the ServerApp of a
#: run): stopping or killing the SuperLink leaves them behind, and a ServerApp whose SuperLink is gone
#: retries forever. They work in the coordinator's state folder, which is how they are found and stopped.
FLOWER_DETACHED = ("flower-superexec", "flwr-serverapp")


def start_coordinator(directory: Path, *, port: int | None = None, bind_host: str | None = None,
                      ready_timeout: float = 120.0, foreground: bool = True) -> int:
    """Start the SuperLink (loopback) and nginx (public port), register the sites, then wait until either exits."""
    directory = directory.resolve()
    cfg = load_consortium(directory)
    paths = CoordinatorPaths(Layout(directory))
    if (pid := running_pid(directory)) is not None:
        raise CoordinatorError(f"a SuperLink for {directory} is already running (pid {pid}); stop it first")
    if (pid := proxy_pid(directory)) is not None:
        raise CoordinatorError(f"an nginx for {directory} is still running (pid {pid}, left by a coordinator that was "
                               f"killed); stop it (`kill {pid}`) and start again")
    for d in (paths.state, paths.runs):
        d.mkdir(parents=True, exist_ok=True)
    if left := stop_processes_in(paths.state, FLOWER_DETACHED):
        log.warning("stopped %d Flower process(es) left by a coordinator that was killed (pids %s)",
                    len(left), ", ".join(map(str, left)))
    public_port, host = port or cfg.port, bind_host or cfg.bind_host
    internal = _free_loopback_port()
    write_nginx_config(directory, public_port=public_port, bind_host=host, internal=internal)
    paths.internal_port.write_text(str(internal))
    write_flower_config(directory, internal)
    cmd = superlink_command(directory, cfg, internal_port=internal)
    logf = open(paths.log_file, "ab")  # noqa: SIM115 - handed to the child for its lifetime
    child = subprocess.Popen(cmd, env=coordinator_env(directory), cwd=paths.state, stdout=logf,
                             stderr=subprocess.STDOUT)
    paths.pid_file.write_text(str(child.pid))
    proxy: subprocess.Popen[bytes] | None = None
    stopping = False

    def _stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for c in (proxy, child):
            if c is not None and c.poll() is None:
                c.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    def _stop_all() -> None:
        if proxy is not None:
            stop_child(proxy)
        stop_child(child)
        stop_processes_in(paths.state, FLOWER_DETACHED)

    try:
        try:
            wait_for_tls("127.0.0.1", internal, Layout(directory).tls / "ca.pem", ready_timeout, child,
                         lambda: stopping)
        except CoordinatorError:
            if stopping:
                return 0
            if child.poll() is not None:
                raise CoordinatorError(
                    f"flower-superlink exited with code {child.returncode} while starting: "
                    f"{_last_error(paths.log_file)}; see {paths.log_file}") from None
            raise
        proxy = subprocess.Popen(nginx_command(directory, "-g", "daemon off;"), cwd=paths.state,
                                 stdout=logf, stderr=subprocess.STDOUT)
        probe = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        try:
            wait_for_port(probe, public_port, 30, proxy, "nginx")
        except CoordinatorError as err:
            raise CoordinatorError(f"{err}; see {paths.nginx_error_log}") from None
        regs = sync_registrations(directory, internal)
        active = sum(1 for r in regs.values() if r["status"] not in ("revoked", "key-in-use"))
        log.info("coordinator %s up on port %d (nginx: site certificates, Fleet API only; SuperLink on loopback "
                 "port %d): %d site(s) registered", cfg.name, public_port, internal, active)
        print(f"medfed coordinator ready: https://{cfg.coordinator_hosts[0]}:{public_port} "
              f"({active} sites registered)", flush=True)
        if not foreground:
            return child.pid
        while child.poll() is None and proxy.poll() is None:
            time.sleep(0.5)
        if not stopping:
            gone = "nginx" if proxy.poll() is not None else "flower-superlink"
            log.error("%s exited (code %s); stopping the coordinator — see %s", gone,
                      proxy.returncode if gone == "nginx" else child.returncode,
                      paths.nginx_error_log if gone == "nginx" else paths.log_file)
            _stop_all()
            return 1
        return 0
    except BaseException:
        _stop_all()
        raise
    finally:
        if foreground:
            _stop_all()
            paths.pid_file.unlink(missing_ok=True)
            paths.internal_port.unlink(missing_ok=True)
            logf.close()
