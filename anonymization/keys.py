"""The site secret: 32 random bytes, hex on one line, in a file only its owner can read.

Every pseudonym (UIDs, patient IDs, accession numbers, date offsets, digests) is an
HMAC under this secret, so losing it breaks linkage with earlier runs and leaking
it lets anyone re-identify: the file is created 0600 and refused if others can read it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from anonymization.errors import KeyFileError
from medfed.files import private_file_problem

SECRET_BYTES = 32


def _create(path: Path) -> bytes:
    """Write a fresh secret with O_EXCL so two processes never both create one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(SECRET_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read(path)  # lost a race with another process: use its key
    except OSError as exc:
        raise KeyFileError(
            f"cannot create key file {path}: {exc.strerror}; choose a writable location"
        ) from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(secret.hex() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise KeyFileError(f"cannot write key file {path}: {exc.strerror}") from None
    return secret


def _read(path: Path) -> bytes:
    """Read and validate an existing key file."""
    try:
        problem = private_file_problem(path, "key file")
    except OSError as exc:
        raise KeyFileError(f"cannot access key file {path}: {exc.strerror}") from None
    if problem:
        raise KeyFileError(problem)
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
        raise KeyFileError(f"cannot read key file {path}: {why}") from None
    value = text.strip()
    if len(value) != 2 * SECRET_BYTES or len(text.strip().splitlines()) != 1:
        raise KeyFileError(
            f"key file {path} is malformed: expected {2 * SECRET_BYTES} hex characters "
            "on one line; restore the site's key from its backup (a new key breaks "
            "linkage with earlier pseudonyms)"
        )
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise KeyFileError(
            f"key file {path} is malformed: it holds characters that are not hex digits"
        ) from None


def load_or_create_secret(path: Path) -> bytes:
    """Return the site secret from ``path``, creating it (mode 0600) if it does not exist."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return _create(path)
    return _read(path)
