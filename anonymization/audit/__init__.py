"""The site's tamper-evident audit trail: what happened to every file, every round trained, everything that left.

``records`` is the format both ends agree on, ``trail`` writes it (:class:`AuditTrail`), ``verify`` checks it
from its files alone, ``report`` renders it for the privacy officer, ``keys`` holds the Ed25519 key that seals
it and ``anchors`` the heads a site hands the coordinator to keep. ``verify`` never imports ``trail``, so a
verifier reads the format without the writer (tests/medfed/test_design.py checks the subpackage has no import cycle).
"""

from anonymization.audit.keys import SIGNING_KEY_NAME, AuditError, AuditKeyError
from anonymization.audit.records import (
    AUDIT_FILE,
    GENESIS,
    SEAL_DOMAIN,
    encode,
    line_hash,
    read_meta,
    read_records,
    read_segments,
    segment_files,
    utc_now,
)
from anonymization.audit.trail import AuditTrail, open_trail, resolve_key_path

__all__ = [
    "AUDIT_FILE",
    "GENESIS",
    "SEAL_DOMAIN",
    "SIGNING_KEY_NAME",
    "AuditError",
    "AuditKeyError",
    "AuditTrail",
    "encode",
    "line_hash",
    "open_trail",
    "read_meta",
    "read_records",
    "read_segments",
    "resolve_key_path",
    "segment_files",
    "utc_now",
]
