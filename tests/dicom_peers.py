"""Real DICOM peers for the tests: Debian's Orthanc and DCMTK on loopback, and a small hospital PKI.

The fixtures that start them (``orthanc``, ``pki``) are in conftest.py; the helpers are here so
test modules can import them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from medfed.processes import stop_child

if TYPE_CHECKING:  # imported where used: conftest.py loads this module for every test
    from anonymization.intake import TlsFiles

STORESCU, STORESCP = shutil.which("storescu"), shutil.which("storescp")
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
WAIT = 30.0  # every wait on a peer is bounded by this many seconds


def need(tool: str | None, name: str, package: str = "dcmtk") -> str:
    """The tool's path; skip where it is missing, but fail under CI (the Makefile installs it)."""
    if tool and Path(tool).exists():
        return tool
    message = f"{name} is not installed (Debian package {package})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " - it is required in CI")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def listening(port: int, proc: subprocess.Popen | None = None) -> Callable[[], bool]:
    """A check for :func:`wait_until`: something accepts on loopback ``port`` (and ``proc`` still runs)."""

    def check() -> bool:
        if proc is not None:
            assert proc.poll() is None, f"the peer exited with {proc.returncode}"
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    return check


# ---- Orthanc ---------------------------------------------------------------------------------------
@dataclass
class Orthanc:
    http: int
    dicom: int
    aet: str = "ORTHANC"

    def rest(self, method: str, path: str, body: bytes | dict | None = None) -> object:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=data, method=method)
        with urllib.request.urlopen(request, timeout=WAIT) as response:  # noqa: S310 - loopback only
            raw = response.read()
        return raw if path.endswith("/file") else json.loads(raw or b"null")


def start_orthanc(folder: Path, modalities: dict[str, list], procs: list[subprocess.Popen[bytes]]) -> Orthanc:
    """Debian's Orthanc on loopback with its own storage in ``folder``; its process is appended to ``procs``."""
    tool = need(ORTHANC, "Orthanc", "orthanc")
    folder.mkdir(parents=True, exist_ok=True)
    peer = Orthanc(http=free_port(), dicom=free_port())
    config = {
        "Name": "medfed-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "HttpPort": peer.http, "DicomPort": peer.dicom, "DicomAet": peer.aet, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "HttpServerEnabled": True, "DicomServerEnabled": True,
        "DicomModalities": modalities, "Plugins": [], "StableAge": 1, "DicomScuTimeout": 10,
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 - closed with the process
    procs.append(subprocess.Popen([tool, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT))

    def up() -> bool:
        assert procs[-1].poll() is None, (folder / "orthanc.log").read_text(errors="replace")[-2000:]
        try:
            peer.rest("GET", "/system")
            return True
        except OSError:
            return False

    wait_until(up, "Orthanc to answer on its REST port")
    return peer


def stop(procs: list[subprocess.Popen]) -> None:
    """Terminate each process, kill it after WAIT seconds (medfed's own way of stopping a child)."""
    for proc in procs:
        stop_child(proc, WAIT)


# ---- a hospital PKI -----------------------------------------------------------------------------
@dataclass
class Pki:
    """The hospital's CA with a server identity (127.0.0.1, localhost) and a client one, and a rogue CA's."""

    server: TlsFiles
    client_key: Path
    client_cert: Path
    rogue_key: Path
    rogue_cert: Path

    @property
    def client(self) -> TlsFiles:
        """The client identity and the CA that issued the server's certificate (as a sender uses them)."""
        from anonymization.intake import TlsFiles

        return TlsFiles(self.client_cert, self.client_key, self.server.ca)


def _issue_client(ca: object, name: str, folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from coordinator.provision import private_pem

    key = ec.generate_private_key(ec.SECP384R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])).sign(key, hashes.SHA384()))
    cert = ca.issue_site(name, csr, days=1)  # type: ignore[attr-defined]
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.pem"
    key_path.write_bytes(private_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def make_pki(folder: Path) -> Pki:
    from cryptography.hazmat.primitives import serialization

    from anonymization.intake import TlsFiles
    from coordinator.provision import CertificateAuthority, private_pem

    folder.mkdir(parents=True, exist_ok=True)
    ca, rogue = CertificateAuthority.create("Hospital"), CertificateAuthority.create("Rogue")
    (folder / "ca.pem").write_bytes(ca.cert_pem)
    key, cert = ca.issue_server(["127.0.0.1", "localhost"], days=1)
    (folder / "server.key").write_bytes(private_pem(key))
    (folder / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "rogue-ca.pem").write_bytes(rogue.cert_pem)
    client_key, client_cert = _issue_client(ca, "pacs", folder)
    rogue_key, rogue_cert = _issue_client(rogue, "rogue", folder)
    return Pki(TlsFiles(folder / "server.pem", folder / "server.key", folder / "ca.pem"),
               client_key, client_cert, rogue_key, rogue_cert)
