"""The site's audit signing key: Ed25519, one PEM file that only its owner can read.

Seals of the audit trail are signed with it, so a third party holding only the
exported public key can check that nobody rewrote the trail. The private key
is a site secret (docs/design.md invariant 5): created 0600, refused when others can read it,
and never stored in the trail folder or the de-identified store, where it
would travel with the data it vouches for.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from medfed import signing
from medfed.signing import Signer, b64, key_id, private_pem, public_pem, verify_signature

__all__ = ["ALGORITHM", "SIGNING_KEY_NAME", "AuditError", "AuditKeyError", "AuditSigner", "b64", "check_location",
           "key_id", "load_or_create_signing_key", "load_public_key", "load_signing_key", "private_pem",
           "public_pem", "verify_signature", "write_private_key"]

#: Default file name of the signing key (next to the site secret, or in the site's state folder).
SIGNING_KEY_NAME = "audit-signing.key"
ALGORITHM = "Ed25519"


class AuditError(Exception):
    """The audit trail cannot be written or read as asked; the message says what to do."""


class AuditKeyError(AuditError):
    """The audit signing key is missing, unreadable, unsafe, or not the trail's key."""


# One implementation of Ed25519 key files (medfed.signing); these names speak of the audit key.
AuditSigner = Signer
_WHAT = "audit signing key"
_HINT = "restore it from the site's backup or pass the right file with --audit-key"


def load_public_key(path: Path) -> bytes:
    """Raw public key bytes from an exported PEM file (``medfed audit export-key``)."""
    return signing.load_public_key(path, what="audit key", error=AuditKeyError,
                                   hint="export one with `medfed audit export-key` at the site")


def write_private_key(path: Path, signer: AuditSigner, *, exclusive: bool = True) -> None:
    """Write ``signer`` to ``path`` with mode 0600 (``O_EXCL`` unless ``exclusive`` is False)."""
    signing.write_private_key(path, signer, exclusive=exclusive, what="audit key", error=AuditKeyError)


def load_signing_key(path: Path) -> AuditSigner:
    """Read an existing private key, refusing a file that group or others can read."""
    return signing.load_signing_key(path, what=_WHAT, hint=_HINT, error=AuditKeyError)


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
    check_location(path, forbidden)
    return signing.load_or_create_signing_key(path, what=_WHAT, hint=_HINT, error=AuditKeyError)
