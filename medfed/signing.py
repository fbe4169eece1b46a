"""Ed25519 keys in PEM files that only their owner can read: the audit trail's and the consortium's release key.

One implementation for every signing key medfed keeps, so each is created 0600 (race-safe), refused
when group or others can read it, and verified the same way. Callers name the key (``what``) and say
how to fix a problem (``hint``) so messages speak of the key the person knows.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medfed.files import private_file_problem


class KeyFileError(Exception):
    """A key file is missing, unreadable, unsafe or not an Ed25519 key; the message says what to do."""


def key_id(public_raw: bytes) -> str:
    """Short fingerprint of a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def b64(data: bytes) -> str:
    """Base64 text, as keys and signatures are stored in records."""
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class Signer:
    """An Ed25519 private key and where it lives."""

    private_key: Ed25519PrivateKey
    path: Path | None = None

    @property
    def public_raw(self) -> bytes:
        """The 32 raw bytes of the public key."""
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def key_id(self) -> str:
        return key_id(self.public_raw)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def public_pem(self) -> bytes:
        """The public key as PEM (SubjectPublicKeyInfo): what a third party verifies with."""
        return public_pem(self.public_raw)

    @classmethod
    def generate(cls, path: Path | None = None) -> Signer:
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


def load_public_key(path: Path, *, what: str = "public key", hint: str = "",
                    error: type[Exception] = KeyFileError) -> bytes:
    """Raw public key bytes from a PEM file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}{'; ' + hint if hint else ''}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise error(f"{path} is not a PEM public key{'; ' + hint if hint else ''}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise error(f"{path} holds a {type(key).__name__}, not an Ed25519 {what}")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_pem(signer: Signer) -> bytes:
    """Unencrypted PKCS#8 PEM: the file's 0600 mode is its protection, like the site secret."""
    return signer.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private_key(path: Path, signer: Signer, *, exclusive: bool = True, what: str = "signing key",
                      error: type[Exception] = KeyFileError) -> None:
    """Write ``signer`` to ``path`` with mode 0600 (``O_EXCL`` unless ``exclusive`` is False)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)  # FileExistsError passes through: a concurrent creator won
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(private_pem(signer))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise error(f"cannot write {what} {path}: {exc.strerror}") from None


def load_signing_key(path: Path, *, what: str = "signing key", hint: str = "restore it from backup",
                     error: type[Exception] = KeyFileError) -> Signer:
    """Read an existing private key, refusing a file that group or others can read."""
    path = Path(path)
    try:
        problem = private_file_problem(path, what)
    except OSError as exc:
        raise error(f"cannot access {what} {path}: {exc.strerror}; {hint}") from None
    if problem:
        raise error(problem)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise error(f"{what} {path} is not an unencrypted PEM private key; restore it from backup") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise error(f"{what} {path} is a {type(key).__name__}, not Ed25519")
    return Signer(key, path)


def load_or_create_signing_key(path: Path, *, what: str = "signing key", hint: str = "restore it from backup",
                               error: type[Exception] = KeyFileError) -> tuple[Signer, bool]:
    """The key at ``path``, created (0600, race-safe) if missing; also says whether it was created."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        return load_signing_key(path, what=what, hint=hint, error=error), False
    signer = Signer.generate(path)
    try:
        write_private_key(path, signer, what=what, error=error)
    except FileExistsError:
        return load_signing_key(path, what=what, hint=hint, error=error), False  # another process won: its key
    except OSError as exc:
        raise error(f"cannot create {what} {path}: {exc.strerror}; choose a writable location") from None
    return signer, True
