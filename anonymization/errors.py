"""Errors the de-identification raises for bad arguments.

Kept in a leaf module so that every other module (keys, labels, batch) can raise
them without import cycles; :mod:`anonymization.batch` re-exports them.
Messages never carry a patient identifier (docs/design.md invariant 4): they name files,
lines and what to do, not values.
"""

from __future__ import annotations

import errno


class DeidError(Exception):
    """Bad arguments to a de-identification run; the message says what to do."""


class KeyFileError(DeidError):
    """The site secret's key file is missing, malformed or too widely readable."""


class LabelsError(DeidError):
    """The labels CSV is malformed (the message names the line, never a value)."""


class DiskFullError(DeidError):
    """The disk (or quota) holding an output is full: the run stops; a re-run resumes."""


def is_disk_full(err: BaseException) -> bool:
    """True for ENOSPC and EDQUOT: no file is to blame, so nothing may be quarantined for it."""
    return isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS


_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
