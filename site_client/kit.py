"""The site's startup kit and its SuperNode: `medfed site keygen KIT`, `medfed site start KIT --data DEID_DIR`.

A kit holds the site's SuperNode authentication key pair, made here at the
site by `medfed site keygen` (the private key never leaves the site), and what
the consortium operator sends back after enrolling the public key
(`medfed consortium add-site`): the consortium CA certificate and `kit.toml`. Starting
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
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from anonymization.manifest import MANIFEST_FILE, label_counts
from medfed import hardening
from medfed.files import private_file_problem, write_file, write_text
from medfed.node_keys import NodeKeyError, fingerprint, load_private_key, node_keypair, parse_public_key
from medfed.processes import stop_child
from medfed.settings import (
    ConfigError,
    SiteConfig,
    describe_validation,
)
from models.release import RELEASE_PUBLIC_KEY
from site_client.supernode import CLIENT_CERT_FLAG, CLIENT_KEY_FLAG, FATAL_EXIT, FATAL_FILE_ENV

log = logging.getLogger(__name__)

KIT_FILE = "kit.toml"
SITE_FILE = "site.toml"
#: Where `medfed site keygen` puts the SuperNode private key (kit.toml's auth-key may name another file).
AUTH_KEY = "auth/node.key"
#: The site's TLS client key (made by keygen, 0600) and the certificate the operator signs from its request.
TLS_KEY = "auth/tls.key"
TLS_CERT = "auth/tls.pem"


class KitError(Exception):
    """The kit cannot be used as it is; the message names the file, the field and the fix."""


def _explain(source: Path, err: ValidationError) -> KitError:
    return KitError(
        describe_validation(
            source, err, f"Fix the field(s) above in {source}, or ask the consortium operator for a new kit."
        )
    )


#: The kit's [site] paths: strings there, relative to the kit folder (data-dir: `--data` usually fills it).
_TEMPLATE_PATHS = {"data_dir": "", "state_dir": "state", "audit_dir": "", "audit_key": "", "release_key": ""}


def _template_fields() -> dict[str, Any]:
    """SiteConfig's fields, names, bounds, defaults and descriptions, with its paths as kit-relative strings."""
    fields: dict[str, Any] = {}
    for name, info in SiteConfig.model_fields.items():
        if name in _TEMPLATE_PATHS:
            fields[name] = (str, Field(_TEMPLATE_PATHS[name], alias=info.alias, description=info.description))
        else:
            fields[name] = (info.annotation, info)
    return fields


#: The kit's ``[site]`` table: a site.toml without its data folder, generated from :class:`SiteConfig`
#: so the two never drift apart; the full SiteConfig checks run when `site start` composes site.toml.
SiteTemplate = create_model(  # type: ignore[call-overload]
    "SiteTemplate", __config__=ConfigDict(extra="forbid", populate_by_name=True), **_template_fields()
)


class KitConfig(BaseModel):
    """`kit.toml`: how this site reaches the coordinator, and its site template."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    consortium: str
    name: str = Field(description="this site's name in the consortium")
    superlink: str = Field(pattern=r"^[^\s/]+:\d{1,5}$", description="host:port of the coordinator's SuperLink")
    ca_cert: str = Field("ca.pem", alias="ca-cert")
    auth_key: str = Field(AUTH_KEY, alias="auth-key", description="this site's SuperNode private key; "
                          "its public key is the same path with .pub")
    tls_cert: str = Field(TLS_CERT, alias="tls-cert", description="this site's TLS client certificate")
    tls_key: str = Field(TLS_KEY, alias="tls-key", description="its private key, made at the site")
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
    def auth_pub(self) -> Path:  # the public key sits next to the private one
        return self.auth_key.with_suffix(".pub")

    @property
    def tls_cert(self) -> Path:
        return self._path(self.config.tls_cert)

    @property
    def tls_key(self) -> Path:
        return self._path(self.config.tls_key)

    @property
    def runtime_tls(self) -> Path:
        return self.root / "runtime-tls"

    def _path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else (self.root / p)


def _read_config(root: Path) -> KitConfig:
    path = root / KIT_FILE
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise KitError(f"{path} is not valid TOML: {err}; fix it or ask the operator for a new kit") from None
    try:
        return KitConfig.model_validate(raw)
    except ValidationError as err:
        raise _explain(path, err) from None


def load_kit(root: Path) -> Kit:
    """Read and check KIT/kit.toml and the files it names, the site's own key pair included."""
    root = root.resolve()
    path = root / KIT_FILE
    if not path.is_file():
        hint = (f"; it has this site's key (auth/): copy the kit the operator sent into it (`cp -r KIT_FROM_OPERATOR/. "
                f"{root}/`)" if (root / AUTH_KEY).is_file() else
                f": run `medfed site keygen {root}`, send auth/node.pub to the consortium operator, and copy the kit "
                "they send back into this folder")
        raise KitError(f"{path} does not exist: {root} is not a complete medfed site kit{hint}")
    kit = Kit(root, _read_config(root))
    if not kit.ca_cert.is_file():
        raise KitError(f"{kit.ca_cert} (ca-cert in {path}) is missing: copy the consortium CA certificate into the kit")
    if not kit.auth_key.is_file():
        raise KitError(
            f"{kit.auth_key} (auth-key in {path}) is missing: this site has no SuperNode key. Run "
            f"`medfed site keygen {root}` here at the site and give only {kit.auth_pub.name} to the consortium "
            f"operator (`medfed consortium add-site DIR {kit.config.name} --public-key {kit.auth_pub.name}`); "
            "the private key never leaves the site")
    problem = private_file_problem(kit.auth_key, "this site's private key")
    if problem:
        raise KitError(problem)
    try:
        own = load_private_key(kit.auth_key).public_key()
        enrolled = (parse_public_key(kit.auth_pub.read_bytes(), str(kit.auth_pub))
                    if kit.auth_pub.is_file() else None)
    except NodeKeyError as err:
        raise KitError(str(err)) from None
    if enrolled is not None and enrolled.public_numbers() != own.public_numbers():
        raise KitError(
            f"{kit.auth_pub} (the public key in the operator's kit, {fingerprint(enrolled)}) does not match this "
            f"site's private key {kit.auth_key} ({fingerprint(own)}); the coordinator would refuse this node. "
            f"Either the kit is another site's or the operator enrolled an old key: send the operator this site's "
            f"public key (`ssh-keygen -y -f {kit.auth_key}` prints it) and copy the new kit in")
    _check_tls_identity(kit, path)
    return kit


def _check_tls_identity(kit: Kit, path: Path) -> None:
    """The site's TLS client key (0600, here) and the certificate the operator issued for it must match."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if not kit.tls_key.is_file():
        raise KitError(f"{kit.tls_key} (tls-key in {path}) is missing: run `medfed site keygen {kit.root}` here; it "
                       f"makes the key and auth/tls.csr, which the operator signs (add-site ... --csr tls.csr)")
    if not kit.tls_cert.is_file():
        raise KitError(f"{kit.tls_cert} (tls-cert in {path}) is missing: the coordinator admits only sites with a "
                       "certificate from the consortium CA; send the operator auth/tls.csr and copy the kit they "
                       "send back into this folder")
    problem = private_file_problem(kit.tls_key, "this site's private TLS key")
    if problem:
        raise KitError(problem)
    try:
        key = serialization.load_pem_private_key(kit.tls_key.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(kit.tls_cert.read_bytes())
    except (ValueError, TypeError) as err:
        raise KitError(f"{kit.tls_key} or {kit.tls_cert} cannot be read ({err}); run `medfed site keygen "
                       f"{kit.root} --force` and have the site enrolled again") from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise KitError(f"{kit.tls_cert} (from the operator) is not for this site's TLS key {kit.tls_key}: the kit is "
                       "another site's or an old one; send the operator this site's auth/tls.csr and copy the new "
                       "kit in")


def _tls_request(root: Path, site: str | None, *, force: bool) -> tuple[Path, Path]:
    """Make the site's TLS client key (0600) and its certificate request (auth/tls.csr) unless both exist."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key_path, csr_path = root / TLS_KEY, (root / TLS_KEY).with_name("tls.csr")
    if key_path.is_file() and csr_path.is_file() and not force:
        return key_path, csr_path
    key = ec.generate_private_key(ec.SECP384R1())
    # The operator's CA sets the certificate's name (CN = site name); the request only proves the key.
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site or "medfed site")]))
           .sign(key, hashes.SHA384()))
    write_file(csr_path, csr.public_bytes(serialization.Encoding.PEM), 0o644, dir_mode=0o700)
    write_file(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()), 0o600, dir_mode=0o700)
    return key_path, csr_path


@dataclass(frozen=True)
class SiteKey:
    """What `medfed site keygen` made: where the two halves are, and the public key's fingerprint."""

    private: Path
    public: Path
    fingerprint: str
    csr: Path  # the TLS client certificate request, sent with the public key
    site: str | None  # from kit.toml, when the kit already has one
    replaced: bool


def generate_site_key(root: Path, *, force: bool = False) -> SiteKey:
    """Make this site's SuperNode key pair and TLS client key + request in KIT; the private keys stay here.

    Written atomically: private keys 0600 in a 0700 folder. An existing key is
    kept unless ``force`` (the coordinator knows it; a new one must be enrolled again).
    """
    root = root.resolve()
    if root.exists() and not root.is_dir():
        raise KitError(f"{root} is not a folder; give the site's kit folder (it may not exist yet)")
    kit = Kit(root, _read_config(root)) if (root / KIT_FILE).is_file() else None
    private = kit.auth_key if kit is not None else root / AUTH_KEY
    public = private.with_suffix(".pub")
    existed = private.exists()
    site = kit.config.name if kit else None
    if existed and not force and not (root / TLS_KEY).is_file():  # a key from before TLS client certificates
        _, csr = _tls_request(root, site, force=False)
        return SiteKey(private=private, public=public, fingerprint=fingerprint(load_private_key(private).public_key()),
                       csr=csr, site=site, replaced=False)
    if existed and not force:
        try:
            fp = f" (fingerprint {fingerprint(load_private_key(private).public_key())})"
        except NodeKeyError:
            fp = ""
        raise KitError(
            f"{private} already exists: this site already has a SuperNode key{fp}. Keep it (the consortium operator "
            "enrolled its node.pub), or pass --force to replace it — the operator must then enrol the new node.pub "
            "(revoke-site, then add-site)")
    private_bytes, public_bytes = node_keypair()
    # public first: a crash in between never leaves a new private key without its public half
    write_file(public, public_bytes, 0o644, dir_mode=0o700)
    write_file(private, private_bytes, 0o600, dir_mode=0o700)
    _, csr = _tls_request(root, site, force=True)
    fp = fingerprint(parse_public_key(public_bytes, str(public)))
    return SiteKey(private=private, public=public, fingerprint=fp, csr=csr, site=site, replaced=existed)


def write_site_config(kit: Kit, data_dir: Path | None) -> tuple[SiteConfig, Path]:
    """Compose the site's site.toml from the kit template and ``--data``; validate it; write KIT/site.toml."""
    tpl = kit.config.site_template
    if tpl.name != kit.config.name:
        raise KitError(f"[site] name {tpl.name!r} in {kit.root / KIT_FILE} differs from site {kit.config.name!r}; "
                       "they must match")
    # --data is the operator's, relative to where they are; the kit template's data-dir is relative to the kit
    data = data_dir.resolve() if data_dir is not None else (kit._path(tpl.data_dir) if tpl.data_dir else None)
    if data is None:
        raise KitError("no data folder: pass --data DEID_DIR (the folder `medfed deid run` wrote)")
    values: dict[str, Any] = tpl.model_dump(by_alias=True, exclude_none=True, exclude=set(_TEMPLATE_PATHS))
    values["data-dir"] = str(data)
    values["state-dir"] = str(kit._path(tpl.state_dir))
    if tpl.audit_dir:
        values["audit-dir"] = str(kit._path(tpl.audit_dir))
    if tpl.audit_key:
        values["audit-key"] = str(kit._path(tpl.audit_key))
    # The consortium's release key as provisioned in the kit, never one the coordinator sends.
    release_key = kit._path(tpl.release_key) if tpl.release_key else kit.root / RELEASE_PUBLIC_KEY
    if release_key.is_file():
        values["release-key"] = str(release_key)
    try:
        site = SiteConfig.from_mapping(values, f"{kit.root / KIT_FILE} [site] with --data")
    except ConfigError as err:
        raise KitError(str(err)) from None
    manifest = site.data_dir / MANIFEST_FILE
    if not manifest.is_file():
        raise KitError(f"{site.data_dir} holds no {MANIFEST_FILE}: pass the de-identified store "
                       f"(`medfed deid run SRC DST` writes DST/{MANIFEST_FILE}), never the raw folder")
    labelled, unlabelled = label_counts(manifest)
    if labelled == 0:
        raise KitError(f"{manifest} has {unlabelled} image(s) and none has a label: this site would train on "
                       "nothing, so it does not join. Run `medfed deid run SRC DST --labels LABELS.csv` again with a "
                       "label table whose keys match these images (it resumes and fills the labels)")
    site.state_dir.mkdir(parents=True, exist_ok=True)
    path = kit.root / SITE_FILE
    write_text(path, site.to_toml(), mode=None)
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
        write_file(path, data, mode)
    return ca_pem, cert_pem, key_pem


def supernode_command(kit: Kit, site_toml: Path, *, superlink: str | None = None,
                      max_wait: float | None = None) -> list[str]:
    """The `flower-supernode` command line for this kit."""
    ca, cert, key = ensure_runtime_tls(kit)
    return [
        # Flower's own SuperNode, through site_client.supernode (a shorter wait between pulls).
        sys.executable, "-m", "site_client.supernode",
        # Ours, removed before Flower parses the rest: the site's TLS client certificate for the proxy.
        CLIENT_CERT_FLAG, str(kit.tls_cert), CLIENT_KEY_FLAG, str(kit.tls_key),
        "--superlink", superlink or kit.config.superlink,
        "--root-certificates", str(kit.ca_cert),
        "--auth-supernode-private-key", str(kit.auth_key),
        "--node-config", f"site-config='{site_toml}'",
        # The site's own executor (site_client.executor) runs the tasks: only approved apps, one process.
        "--isolation", "process",
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


def executor_command(kit: Kit, site_toml: Path) -> list[str]:
    """The site's long-lived task executor (site_client.executor) next to its SuperNode."""
    ca, _, _ = ensure_runtime_tls(kit)
    return [sys.executable, "-m", "site_client.executor", "--kit", str(kit.root), "--site-toml", str(site_toml),
            "--runtime", f"127.0.0.1:{kit.config.clientapp_port}", "--runtime-ca", str(ca)]


class SiteFatal(Exception):  # noqa: N818 - what the operator reads is the message
    """The site cannot run until its kit, key, certificate or host changes; restarting will not help."""


#: How long a taken ClientApp port may stay taken before `site start` calls it fatal: a SuperNode
#: killed a moment ago (a restart after a crash) is still letting go of it.
PORT_GRACE_SECONDS = 20.0


def check_clientapp_port(kit: Kit, grace: float = PORT_GRACE_SECONDS) -> None:
    """Refuse when the ClientApp port stays taken (another site, or an old SuperNode, on this host).

    SO_REUSEADDR as every server sets it, so connections of a stopped SuperNode still in TIME_WAIT do
    not count; only a live listener does, and only if it is still there after ``grace`` seconds.
    """
    import socket
    import time

    port = kit.config.clientapp_port
    deadline = time.monotonic() + grace
    while True:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                return
            except OSError as err:
                if time.monotonic() >= deadline:
                    raise SiteFatal(
                        f"the ClientApp port 127.0.0.1:{port} (clientapp-port in {kit.root / KIT_FILE}) is in use "
                        f"({err.strerror}): another site or an old SuperNode runs on this host. Stop it, or give this "
                        "site its own port (clientapp-port in kit.toml, or --clientapp-port)") from None
        time.sleep(0.5)


def run_site(kit: Kit, site_toml: Path, *, reconnect_seconds: float | None = None, backoff: float = 5.0) -> int:
    """Run the SuperNode and the site's executor in the foreground; start them again when they exit.

    Flower's SuperNode retries a lost SuperLink by itself (``--max-wait-time``),
    but it exits when it cannot (re)activate — e.g. the coordinator restarted
    and still counts the node as online. Bounded by ``reconnect-seconds``. The
    executor runs every task (site_client.executor); if it dies it is started again.
    A refusal no restart cures (the ClientApp port taken, the certificate revoked, a kit
    from another CA) raises :class:`SiteFatal` with the cause, once, and nothing is restarted.
    """
    check_clientapp_port(kit)
    budget = reconnect_seconds if reconnect_seconds is not None else kit.config.reconnect_seconds
    deadline = time.monotonic() + budget
    node: subprocess.Popen[bytes] | None = None
    executor: subprocess.Popen[bytes] | None = None
    stopping = False

    def _stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for child in (node, executor):
            if child is not None and child.poll() is None:
                child.send_signal(signal.SIGTERM)

    old_term = signal.signal(signal.SIGTERM, _stop)
    old_int = signal.signal(signal.SIGINT, _stop)
    env = supernode_env(kit)
    kit.runtime_tls.mkdir(parents=True, exist_ok=True)
    fatal_file = kit.runtime_tls / "fatal.txt"  # the SuperNode writes why it cannot go on (supernode.fatal)
    fatal_file.unlink(missing_ok=True)
    env[FATAL_FILE_ENV] = str(fatal_file)
    try:
        attempt = 0
        started = time.monotonic()
        while not stopping:
            if executor is None or executor.poll() is not None:
                if executor is not None:
                    log.warning("site %s: the task executor exited (code %s); starting it again",
                                kit.config.name, executor.returncode)
                executor = subprocess.Popen(executor_command(kit, site_toml), env=env, cwd=kit.root)
            if node is None or node.poll() is not None:
                if node is not None:
                    rc = node.returncode
                    if rc == FATAL_EXIT:
                        reason = fatal_file.read_text().strip() if fatal_file.is_file() else "see the output above"
                        raise SiteFatal(f"site {kit.config.name}: {reason}")
                    if time.monotonic() - started > 60:
                        deadline = time.monotonic() + budget  # it was connected: the budget is per outage
                    if time.monotonic() >= deadline:
                        log.error("site %s: the SuperNode could not reach %s for %.0fs (last exit code %d); "
                                  "giving up", kit.config.name, kit.config.superlink, budget, rc)
                        return rc or 1
                    log.warning("site %s: the SuperNode exited (code %d); starting it again in %.0fs",
                                kit.config.name, rc, backoff)
                    time.sleep(backoff)
                    if stopping:
                        break
                attempt += 1
                remaining = max(1.0, deadline - time.monotonic())
                log.info("site %s: starting the SuperNode towards %s (attempt %d)", kit.config.name,
                         kit.config.superlink, attempt)
                started = time.monotonic()
                node = subprocess.Popen(supernode_command(kit, site_toml, max_wait=remaining), env=env, cwd=kit.root)
            time.sleep(0.5)
        return 0
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        stop_child(node)
        stop_child(executor)
