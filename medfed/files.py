"""Atomic file writes with a fixed mode, shared by the operator's provisioning and the site's keygen.

A crash never leaves half a key or half a configuration file behind, and a
private key is never, even for a moment, readable by anyone but its owner.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_file(path: Path, data: bytes, mode: int = 0o644, *, dir_mode: int | None = None) -> None:
    """Write ``data`` to ``path`` via a temporary name, created with ``mode`` (never wider).

    With ``dir_mode`` the parent folder is created (or narrowed) to that mode,
    e.g. 0o700 for the folder of a private key.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if dir_mode is not None:
        os.chmod(path.parent, dir_mode)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.chmod(tmp, mode)  # the umask may have narrowed it; never widen a private key
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
