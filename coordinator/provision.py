"""Consortium provisioning: a CA, the coordinator's TLS identity, and one startup kit per site.

``medfed consortium init`` makes the consortium's certificate authority (its
key optionally passphrase-encrypted) and the SuperLink's TLS certificate (with
SANs for the coordinator's host names). Sites are enrolled by their *public*
SuperNode key only: each site makes its key pair itself (`medfed site keygen`,
EC P-384 in the OpenSSH format `flower-supernode --auth-supernode-private-key`
and `flwr supernode register` read) and sends `auth/node.pub` with
`auth/tls.csr`, the request for its TLS client certificate; `init --site
NAME=FILE` or `add-site NAME --public-key FILE` registers the key, signs the
request with the CA (CN = site name, client authentication only) and writes the
site's kit (kit.toml, the CA certificate, node.pub, tls.pem, service files)
with no private key in it. No command here makes or holds a site's private key.
The coordinator's proxy admits only clients holding such a certificate that
is not on the CA's revocation list (coordinator/tls/crl.pem, rewritten by
`revoke-site`).

Everything is written to a temporary name and renamed; private keys are
created with mode 0600. Keys and certificates come from `cryptography`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shutil
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medfed.files import write_file
from medfed.node_keys import NodeKeyError, fingerprint, load_public_key, parse_public_key, public_line
from medfed.settings import (
    DEFAULT_EVALUATION_NOISE,
    DEFAULT_MAX_MODEL_ABS,
    describe_validation,
    site_template_lines,
    toml_value,
)

CONSORTIUM_FILE = "consortium.toml"
KIT_FILE = "kit.toml"
#: Flower's own default SuperLink port (Fleet, Control and Runtime APIs share it in flwr 1.41).
DEFAULT_PORT = 9093
#: Port of the SuperNode's local ClientApp runtime API (loopback only).
DEFAULT_CLIENTAPP_PORT = 9094
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
#: Environment variable holding the consortium CA key's passphrase (or use --ca-passphrase-file).
CA_PASSPHRASE_ENV = "MEDFED_CA_PASSPHRASE"
#: Shortest passphrase accepted when the CA key is encrypted.
MIN_PASSPHRASE = 8
#: The site's TLS client certificate request, next to its node.pub (`medfed site keygen` writes both).
SITE_CSR = "tls.csr"
#: The site's TLS client certificate in its kit, next to node.pub.
SITE_CERT = "tls.pem"
#: How long a site's client certificate and the CRL are valid (the CA's own lifetime is 10 years).
SITE_CERT_DAYS = 825
CRL_DAYS = 3650


class ProvisionError(Exception):
    """Provisioning cannot go on; the message names the file or field and what to do."""


def explain(source: Path | str, err: ValidationError) -> ProvisionError:
    """A pydantic error as one message naming the file, each field, and the fix."""
    return ProvisionError(
        describe_validation(source, err, f"Fix the field(s) above in {source} (or provision again) and retry.")
    )


# ---- configuration files ------------------------------------------------------------------------


class SiteEntry(BaseModel):
    """One site as the coordinator knows it: its name and the public key it authenticates with."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    public_key: str = Field(alias="public-key", description="OpenSSH public key, relative to the consortium folder")
    status: Literal["active", "revoked"] = "active"
    added: str = ""
    revoked: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not SITE_NAME.match(v):
            raise ValueError(
                "site names are letters, digits, '.', '_' or '-' (at most 63), starting with a letter or digit"
            )
        return v


#: What heads every consortium.toml this module writes: who reads it, and how sites change.
CONSORTIUM_HEADER = (
    "# medfed consortium: read by `medfed coordinator start` and `medfed run`.\n"
    "# Sites are added and revoked with `medfed consortium add-site` / `revoke-site`.\n"
)


class ConsortiumConfig(BaseModel):
    """`consortium.toml`: the coordinator's view of the consortium (no private key in it)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1)
    coordinator_hosts: list[str] = Field(alias="coordinator-hosts", min_length=1)
    port: int = Field(DEFAULT_PORT, ge=1, le=65535)
    bind_host: str = Field("0.0.0.0", alias="bind-host")
    sites: list[SiteEntry] = Field(default_factory=list)

    def site(self, name: str) -> SiteEntry | None:
        return next((s for s in self.sites if s.name == name), None)

    @property
    def active_sites(self) -> list[SiteEntry]:
        return [s for s in self.sites if s.status == "active"]

    def to_toml(self) -> str:
        return CONSORTIUM_HEADER + tomli_w.dumps(self.model_dump(mode="json", by_alias=True))


def load_consortium(directory: Path) -> ConsortiumConfig:
    """Read and validate DIR/consortium.toml."""
    path = directory / CONSORTIUM_FILE
    if not path.is_file():
        raise ProvisionError(
            f"{path} does not exist: {directory} is not a consortium folder; "
            "create one with `medfed consortium init DIR --name NAME --coordinator-host HOST`"
        )
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ProvisionError(f"{path} is not valid TOML: {err}; fix it or provision again") from None
    try:
        return ConsortiumConfig.model_validate(raw)
    except ValidationError as err:
        raise explain(path, err) from None


# ---- files ---------------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ---- keys and certificates -----------------------------------------------------------------------


@dataclass
class CertificateAuthority:
    """The consortium CA: signs the coordinator's TLS certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str, years: int = 10) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP384R1())
        subject = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} medfed consortium CA"),
        ])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365 * years))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, directory: Path, passphrase: bytes | None = None) -> CertificateAuthority:
        """The CA key and certificate from ``directory``; ``passphrase`` if the key is encrypted."""
        key_path, cert_path = directory / "ca.key", directory / "ca.pem"
        if not key_path.is_file() or not cert_path.is_file():
            raise ProvisionError(
                f"the consortium CA is missing ({key_path}, {cert_path}); it is needed to issue certificates — "
                "restore the ca/ folder from the operator's offline copy"
            )
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=passphrase)
        except TypeError:
            if passphrase is None:
                raise ProvisionError(
                    f"{key_path} is encrypted: give its passphrase with --ca-passphrase-file FILE or the "
                    f"{CA_PASSPHRASE_ENV} environment variable") from None
            raise ProvisionError(
                f"{key_path} is not encrypted, but a CA passphrase was given; drop --ca-passphrase-file / "
                f"{CA_PASSPHRASE_ENV}") from None
        except ValueError:
            if passphrase is None:
                raise ProvisionError(
                    f"{key_path} is not a PEM private key; restore ca/ from the offline copy"
                ) from None
            raise ProvisionError(
                f"cannot decrypt {key_path}: wrong CA passphrase (from --ca-passphrase-file or "
                f"{CA_PASSPHRASE_ENV}); nothing was changed — retry with the right one") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ProvisionError(f"{key_path} is not an EC private key; restore the consortium CA key")
        return cls(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))

    def save(self, directory: Path, passphrase: bytes | None = None) -> None:
        """Write ca.key (0600, encrypted with ``passphrase`` if given) and ca.pem."""
        write_file(directory / "ca.key", private_pem(self.key, passphrase), 0o600, dir_mode=0o700)
        write_file(directory / "ca.pem", self.cert_pem)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue_server(self, hosts: list[str], days: int = 825) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A TLS server certificate for the SuperLink, valid for every name and address in ``hosts``."""
        key = ec.generate_private_key(ec.SECP384R1())
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        server_usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False)
        builder = self._leaf(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]), key.public_key(), days,
                             server_usage, ExtendedKeyUsageOID.SERVER_AUTH)
        cert = builder.add_extension(x509.SubjectAlternativeName(names), critical=False).sign(self.key, hashes.SHA384())
        return key, cert

    def issue_site(self, site: str, csr: x509.CertificateSigningRequest,
                   days: int = SITE_CERT_DAYS) -> x509.Certificate:
        """A TLS client certificate for ``site`` over the key in its (checked) request: CN = site, clientAuth only."""
        client_usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False)
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.org),
                             x509.NameAttribute(NameOID.COMMON_NAME, site)])
        return self._leaf(subject, csr.public_key(), days, client_usage, ExtendedKeyUsageOID.CLIENT_AUTH).sign(
            self.key, hashes.SHA384())

    def _leaf(self, subject: x509.Name, public_key: Any, days: int, usage: x509.KeyUsage,
              purpose: x509.ObjectIdentifier) -> x509.CertificateBuilder:
        """A certificate this CA issues to a server or a site: not a CA, one purpose, valid ``days`` from now."""
        now = _now()
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )

    @property
    def org(self) -> str:
        attrs = self.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return str(attrs[0].value) if attrs else "medfed"

    def crl(self, serials: Sequence[int], days: int = CRL_DAYS) -> bytes:
        """The revocation list (PEM) naming ``serials``; nginx refuses a client whose certificate is on it."""
        now = _now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=days)))
        for serial in sorted(set(serials)):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
        return builder.sign(self.key, hashes.SHA384()).public_bytes(serialization.Encoding.PEM)


def private_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM; encrypted with cryptography's best available scheme when ``passphrase`` is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def ca_passphrase(passphrase_file: Path | None) -> bytes | None:
    """The CA key's passphrase: from ``passphrase_file`` (one trailing newline dropped), else $MEDFED_CA_PASSPHRASE.

    None when neither is given (the CA key is then stored, or expected, unencrypted).
    """
    if passphrase_file is not None:
        try:
            text = passphrase_file.read_bytes()
        except OSError as err:
            raise ProvisionError(f"cannot read the CA passphrase file {passphrase_file}: {err.strerror}") from None
        source = str(passphrase_file)
    elif (env := os.environ.get(CA_PASSPHRASE_ENV)) is not None:
        text, source = env.encode("utf-8"), f"${CA_PASSPHRASE_ENV}"
    else:
        return None
    value = text.removesuffix(b"\n").removesuffix(b"\r")
    if not value:
        raise ProvisionError(f"the CA passphrase from {source} is empty; put the passphrase in it")
    return value


def coordinator_hosts(hosts: list[str]) -> list[str]:
    """The certificate's names: those given, then localhost and 127.0.0.1.

    The SuperLink's own SuperExec and `medfed run` on the coordinator host reach
    the SuperLink over loopback, with TLS, so the certificate must name it too.
    """
    out: list[str] = []
    for h in [*hosts, "localhost", "127.0.0.1"]:
        h = h.strip()
        if h and h not in out:
            out.append(h)
    return out


# ---- layout --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where everything lives in a consortium folder."""

    root: Path

    @property
    def ca_dir(self) -> Path:  # the CA private key: operator only
        return self.root / "ca"

    @property
    def coordinator(self) -> Path:
        return self.root / "coordinator"

    @property
    def tls(self) -> Path:
        return self.coordinator / "tls"

    @property
    def nodes(self) -> Path:  # registered sites' public keys
        return self.coordinator / "nodes"

    @property
    def certs(self) -> Path:  # the sites' TLS client certificates, as issued (their serials go on the CRL)
        return self.coordinator / "certs"

    @property
    def crl(self) -> Path:  # the CA's revocation list that the proxy checks every site certificate against
        return self.tls / "crl.pem"

    @property
    def kits(self) -> Path:
        return self.root / "kits"

    def kit(self, site: str) -> Path:
        return self.kits / site


def release_key_path(layout: Layout) -> Path:
    """The consortium's release key (coordinator/release-signing.key), made on first use; its public half
    (release-signing.pub) goes into every site kit, so each site verifies the models it is given."""
    from medfed.signing import KeyFileError, load_or_create_signing_key
    from models.release import RELEASE_KEY, RELEASE_KEY_WHAT, RELEASE_PUBLIC_KEY

    path = layout.coordinator / RELEASE_KEY
    try:
        signer, created = load_or_create_signing_key(path, what=RELEASE_KEY_WHAT)
    except KeyFileError as err:
        raise ProvisionError(str(err)) from None
    if created or not (layout.coordinator / RELEASE_PUBLIC_KEY).is_file():
        write_file(layout.coordinator / RELEASE_PUBLIC_KEY, signer.public_pem())
    return path


def _site_kit(layout: Layout, cfg: ConsortiumConfig, site: str, public: bytes, cert: x509.Certificate) -> SiteEntry:
    """Register ``public`` (an OpenSSH line, checked) and ``cert`` for ``site`` and write its kit: no private key."""
    kit = layout.kit(site)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    # auth/ 0700 as at the site, so copying the kit over the site's folder (cp -a, rsync -a) keeps it narrow
    write_file(kit / "auth" / "node.pub", public, dir_mode=0o700)
    write_file(kit / "auth" / SITE_CERT, cert_pem, dir_mode=0o700)
    write_file(layout.certs / f"{site}.pem", cert_pem)
    write_file(kit / "ca.pem", (layout.tls / "ca.pem").read_bytes())
    release_pub = release_key_path(layout).with_suffix(".pub")
    write_file(kit / release_pub.name, release_pub.read_bytes())
    address = f"{cfg.coordinator_hosts[0]}:{cfg.port}"
    write_file(kit / KIT_FILE, kit_toml(cfg.name, site, address, clientapp_port(cfg)).encode())
    for name, text in site_service_files(site).items():
        write_file(kit / name, text.encode())
    write_file(kit / "README.md", kit_readme(cfg.name, site, address).encode())
    pub_rel = Path("coordinator") / "nodes" / f"{site}.pub"
    write_file(layout.root / pub_rel, public)
    return SiteEntry(name=site, public_key=str(pub_rel), status="active", added=_now().isoformat(timespec="seconds"))


def clientapp_port(cfg: ConsortiumConfig) -> int:
    """The next site's loopback ClientApp port: one per site of the consortium, so two sites on one host never collide.

    Derived from the site's place in consortium.toml (revoked sites keep theirs), skipping the coordinator's port.
    """
    ports = [p for p in range(DEFAULT_CLIENTAPP_PORT, DEFAULT_CLIENTAPP_PORT + len(cfg.sites) + 2) if p != cfg.port]
    return ports[len(cfg.sites)]


def kit_toml(consortium: str, site: str, superlink: str, clientapp: int = DEFAULT_CLIENTAPP_PORT) -> str:
    """The site's kit.toml (validated at the site by site_client.kit.KitConfig)."""
    return f"""# medfed site kit for {site} in consortium {consortium}.
# `medfed site start KIT --data DEID_DIR` reads this file. Paths are relative to this folder.
consortium = {toml_value(consortium)}
name = {toml_value(site)}                   # this site
superlink = {toml_value(superlink)}         # the coordinator's SuperLink (HTTPS, outbound only)
ca-cert = "ca.pem"                  # checks the coordinator's TLS certificate
auth-key = "auth/node.key"          # made here by `medfed site keygen` (mode 0600; never leaves the site)
tls-cert = "auth/tls.pem"           # this site's TLS client certificate, signed by the consortium CA
tls-key = "auth/tls.key"            # its key, made here by `medfed site keygen` (mode 0600)
clientapp-port = {clientapp}             # loopback port between the SuperNode and its ClientApp (one per site)
reconnect-seconds = 3600            # how long the SuperNode keeps retrying a lost coordinator

# Template of the site's own settings (site.toml); `--data` fills data-dir.
[site]
""" + "\n".join(site_template_lines(
        {"name": site, "state-dir": "state", "epsilon-cap": 8.0, "delta": 1e-5},
        {"epsilon-cap-per-run": 4.0, "evaluation-noise": DEFAULT_EVALUATION_NOISE, "size-bucket": 1000,
         "max-model-abs": DEFAULT_MAX_MODEL_ABS})) + "\n"


#: The site's systemd unit, stated once: deploy/systemd/medfed-site.service is :func:`site_unit` with no
#: site (tests/deployment/test_deployment_files.py checks it byte for byte) and every kit ships it with its site's name.
SITE_UNIT_FILE = "medfed-site.service"
_SITE_UNIT = """# medfed site node: Flower SuperNode with TLS and node authentication, outbound only.
# Install (as root), with medfed in /opt/medfed and the site's files in /srv/medfed:
#   install -m 0644 medfed-site.service /etc/systemd/system/
#   systemctl daemon-reload && systemctl enable --now medfed-site
# /srv/medfed/kit  = this site's kit: `medfed site keygen /srv/medfed/kit` made auth/node.key (0600) here, the
#                    operator's kit (kit.toml, ca.pem, auth/node.pub) was copied in: cp -r KIT/. /srv/medfed/kit/
# /srv/medfed/deid = the de-identified store written by `medfed deid run`
[Unit]
Description=medfed site node{site}(Flower SuperNode, TLS, node authentication)
Documentation=file:///opt/medfed/deploy/README.md
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=600
StartLimitBurst=20

[Service]
Type=simple
User=medfed
Group=medfed
WorkingDirectory=/srv/medfed
Environment=FLWR_TELEMETRY_ENABLED=0
Environment=FLWR_DISABLE_UPDATE_CHECK=1
Environment=FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
Environment=RAY_USAGE_STATS_ENABLED=0
ExecStart=/opt/medfed/.venv/bin/medfed site start /srv/medfed/kit --data /srv/medfed/deid
# medfed forwards SIGTERM to the SuperNode, which leaves the federation cleanly.
KillMode=mixed
TimeoutStopSec=60
Restart=on-failure
RestartSec=15
# 78: a fatal refusal no restart cures (bad kit, revoked certificate, port in use): say why once and stop.
RestartPreventExitStatus=78
NoNewPrivileges=true
PrivateTmp=true
ProtectSystem=strict
ProtectHome=true
ProtectKernelTunables=true
ProtectControlGroups=true
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
ReadWritePaths=/srv/medfed
UMask=0077

[Install]
WantedBy=multi-user.target
"""


def site_unit(site: str | None = None) -> str:
    """The hardened site unit (paths as installed by deploy/README.md); ``site`` names the node in its description."""
    return _SITE_UNIT.format(site=f" {site} " if site else " ")


def site_service_files(site: str) -> dict[str, str]:
    """The files a kit carries to run the site as a service: the unit, named for ``site``."""
    return {SITE_UNIT_FILE: site_unit(site)}


def kit_readme(consortium: str, site: str, superlink: str) -> str:
    return f"""# medfed site kit: {site} ({consortium})

From the consortium operator. It holds no private key: `kit.toml`, `ca.pem`
(checks the coordinator), `auth/node.pub` (the public key the operator enrolled
for {site}), `auth/tls.pem` (this site's TLS client certificate, signed from the
request `auth/tls.csr`), `release-signing.pub` (checks every model release the
consortium sends: `medfed model verify`, `predict`, `calibrate`) and `medfed-site.service`.

Copy its contents *into* the site's kit folder, the one where `medfed site keygen`
made `auth/node.key` and `auth/tls.key` (e.g. `cp -r {site}/. /srv/medfed/kit/`). Never replace that
folder: the private key exists there and nowhere else. `medfed site start` checks
that `auth/node.pub` matches `auth/node.key`.

1. De-identify: `medfed deid run RAW DEID --key /srv/medfed/site.key --labels labels.csv`
2. Start the node: `medfed site start /srv/medfed/kit --data DEID` (connects out to {superlink}, HTTPS only)
3. As a service: install `medfed-site.service` (see deploy/README.md in the medfed sources).
"""


# ---- operations ----------------------------------------------------------------------------------


def parse_site_spec(spec: str) -> tuple[str, Path, Path | None]:
    """``NAME=PUBLIC_KEY_FILE[,CSR_FILE]`` (`consortium init --site`) as (name, key file, CSR file or None).

    Without CSR_FILE the request is the tls.csr next to the public key, as `medfed site keygen` writes them.
    """
    name, sep, files = spec.partition("=")
    file, _, csr = files.partition(",")
    if not sep or not name.strip() or not file.strip():
        raise ProvisionError(f"--site {spec!r} is not NAME=PUBLIC_KEY_FILE[,CSR_FILE]; give the site's name and the "
                             "auth/node.pub it sent, e.g. --site hospital-a=hospital-a/node.pub")
    return name.strip(), Path(file.strip()), Path(csr.strip()) if csr.strip() else None


def site_csr_path(public_key: Path, csr: Path | None) -> Path:
    """The site's certificate request: ``csr`` if given, else tls.csr next to its public key."""
    return csr if csr is not None else public_key.with_name(SITE_CSR)


def load_site_csr(path: Path, site: str) -> x509.CertificateSigningRequest:
    """A site's TLS certificate request, checked: readable, self-signed correctly, an EC key."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ProvisionError(
            f"site {site}: cannot read its TLS certificate request {path} ({err.strerror}); the site makes it with "
            f"`medfed site keygen KIT` (auth/{SITE_CSR}) and sends it with node.pub — pass it with --csr") from None
    if b"PRIVATE KEY" in data:
        raise ProvisionError(f"site {site}: {path} holds a PRIVATE key; it must never leave the site — ask for "
                             f"auth/{SITE_CSR} instead")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise ProvisionError(f"site {site}: {path} is not a PEM certificate request; send auth/{SITE_CSR} "
                             "from `medfed site keygen`") from None
    if not csr.is_signature_valid:
        raise ProvisionError(f"site {site}: the signature of the request {path} is not valid (altered in transit?); "
                             f"ask the site for its auth/{SITE_CSR} again")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise ProvisionError(f"site {site}: {path} requests a certificate for a non-EC key; use the request "
                             "`medfed site keygen` makes")
    return csr


def _normalized_key(data: bytes, source: str) -> bytes:
    try:
        return public_line(parse_public_key(data, source))
    except NodeKeyError as err:
        raise ProvisionError(str(err)) from None


def _enrolments(
    directory: Path, cfg: ConsortiumConfig, sites: Sequence[tuple[str, Path, Path | None]]
) -> list[tuple[str, bytes, x509.CertificateSigningRequest]]:
    """Check new sites' names and public keys against the consortium and each other, before anything is written.

    A key may belong to one site only, revoked ones included: a revoked key stays refused.
    """
    layout = Layout(directory)
    owner: dict[bytes, str] = {}  # key -> "site (status)"
    for entry in cfg.sites:
        line = _normalized_key(public_key_line(directory, entry), str(directory / entry.public_key))
        owner[line] = f"{entry.name} ({entry.status})"
    out: list[tuple[str, bytes, x509.CertificateSigningRequest]] = []
    for site, path, csr_path in sites:
        if not SITE_NAME.match(site):
            raise ProvisionError(
                f"site name {site!r} is not allowed: use letters, digits, '.', '_' or '-' (e.g. hospital-a)")
        if (existing := cfg.site(site)) is not None:
            raise ProvisionError(
                f"site {site!r} is already in the consortium ({existing.status}); a revoked site gets a new name")
        if any(site == s for s, _, _ in out):
            raise ProvisionError(f"site {site!r} is given twice; enrol each site once")
        try:
            line = public_line(load_public_key(path))
        except NodeKeyError as err:
            raise ProvisionError(f"site {site}: {err}") from None
        if (other := owner.get(line)) is not None:
            raise ProvisionError(
                f"the public key in {path} is already enrolled for site {other}; every site makes its own key "
                f"with `medfed site keygen KIT` — ask {site} for its own auth/node.pub")
        if layout.kit(site).exists():
            raise ProvisionError(f"{layout.kit(site)} already exists (an old kit); remove it and retry")
        csr = load_site_csr(site_csr_path(path, csr_path), site)
        owner[line] = f"{site} (given just before)"
        out.append((site, line, csr))
    return out


def init_consortium(directory: Path, name: str, hosts: list[str],
                    sites: Sequence[tuple[str, Path] | tuple[str, Path, Path | None]] = (), *,
                    port: int = DEFAULT_PORT, bind_host: str = "0.0.0.0",
                    ca_passphrase: bytes | None = None) -> ConsortiumConfig:
    """Create a consortium folder: CA, coordinator TLS identity, and a kit per enrolled site (name, public key)."""
    directory = directory.resolve()
    if (directory / CONSORTIUM_FILE).exists():
        raise ProvisionError(
            f"{directory} already holds a consortium ({CONSORTIUM_FILE}); use add-site, or another DIR"
        )
    if directory.exists() and any(directory.iterdir()):
        raise ProvisionError(f"{directory} is not empty; choose an empty or new folder")
    host_list = [h.strip() for raw in hosts for h in raw.split(",") if h.strip()]
    if not host_list:
        raise ProvisionError("--coordinator-host is empty: give the name or address sites use to reach the coordinator")
    if ca_passphrase is not None and len(ca_passphrase) < MIN_PASSPHRASE:
        raise ProvisionError(f"the CA passphrase is {len(ca_passphrase)} characters; choose one of at least "
                             f"{MIN_PASSPHRASE}")
    try:
        cfg = ConsortiumConfig(name=name, coordinator_hosts=coordinator_hosts(host_list), port=port,
                               bind_host=bind_host)
    except ValidationError as err:
        raise explain("the command line", err) from None
    enrol = _enrolments(directory, cfg, [(s[0], s[1], s[2] if len(s) > 2 else None) for s in sites])
    layout = Layout(directory)
    ca = CertificateAuthority.create(name)
    ca.save(layout.ca_dir, ca_passphrase)
    key, cert = ca.issue_server(cfg.coordinator_hosts)
    write_file(layout.tls / "ca.pem", ca.cert_pem)
    write_file(layout.tls / "server.pem", cert.public_bytes(serialization.Encoding.PEM))
    write_file(layout.tls / "server.key", private_pem(key), 0o600, dir_mode=0o700)
    write_file(layout.crl, ca.crl([]))
    release_key_path(layout)
    for site, public, csr in enrol:
        cfg.sites.append(_site_kit(layout, cfg, site, public, ca.issue_site(site, csr)))
    write_file(directory / CONSORTIUM_FILE, cfg.to_toml().encode())
    return cfg


def _consortium_ca(directory: Path, ca_passphrase: bytes | None) -> CertificateAuthority:
    """This consortium's CA with its key (refused if ca/ holds another consortium's CA)."""
    layout = Layout(directory)
    ca = CertificateAuthority.load(layout.ca_dir, ca_passphrase)
    if (layout.tls / "ca.pem").is_file() and (layout.tls / "ca.pem").read_bytes() != ca.cert_pem:
        raise ProvisionError(f"the CA in {layout.ca_dir} is not the one in {layout.tls / 'ca.pem'}: restore this "
                             "consortium's own ca/ folder")
    return ca


def add_site(directory: Path, site: str, public_key: Path, csr: Path | None = None, *,
             ca_passphrase: bytes | None = None) -> SiteEntry:
    """Enrol one more site by its public key and signed-here TLS request (`medfed site keygen`); write its kit.

    Needs the CA key: the site's client certificate is issued from ``csr`` (default: tls.csr next to the key).
    """
    directory = directory.resolve()
    cfg = load_consortium(directory)
    ((site, public, request),) = _enrolments(directory, cfg, [(site, public_key, csr)])
    ca = _consortium_ca(directory, ca_passphrase)
    entry = _site_kit(Layout(directory), cfg, site, public, ca.issue_site(site, request))
    cfg.sites.append(entry)
    write_file(directory / CONSORTIUM_FILE, cfg.to_toml().encode())
    return entry


def site_fingerprint(directory: Path, entry: SiteEntry) -> str:
    """SHA-256 fingerprint of a site's registered key (what `medfed site keygen` printed at the site)."""
    return fingerprint(parse_public_key(public_key_line(directory, entry), str(directory / entry.public_key)))


def renew_tls(directory: Path, ca_passphrase: bytes | None = None) -> x509.Certificate:
    """Issue the coordinator a new TLS certificate for the hosts in consortium.toml (needs the CA key).

    For an expiring certificate or new host names (edit coordinator-hosts first).
    Nothing is written unless the CA key opens and belongs to this consortium.
    """
    directory = directory.resolve()
    cfg = load_consortium(directory)
    layout = Layout(directory)
    ca = _consortium_ca(directory, ca_passphrase)
    key, cert = ca.issue_server(coordinator_hosts(cfg.coordinator_hosts))
    write_file(layout.tls / "server.key", private_pem(key), 0o600, dir_mode=0o700)
    write_file(layout.tls / "server.pem", cert.public_bytes(serialization.Encoding.PEM))
    write_crl(directory, cfg, ca)
    return cert


def write_crl(directory: Path, cfg: ConsortiumConfig, ca: CertificateAuthority) -> Path:
    """Write coordinator/tls/crl.pem: the serials of every revoked site's client certificate."""
    layout = Layout(directory)
    serials = []
    for s in cfg.sites:
        path = layout.certs / f"{s.name}.pem"
        if s.status == "revoked" and path.is_file():
            serials.append(x509.load_pem_x509_certificate(path.read_bytes()).serial_number)
    write_file(layout.crl, ca.crl(serials))
    return layout.crl


def revoke_site(directory: Path, site: str, ca_passphrase: bytes | None = None) -> SiteEntry:
    """Revoke a site: its certificate goes on the CRL (needs the CA key) and its node key is refused from then on.

    The CA key is opened first, so a wrong or missing passphrase changes nothing.
    """
    directory = directory.resolve()
    cfg = load_consortium(directory)
    entry = cfg.site(site)
    if entry is None:
        names = ", ".join(s.name for s in cfg.sites) or "none"
        raise ProvisionError(f"site {site!r} is not in the consortium (sites: {names})")
    try:
        ca = _consortium_ca(directory, ca_passphrase)
    except ProvisionError as err:
        raise ProvisionError(f"cannot revoke site {site}: its TLS certificate must go on the CA's revocation list, "
                             f"which needs the CA key — {err}") from None
    if entry.status != "revoked":
        entry.status = "revoked"
        entry.revoked = _now().isoformat(timespec="seconds")
    write_crl(directory, cfg, ca)  # before consortium.toml: a crash in between leaves the site refused, not admitted
    write_file(directory / CONSORTIUM_FILE, cfg.to_toml().encode())
    return entry


def public_key_line(directory: Path, entry: SiteEntry) -> bytes:
    """The site's registered public key (OpenSSH line), as the coordinator keeps it."""
    path = directory / entry.public_key
    if not path.is_file():
        raise ProvisionError(
            f"{path} (public key of site {entry.name}, in {directory / CONSORTIUM_FILE}) is missing; "
            f"copy it back from the site's kit (auth/node.pub)")
    return path.read_bytes()


def remove_kit(directory: Path, site: str) -> None:
    """Delete a site's kit folder at the operator once it has been handed over."""
    kit = Layout(directory).kit(site)
    if kit.exists():
        shutil.rmtree(kit)


def describe(cfg: ConsortiumConfig) -> dict[str, Any]:
    return {"name": cfg.name, "hosts": cfg.coordinator_hosts, "port": cfg.port,
            "sites": {s.name: s.status for s in cfg.sites}}
