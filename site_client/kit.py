"""The site's startup kit and its SuperNode: `medfed site start KIT --data DEID_DIR`.

A kit (made by `medfed consortium init` / `add-site`) holds the consortium CA
certificate, the site's SuperNode authentication key and `kit.toml`. Starting
the site writes the site's effective `site.toml` (from the kit's ``[site]``
template and ``--data``), makes a loopback-only TLS certificate for the
SuperNode's local ClientApp API (so no port of ours speaks plaintext, even on
127.0.0.1), and runs Flower's own `flower-supernode` with TLS towards the
coordinator, the authentication key and the node config. If the SuperNode
exits because the coordinator is gone (restart, network), it is started
again, for at most ``reconnect-seconds``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medfed import hardening
from medfed.settings import DEFAULT_EVALUATION_NOISE, ConfigError, SiteConfig, describe_validation

log = logging.getLogger(__name__)

KIT_FILE = "kit.toml"
SITE_FILE = "site.toml"


class KitError(Exception):
    """The kit cannot be used as it is; the message names the file, the field and the fix."""


def _explain(source: Path, err: ValidationError) -> KitError:
    return KitError(describe_validation(source, err, f"Fix the field(s) above in {source}, or ask the consortium operator for a new kit."))


class SiteTemplate(BaseModel):
    """The kit's ``[site]`` table: a site.toml without its data folder."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    data_dir: str = Field("", alias="data-dir")
    state_dir: str = Field("state", alias="state-dir")
    audit_dir: str = Field("", alias="audit-dir")
    audit_key: str = Field("", alias="audit-key")
    epsilon_cap: float = Field(alias="epsilon-cap", gt=0.0)  # the site's lifetime total, every run
    epsilon_cap_per_run: float | None = Field(None, alias="epsilon-cap-per-run", gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    evaluation_noise: float = Field(DEFAULT_EVALUATION_NOISE, alias="evaluation-noise", gt=0.0)


class KitConfig(BaseModel):
    """`kit.toml`: how this site reaches the coordinator, and its site template."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    consortium: str
    name: str = Field(description="this site's name in the consortium")
    superlink: str = Field(pattern=r"^[^\s/]+:\d{1,5}$", description="host:port of the coordinator's SuperLink")
    ca_cert: str = Field("ca.pem", alias="ca-cert")
    auth_key: str = Field("auth/node.key", alias="auth-key")
    clientapp_port: int = Field(9094, alias="clientapp-port", ge=1, le=65535)
    reconnect_seconds: float = Field(3600.0, alias="reconnect-seconds", gt=0.0)
    site_template: SiteTemplate = Field(alias="site")


@dataclass
class Kit:
    """A loaded kit folder."""

    root: Path
    config: KitConfig

    @property
    def ca_cert(self) -> Path:
        return self._path(self.config.ca_cert)

    @property
    def auth_key(self) -> Path:
        return self._path(self.config.auth_key)

    @property
    def runtime_tls(self) -> Path:
        return self.root / "runtime-tls"

    def _path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else (self.root / p)


def load_kit(root: Path) -> Kit:
    """Read and check KIT/kit.toml and the files it names."""
    root = root.resolve()
    path = root / KIT_FILE
    if not path.is_file():
        raise KitError(f"{path} does not exist: {root} is not a medfed site kit (made by `medfed consortium init`)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise KitError(f"{path} is not valid TOML: {err}; fix it or ask the operator for a new kit") from None
    try:
        kit = Kit(root, KitConfig.model_validate(raw))
    except ValidationError as err:
        raise _explain(path, err) from None
    if not kit.ca_cert.is_file():
        raise KitError(f"{kit.ca_cert} (ca-cert in {path}) is missing: copy the consortium CA certificate into the kit")
    if not kit.auth_key.is_file():
        raise KitError(f"{kit.auth_key} (auth-key in {path}) is missing: the site's SuperNode key must be in the kit")
    mode = kit.auth_key.stat().st_mode & 0o777
    if mode & 0o077:
        raise KitError(
            f"{kit.auth_key} (auth-key in {path}) is readable by others (mode {mode:o}); "
            f"run `chmod 600 {kit.auth_key}` — it is this site's private key")
    return kit


def write_site_config(kit: Kit, data_dir: Path | None) -> tuple[SiteConfig, Path]:
    """Compose the site's site.toml from the kit template and ``--data``; validate it; write KIT/site.toml."""
    tpl = kit.config.site_template
    if tpl.name != kit.config.name:
        raise KitError(f"[site] name {tpl.name!r} in {kit.root / KIT_FILE} differs from site {kit.config.name!r}; "
                       "they must match")
    data = data_dir if data_dir is not None else (Path(tpl.data_dir) if tpl.data_dir else None)
    if data is None:
        raise KitError("no data folder: pass --data DEID_DIR (the folder `medfed deid run` wrote)")
    values: dict[str, Any] = {
        "name": tpl.name,
        "data-dir": str(kit._path(str(data))),
        "state-dir": str(kit._path(tpl.state_dir)),
        "epsilon-cap": tpl.epsilon_cap,
        "delta": tpl.delta,
        "evaluation-noise": tpl.evaluation_noise,
    }
    if tpl.epsilon_cap_per_run is not None:
        values["epsilon-cap-per-run"] = tpl.epsilon_cap_per_run
    if tpl.audit_dir:
        values["audit-dir"] = str(kit._path(tpl.audit_dir))
    if tpl.audit_key:
        values["audit-key"] = str(kit._path(tpl.audit_key))
    try:
        site = SiteConfig.from_mapping(values, f"{kit.root / KIT_FILE} [site] with --data")
    except ConfigError as err:
        raise KitError(str(err)) from None
    if not (site.data_dir / "manifest.csv").is_file():
        raise KitError(f"{site.data_dir} holds no manifest.csv: pass the de-identified store "
                       "(`medfed deid run SRC DST` writes DST/manifest.csv), never the raw folder")
    site.state_dir.mkdir(parents=True, exist_ok=True)
    path = kit.root / SITE_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(site.to_toml())
    os.replace(tmp, path)
    return site, path


def ensure_runtime_tls(kit: Kit) -> tuple[Path, Path, Path]:
    """A loopback-only CA and certificate for the SuperNode's ClientApp API (made once, kept).

    Flower serves that API over plain HTTP on 127.0.0.1 unless given a
    certificate; with one, nothing we run listens without TLS.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = kit.runtime_tls
    ca_pem, cert_pem, key_pem = d / "ca.pem", d / "runtime.pem", d / "runtime.key"
    if ca_pem.is_file() and cert_pem.is_file() and key_pem.is_file():
        return ca_pem, cert_pem, key_pem
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{kit.config.name} loopback CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    for path, data, mode in (
        (key_pem, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()), 0o600),
        (cert_pem, cert.public_bytes(serialization.Encoding.PEM), 0o644),
        (ca_pem, ca.public_bytes(serialization.Encoding.PEM), 0o644),
    ):
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    return ca_pem, cert_pem, key_pem


def flower_bin(name: str) -> str:
    """Path of a Flower console script installed next to this Python (not whatever PATH finds)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise KitError(f"`{name}` is not installed next to {sys.executable}; install medfed with its dependencies")
    return found


def supernode_command(kit: Kit, site_toml: Path, *, superlink: str | None = None,
                      max_wait: float | None = None) -> list[str]:
    """The `flower-supernode` command line for this kit."""
    ca, cert, key = ensure_runtime_tls(kit)
    return [
        flower_bin("flower-supernode"),
        "--superlink", superlink or kit.config.superlink,
        "--root-certificates", str(kit.ca_cert),
        "--auth-supernode-private-key", str(kit.auth_key),
        "--node-config", f"site-config='{site_toml}'",
        "--isolation", "subprocess",
        "--host", "127.0.0.1",
        "--port", str(kit.config.clientapp_port),
        "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--ssl-ca-certfile", str(ca),
        "--max-wait-time", f"{max_wait if max_wait is not None else kit.config.reconnect_seconds:g}",
    ]


def supernode_env(kit: Kit) -> dict[str, str]:
    """Hardened environment for the SuperNode (and the ClientApps it starts)."""
    bin_dir = str(Path(sys.executable).parent)
    env = hardening.child_env({"FLWR_HOME": str(kit.root / "flwr-home")})
    # The SuperNode's own INFO lines (connected as node N, receiving/sending) are site IT's log.
    if env.get("FLWR_LOG_LEVEL", "WARNING").upper() != "DEBUG":
        env["FLWR_LOG_LEVEL"] = "INFO"
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")  # SuperExec and ClientApp come from this venv
    return env


def run_site(kit: Kit, site_toml: Path, *, reconnect_seconds: float | None = None, backoff: float = 5.0) -> int:
    """Run the SuperNode in the foreground; start it again while the coordinator is away.

    Flower's SuperNode retries a lost SuperLink by itself (``--max-wait-time``),
    but it exits when it cannot (re)activate — e.g. the coordinator restarted
    and still counts the node as online. Bounded by ``reconnect-seconds``.
    """
    budget = reconnect_seconds if reconnect_seconds is not None else kit.config.reconnect_seconds
    deadline = time.monotonic() + budget
    child: subprocess.Popen[bytes] | None = None
    stopping = False

    def _stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    old_term = signal.signal(signal.SIGTERM, _stop)
    old_int = signal.signal(signal.SIGINT, _stop)
    try:
        attempt = 0
        while True:
            attempt += 1
            remaining = max(1.0, deadline - time.monotonic())
            cmd = supernode_command(kit, site_toml, max_wait=remaining)
            log.info("site %s: starting the SuperNode towards %s (attempt %d)", kit.config.name,
                     kit.config.superlink, attempt)
            started = time.monotonic()
            child = subprocess.Popen(cmd, env=supernode_env(kit), cwd=kit.root)
            rc = child.wait()
            if stopping:
                return 0
            if time.monotonic() - started > 60:
                deadline = time.monotonic() + budget  # it was connected: the budget is per outage
            if time.monotonic() >= deadline:
                log.error("site %s: the SuperNode could not reach %s for %.0fs (last exit code %d); giving up",
                          kit.config.name, kit.config.superlink, budget, rc)
                return rc or 1
            log.warning("site %s: the SuperNode exited (code %d); starting it again in %.0fs",
                        kit.config.name, rc, backoff)
            time.sleep(backoff)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
