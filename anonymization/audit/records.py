"""The audit trail's record format: file names, record kinds, seal domains, and reading a trail folder.

What both the writer (:mod:`anonymization.audit.trail`) and the verifier
(:mod:`anonymization.audit.verify`) must agree on, in one place, so neither
imports the other's internals. Reading takes the trail's shared lock when it can
and never opens the trail for writing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

AUDIT_FILE = "audit.jsonl"  # the active segment
SEGMENT_NAME = "audit-{:06d}.jsonl"  # closed segments
SEGMENT_RE = re.compile(r"^audit-(\d{6})\.jsonl$")
LOCK_FILE = "audit.lock"
META_FILE = "trail.json"
GENESIS = "0" * 64
FORMAT = "medfed-audit-trail/1"

KIND_SEAL = "seal"
KIND_KEY_CREATED = "key_created"
KIND_KEY_ROTATED = "key_rotated"
KIND_SEGMENT = "segment_opened"
KIND_TORN = "torn_line"
KIND_POLICY = "policy"
#: Why a seal was written. A run that finishes ends the trail with an end-of-run (or key
#: rotation) seal; a trail whose last seal is periodic was cut off, or its run has not finished.
SEAL_PERIODIC = "periodic"
SEAL_ROLLOVER = "rollover"
SEAL_END = "end of run"
SEAL_ROTATION = "key rotation"
END_SEALS = frozenset({SEAL_END, SEAL_ROTATION})
#: Records the trail writes itself; :meth:`AuditTrail.records` leaves them out unless asked.
TRAIL_KINDS = frozenset({KIND_SEAL, KIND_KEY_CREATED, KIND_KEY_ROTATED, KIND_SEGMENT, KIND_TORN, KIND_POLICY})

SEAL_DOMAIN = b"medfed-audit-seal/1\n"
ROTATION_DOMAIN = b"medfed-audit-key-rotation/1\n"
#: A seal line ends with its signature over everything before it (with ``}`` closing).
SIG_RE = re.compile(rb',"sig":"([0-9a-f]{128})"\}$')



def utc_now() -> str:
    """Current UTC time, ISO 8601 with milliseconds."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


def encode(record: Mapping[str, Any]) -> bytes:
    """One record as its line (without the newline): compact, ASCII-only, key order kept."""
    return json.dumps(record, separators=(",", ":"), default=str, ensure_ascii=True).encode("ascii")


def line_hash(raw: bytes) -> str:
    """What the next record's ``prev`` holds: SHA-256 of the line's bytes."""
    return hashlib.sha256(raw).hexdigest()


def rotation_message(previous_key_id: str, new_public_raw: bytes) -> bytes:
    """What the retiring key signs to vouch for its successor."""
    return ROTATION_DOMAIN + previous_key_id.encode("ascii") + b"\n" + new_public_raw


def segment_files(directory: Path) -> list[tuple[int, Path]]:
    """The trail's segments in order: closed ones by number, then the active ``audit.jsonl``."""
    directory = Path(directory)
    closed: list[tuple[int, Path]] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        m = SEGMENT_RE.match(name)
        if m:
            closed.append((int(m.group(1)), directory / name))
    closed.sort()
    active = directory / AUDIT_FILE
    if active.exists():
        closed.append(((closed[-1][0] if closed else 0) + 1, active))
    return closed


def read_segments(directory: Path) -> list[tuple[int, Path, bytes]]:
    """Every segment's number, path and bytes, read under the trail's shared lock when it can
    be taken (never created: the folder may be a read-only copy)."""
    try:
        fd: int | None = os.open(Path(directory) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        fd = None
    if fd is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        return [(n, p, p.read_bytes()) for n, p in segment_files(directory)]
    finally:
        if fd is not None:
            os.close(fd)


def read_records(directory: Path) -> list[dict[str, Any]]:
    """Every parseable record of a trail folder, oldest first, without opening it for writing."""
    out: list[dict[str, Any]] = []
    for _n, _p, data in read_segments(directory):
        for raw in data.split(b"\n"):
            rec = parse_line(raw) if raw else None
            if rec is not None:
                out.append(rec)
    return out


def read_meta(directory: Path) -> dict[str, Any]:
    """``trail.json`` (which key seals the trail, the policies last recorded); {} if absent."""
    try:
        value = json.loads((Path(directory) / META_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def parse_line(raw: bytes) -> dict[str, Any] | None:
    """One line as its record, or None if it is not a JSON object (a torn or damaged line)."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None
