"""Durable, atomic file writes and the private-file check: one helper each for every part of medfed.

A crash or power cut never leaves half a file behind (a temporary name is
written, fsynced, renamed, and the folder fsynced so the rename survives), and
a private key is never, even for a moment, readable by anyone but its owner.
"""

from __future__ import annotations

import io
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename, a new file) survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def open_atomic(path: Path, mode: int | None = 0o644, *, dir_mode: int | None = None) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` only when the ``with`` block ends without an error.

    ``mode`` is set on the file whatever the umask (never wider); ``None`` leaves it to
    the umask, as :func:`open` would. With ``dir_mode`` the parent folder is created
    (or narrowed) to that mode, e.g. 0o700 for the folder of a private key. The
    temporary name is unique, so two writers never share one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if dir_mode is not None:
        os.chmod(path.parent, dir_mode)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)  # the umask may have narrowed it; never widen a private key
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_file(path: Path, data: bytes, mode: int | None = 0o644, *, dir_mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically and durably (see :func:`open_atomic` for the modes)."""
    with open_atomic(path, mode, dir_mode=dir_mode) as fh:
        fh.write(data)


def write_text(path: Path, text: str, mode: int | None = 0o644, *, dir_mode: int | None = None) -> None:
    """:func:`write_file` for UTF-8 text."""
    write_file(path, text.encode("utf-8"), mode, dir_mode=dir_mode)


@contextmanager
def open_atomic_text(path: Path, mode: int | None = 0o644) -> Iterator[io.TextIOWrapper]:
    """:func:`open_atomic` as UTF-8 text with newlines untranslated (for csv and streamed JSON)."""
    with open_atomic(path, mode) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        try:
            yield text
            text.flush()
        finally:
            text.detach()


def private_file_problem(path: Path, what: str) -> str | None:
    """Why ``path`` cannot hold a secret (not a regular file; group or others may read it), else None.

    ``what`` names the file for the message ("key file", "audit signing key").
    Raises OSError when the file cannot be looked at; the caller words that.
    """
    st = Path(path).stat()
    if not stat.S_ISREG(st.st_mode):
        return f"{what} {path} is not a regular file"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return (f"{what} {path} is accessible by group/others (mode {mode:04o}); "
                f"run `chmod 600 {path}` and keep it readable only by the site account")
    return None
