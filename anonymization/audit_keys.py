"""The site's audit signing key: Ed25519, one PEM file that only its owner can read.

Seals of the audit trail are signed with it, so a third party holding only the
exported public key can check that nobody rewrote the trail. The private key
is a site secret (docs/design.md invariant 5): created 0600, refused when others can read it,
and never stored in the trail folder or the de-identified store, where it
would travel with the data it vouches for.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medfed.files import private_file_problem

#: Default file name of the signing key (next to the site secret, or in the site's state folder).
SIGNING_KEY_NAME = "audit-signing.key"
ALGORITHM = "Ed25519"


class AuditError(Exception):
    """The audit trail cannot be written or read as asked; the message says what to do."""


class AuditKeyError(AuditError):
    """The audit signing key is missing, unreadable, unsafe, or not the trail's key."""


def key_id(public_raw: bytes) -> str:
    """Short fingerprint of a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def b64(data: bytes) -> str:
    """Base64 text, as keys and endorsements are stored in the trail."""
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class AuditSigner:
    """An Ed25519 private key and where it lives; signs seals and key rotations."""

    private_key: Ed25519PrivateKey
    path: Path | None = None

    @property
    def public_raw(self) -> bytes:
        """The 32 raw bytes of the public key."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def key_id(self) -> str:
        return key_id(self.public_raw)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def public_pem(self) -> bytes:
        """The public key as PEM (SubjectPublicKeyInfo): what a third party verifies with."""
        return public_pem(self.public_raw)

    @classmethod
    def generate(cls, path: Path | None = None) -> AuditSigner:
        """A fresh key held in memory (tests, benchmarks, rotation before it is written)."""
        return cls(Ed25519PrivateKey.generate(), path)


def public_pem(public_raw: bytes) -> bytes:
    """PEM (SubjectPublicKeyInfo) text of a raw Ed25519 public key."""
    return Ed25519PublicKey.from_public_bytes(public_raw).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def verify_signature(public_raw: bytes, signature: bytes, data: bytes) -> bool:
    """True if ``signature`` is ``data`` signed by the key ``public_raw``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def load_public_key(path: Path) -> bytes:
    """Raw public key bytes from an exported PEM file (``medfed audit export-key``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuditKeyError(f"cannot read public key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise AuditKeyError(
            f"{path} is not a PEM public key; export one with `medfed audit export-key` at the site"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 audit key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_pem(signer: AuditSigner) -> bytes:
    """Unencrypted PKCS#8 PEM: the file's 0600 mode is its protection, like the site secret."""
    return signer.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private_key(path: Path, signer: AuditSigner, *, exclusive: bool = True) -> None:
    """Write ``signer`` to ``path`` with mode 0600 (``O_EXCL`` unless ``exclusive`` is False)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(private_pem(signer))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise AuditKeyError(f"cannot write audit key {path}: {exc.strerror}") from None


def load_signing_key(path: Path) -> AuditSigner:
    """Read an existing private key, refusing a file that group or others can read."""
    path = Path(path)
    try:
        problem = private_file_problem(path, "audit signing key")
    except OSError as exc:
        raise AuditKeyError(
            f"cannot access audit signing key {path}: {exc.strerror}; restore it from the site's backup "
            "or pass the right file with --audit-key"
        ) from None
    if problem:
        raise AuditKeyError(problem)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise AuditKeyError(f"cannot read audit signing key {path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise AuditKeyError(
            f"audit signing key {path} is not an unencrypted PEM private key; restore it from backup"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditKeyError(f"audit signing key {path} is a {type(key).__name__}, not Ed25519")
    return AuditSigner(key, path)


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_location(path: Path, forbidden: Iterable[Path]) -> None:
    """Refuse a key inside a folder that leaves the site or is shown to auditors."""
    for folder in forbidden:
        if _inside(Path(path), Path(folder)):
            raise AuditKeyError(
                f"the audit signing key {path} lies inside {folder}; a private key must never be stored "
                "with the data or the trail it signs: choose a path outside it (--audit-key)"
            )


def load_or_create_signing_key(path: Path, *, forbidden: Iterable[Path] = ()) -> tuple[AuditSigner, bool]:
    """The key at ``path``, created (0600, race-safe) if missing; also says whether it was created."""
    path = Path(path)
    check_location(path, forbidden)
    if path.exists() or path.is_symlink():
        return load_signing_key(path), False
    signer = AuditSigner.generate(path)
    try:
        write_private_key(path, signer)
    except FileExistsError:
        return load_signing_key(path), False  # another process created it first: use its key
    except OSError as exc:
        raise AuditKeyError(
            f"cannot create audit signing key {path}: {exc.strerror}; choose a writable location"
        ) from None
    return signer, True
