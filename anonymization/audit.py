"""An append-only, hash-chained JSON-lines audit trail, safe for several processes.

The privacy officer reads it to see what happened to every file and what left
the site each round. Each record carries ``seq``, ``time`` (UTC) and ``prev``
(the SHA-256 of the previous line), so a removed or edited line is detectable
with :meth:`AuditTrail.verify`. Callers must only put pseudonyms, digests and
counts in it (invariant 4): nothing here can tell an identifier from a value.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64
_RESERVED = frozenset({"seq", "time", "kind", "prev"})


def utc_now() -> str:
    """Current UTC time, ISO 8601 with milliseconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class AuditTrail:
    """``<directory>/audit.jsonl``; every append takes an exclusive ``flock`` on the file."""

    def __init__(self, directory: Path, *, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self.path = self.directory / AUDIT_FILE
        self.fsync = fsync
        self.directory.mkdir(parents=True, exist_ok=True)

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append one record (``seq``/``time``/``prev`` are assigned here) and return it."""
        clash = _RESERVED.intersection(fields)
        if clash:
            raise ValueError(f"audit fields reserved by the trail: {sorted(clash)}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        with os.fdopen(fd, "r+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                last = _last_line(fh)
                if last is None:
                    seq, prev = 1, GENESIS
                else:
                    seq = int(json.loads(last).get("seq", 0)) + 1
                    prev = hashlib.sha256(last).hexdigest()
                record: dict[str, Any] = {"seq": seq, "time": utc_now(), "kind": kind, "prev": prev}
                record.update(fields)
                line = json.dumps(record, sort_keys=False, separators=(",", ":"), default=str)
                fh.seek(0, os.SEEK_END)
                if fh.tell() > 0 and last is not None and not _ends_with_newline(fh):
                    fh.write(b"\n")  # a torn line from a crash: never glue onto it
                fh.write(line.encode("utf-8") + b"\n")
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return record

    def sync(self) -> None:
        """Force appended records to disk (for callers that append with ``fsync=False``)."""
        if self.path.exists():
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def records(self) -> list[dict[str, Any]]:
        """All complete records, oldest first (a torn last line is ignored)."""
        if not self.path.exists():
            return []
        out = []
        for raw in self.path.read_bytes().splitlines():
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
        return out

    def verify(self) -> bool:
        """True if every record chains to the previous line and ``seq`` runs 1, 2, 3..."""
        if not self.path.exists():
            return True
        prev, expected = GENESIS, 1
        for raw in self.path.read_bytes().splitlines():
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                return False
            if record.get("prev") != prev or record.get("seq") != expected:
                return False
            prev, expected = hashlib.sha256(raw).hexdigest(), expected + 1
        return True


def _ends_with_newline(fh: Any) -> bool:
    fh.seek(-1, os.SEEK_END)
    return fh.read(1) == b"\n"


def _last_line(fh: Any) -> bytes | None:
    """The last complete, parseable line of the file (reads backwards in blocks)."""
    fh.seek(0, os.SEEK_END)
    end = fh.tell()
    if end == 0:
        return None
    block = 65536
    pos = end
    tail = b""
    while pos > 0:
        step = min(block, pos)
        pos -= step
        fh.seek(pos)
        tail = fh.read(step) + tail
        lines = tail.splitlines()
        # Need at least one full line not cut at the start of the buffer.
        candidates = lines[1:] if pos > 0 else lines
        for raw in reversed(candidates):
            if not raw.strip():
                continue
            try:
                json.loads(raw)
                return raw
            except json.JSONDecodeError:
                continue
    return None
