"""The site's tamper-evident audit trail: hash-chained JSON Lines, sealed with an Ed25519 key.

The privacy officer reads it to see what happened to every file and what left
the site each round; a third party checks it with the site's exported public
key (``medfed audit verify``). Layout of a trail folder:

* ``audit.jsonl`` - the active segment; when it reaches ``segment_records``
  records or ``segment_bytes`` bytes it is sealed, renamed ``audit-000001.jsonl``
  (then ``-000002``...), and a new ``audit.jsonl`` opens with a
  ``segment_opened`` record, so a removed segment breaks the chain visibly.
* ``audit.lock`` - every writer takes an exclusive ``flock`` on it (readers a
  shared one), so many processes can append and roll over safely.
* ``trail.json`` - a cache of which key seals the trail and where it is kept;
  never trusted by verification.

Every record carries ``seq`` (1, 2, 3... across segments), ``time`` (UTC),
``kind`` and ``prev`` (SHA-256 of the previous record's line). A ``seal`` record
is signed over its own line, and so over the whole chain before it: a run ends
with one (:meth:`AuditTrail.close`), long runs seal every ``seal_every`` records
or ``seal_seconds`` seconds. A periodic seal never ends a run (``close`` seals
again after one), so verification can tell a finished run from a trail cut back
to a periodic seal. Callers must only put pseudonyms, digests and
counts in it (docs/design.md invariant 4): nothing here can tell an identifier from a value.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anonymization.audit.keys import (
    ALGORITHM,
    AuditError,
    AuditKeyError,
    AuditSigner,
    b64,
    check_location,
    load_or_create_signing_key,
    load_signing_key,
    write_private_key,
)
from anonymization.audit.records import (
    AUDIT_FILE,
    FORMAT,
    GENESIS,
    KIND_KEY_CREATED,
    KIND_KEY_ROTATED,
    KIND_POLICY,
    KIND_SEAL,
    KIND_SEGMENT,
    KIND_TORN,
    LOCK_FILE,
    META_FILE,
    SEAL_DOMAIN,
    SEAL_END,
    SEAL_PERIODIC,
    SEAL_ROLLOVER,
    SEAL_ROTATION,
    SEGMENT_NAME,
    TRAIL_KINDS,
    encode,
    line_hash,
    parse_line,
    read_meta,
    rotation_message,
    segment_files,
    utc_now,
)
from anonymization.audit.verify import verify_trail
from medfed.files import fsync_dir, write_text

__all__ = ["AuditTrail", "open_trail", "resolve_key_path"]

#: Fields the trail sets on every record itself; a caller's fields must not shadow them.
_RESERVED = frozenset({"seq", "time", "kind", "prev", "sig"})


def _write_meta(directory: Path, meta: Mapping[str, Any]) -> None:
    write_text(Path(directory) / META_FILE, json.dumps(dict(meta), indent=1, sort_keys=True) + "\n", mode=None)


@dataclass
class _Tail:
    """Where the trail ends, cached between appends while the active file is unchanged."""

    seq: int = 0
    prev: str = GENESIS
    last_kind: str = ""
    last_reason: str = ""  # of the last record, when it is a seal
    segment: int = 1  # number the active segment gets when it is closed
    ino: int | None = None  # active file, None while it does not exist
    size: int = 0
    count: int = 0  # records in the active segment
    newline: bool = False  # the active file ends in a torn line without "\n"
    torn: bytes | None = None  # that torn line, when it is not a record
    needs_opening: bool = False  # closed segments exist and the active one lacks its opening record


def _last_record(data: bytes) -> tuple[bytes | None, bytes | None, int]:
    """(last record line, torn tail that is not a record, number of record lines) of a segment."""
    lines = data.split(b"\n")
    torn = None
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines and parse_line(lines[-1]) is None:
        torn = lines.pop()
    last = None
    count = 0
    for raw in lines:
        if parse_line(raw) is not None:
            last = raw
            count += 1
    return last, torn, count


class AuditTrail:
    """A trail folder (see the module docstring); ``append`` may be called from many processes.

    Without a ``signer`` the trail can be appended to but not sealed (tests, read-only use);
    every site command passes one (see :func:`open_trail`). Use it as a context manager, or
    call :meth:`close`, so that the run ends with a seal.
    """

    def __init__(
        self,
        directory: Path,
        *,
        fsync: bool = True,
        signer: AuditSigner | None = None,
        seal_every: int = 1000,
        seal_seconds: float = 300.0,
        segment_records: int = 100_000,
        segment_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.directory = Path(directory)
        self.path = self.directory / AUDIT_FILE
        self.fsync = fsync
        self.signer = signer
        self.seal_every = max(1, int(seal_every))
        self.seal_seconds = float(seal_seconds)
        self.segment_records = max(2, int(segment_records))
        self.segment_bytes = int(segment_bytes)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._tail_cache: _Tail | None = None
        self._unsealed = 0
        self._last_seal = time.monotonic()
        if signer is not None:
            if signer.path is not None:
                check_location(signer.path, [self.directory])
            with self._locked():
                self._adopt(signer)

    # ---- public API -------------------------------------------------------------------
    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append one record (``seq``/``time``/``prev`` are assigned here) and return it.

        Seals periodically and rolls the segment over when it is full (with a signer).
        """
        clash = _RESERVED.intersection(fields)
        if clash:
            raise ValueError(f"audit fields reserved by the trail: {sorted(clash)}")
        if kind in TRAIL_KINDS:
            raise ValueError(f"record kind {kind!r} is reserved by the trail; use another name")
        with self._locked():
            self._prepare()
            record = self._emit(kind, fields)
            self._unsealed += 1
            if self.signer is not None:
                tail = self._tail()
                if tail.count >= self.segment_records or tail.size >= self.segment_bytes:
                    self._rollover()
                elif self._unsealed >= self.seal_every or time.monotonic() - self._last_seal >= self.seal_seconds:
                    self._seal(SEAL_PERIODIC)
            if self.fsync:
                self._sync_active()
        return record

    def seal(self, reason: str = SEAL_END) -> dict[str, Any] | None:
        """Sign the chain up to here; None if the last record is already a seal that says as much.

        A periodic seal does not end a run: an end-of-run seal follows it, so that verification
        can tell a finished run from one cut back to a periodic seal.
        """
        if self.signer is None:
            raise AuditKeyError("this audit trail was opened without a signing key; open it with open_trail()")
        with self._locked():
            self._prepare()
            tail = self._tail()
            if tail.last_kind == KIND_SEAL and (tail.last_reason != SEAL_PERIODIC or reason == SEAL_PERIODIC):
                return None
            return self._seal(reason)

    def close(self) -> None:
        """End the run: seal what this trail holds unsealed (if it has a signer) and sync."""
        if self.signer is not None:
            self.seal(SEAL_END)
        self.sync()

    def __enter__(self) -> AuditTrail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record_policy(self, scope: str, settings: Mapping[str, Any]) -> dict[str, Any] | None:
        """Record ``settings`` (no identifiers) as the ``scope`` policy in force, if it changed.

        The record carries the settings and their SHA-256, so the report can say which
        policy was in force and when it changed.
        """
        canonical = json.dumps(dict(settings), sort_keys=True, separators=(",", ":"), default=str)
        digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        with self._locked():
            meta = read_meta(self.directory)
            policies = dict(meta.get("policies") or {})
            previous = policies.get(scope)
            if previous == digest:
                return None
            self._prepare()
            record = self._emit(
                KIND_POLICY,
                {
                    "scope": scope,
                    "digest": digest,
                    "previous_digest": previous or "",
                    "settings": json.loads(canonical),
                },
            )
            policies[scope] = digest
            _write_meta(self.directory, {**meta, "policies": policies})
        return record

    def rotate_key(self) -> AuditSigner:
        """Replace the signing key: the old key seals, vouches for the new one, the new key seals.

        The new private key replaces the old one in its file (the old one is gone); the
        trail keeps both public keys, so older seals still verify.
        """
        old = self.signer
        if old is None or old.path is None:
            raise AuditKeyError("rotating needs the trail's current signing key file (--audit-key)")
        staged = old.path.with_name(old.path.name + ".new")
        new = AuditSigner.generate(old.path)
        try:
            write_private_key(staged, new)
        except FileExistsError:
            raise AuditKeyError(
                f"{staged} exists: an earlier rotation was interrupted. If the trail's key is the one in "
                f"{staged} (`medfed audit verify` names it), move it over {old.path}; otherwise delete it, then retry"
            ) from None
        with self._locked():
            self._prepare()
            self._check_current_key()
            if self._tail().last_kind != KIND_SEAL:
                self._seal(SEAL_ROTATION)
            endorsement = old.sign(rotation_message(old.key_id, new.public_raw))
            self._emit(
                KIND_KEY_ROTATED,
                {
                    "key_id": new.key_id,
                    "algorithm": ALGORITHM,
                    "public_key": b64(new.public_raw),
                    "previous_key_id": old.key_id,
                    "endorsement": endorsement.hex(),
                },
            )
            meta = read_meta(self.directory)
            meta.update(key_id=new.key_id, public_key=b64(new.public_raw))
            _write_meta(self.directory, meta)
            os.replace(staged, old.path)
            self.signer = new
            self._seal(SEAL_ROTATION)
        return new

    def head(self) -> tuple[int, str]:
        """(number, line hash) of the trail's last record: what the next record's ``prev`` will hold,
        and what a reply anchors off-site (:mod:`anonymization.audit.anchors`)."""
        with self._locked(shared=True):
            tail = self._tail()
            return tail.seq, tail.prev

    def sync(self) -> None:
        """Force appended records to disk (for callers that append with ``fsync=False``)."""
        if self.path.exists():
            self._sync_active()

    def records(self, *, everything: bool = False) -> list[dict[str, Any]]:
        """The records callers appended, oldest first (torn lines skipped).

        With ``everything``, also the trail's own records (seals, keys, segments, policies).
        """
        return [r for r in self.iter_records() if everything or r.get("kind") not in TRAIL_KINDS]

    def iter_records(self) -> Iterator[dict[str, Any]]:
        """Every parseable record of every segment, in order (a shared lock while listing)."""
        with self._locked(shared=True):
            files = segment_files(self.directory)
            blobs = [path.read_bytes() for _n, path in files]
        for data in blobs:
            for raw in data.split(b"\n"):
                if raw:
                    rec = parse_line(raw)
                    if rec is not None:
                        yield rec

    def verify(self, public_key: bytes | None = None) -> bool:
        """True if the chain, every segment and every seal check (see :mod:`anonymization.audit.verify`)."""
        return verify_trail(self.directory, public_key=public_key).ok

    # ---- locking and the tail -------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, shared: bool = False) -> Iterator[None]:
        """Hold the trail's ``flock``; opened per use, so a forked child never shares the parent's."""
        path = self.directory / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        except OSError:
            if not shared:
                raise
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:  # a read-only copy of a trail: read without a lock
                yield
                return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _tail(self) -> _Tail:
        """Where the trail ends (lock held): cached while the active file's inode and size hold."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        cached = self._tail_cache
        if cached is not None:
            if st is None and cached.ino is None:
                return cached  # no active file yet (new trail, or just rolled over by us)
            if st is not None and cached.ino == st.st_ino and cached.size == st.st_size:
                return cached
        tail = _Tail()
        files = segment_files(self.directory)
        closed = [(n, p) for n, p in files if p.name != AUDIT_FILE]
        tail.segment = (closed[-1][0] if closed else 0) + 1
        last: bytes | None = None
        if st is not None and st.st_size > 0:
            data = self.path.read_bytes()
            last, tail.torn, tail.count = _last_record(data)
            tail.newline = not data.endswith(b"\n")
            tail.ino, tail.size = st.st_ino, st.st_size
            if tail.count == 0 and closed:
                tail.needs_opening = True
        elif st is not None:
            tail.ino, tail.size = st.st_ino, 0
            tail.needs_opening = bool(closed)
        else:
            tail.needs_opening = bool(closed)
        if last is None and closed:
            last, _torn, _count = _last_record(closed[-1][1].read_bytes())
        if last is not None:
            record = parse_line(last) or {}
            tail.seq = int(record.get("seq", 0))
            tail.prev = line_hash(last)
            tail.last_kind = str(record.get("kind", ""))
            tail.last_reason = str(record.get("reason", "")) if tail.last_kind == KIND_SEAL else ""
        self._tail_cache = tail
        return tail

    def _write(self, data: bytes, tail: _Tail) -> None:
        """Append bytes to the active file (lock held) and move the cached tail along."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            st = os.fstat(fd)
        finally:
            os.close(fd)
        tail.ino, tail.size = st.st_ino, st.st_size

    def _sync_active(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _emit(self, kind: str, fields: Mapping[str, Any], *, sign: bool = False) -> dict[str, Any]:
        """Write one record after the current tail (lock held); seals are signed over their line."""
        tail = self._tail()
        record: dict[str, Any] = {"seq": tail.seq + 1, "time": utc_now(), "kind": kind, "prev": tail.prev}
        record.update(fields)
        raw = encode(record)
        if sign:
            assert self.signer is not None
            signature = self.signer.sign(SEAL_DOMAIN + raw)
            raw = raw[:-1] + b',"sig":"' + signature.hex().encode("ascii") + b'"}'
            record["sig"] = signature.hex()
        self._write(raw + b"\n", tail)
        tail.seq, tail.prev, tail.last_kind = record["seq"], line_hash(raw), kind
        tail.last_reason = str(fields.get("reason", "")) if kind == KIND_SEAL else ""
        tail.count += 1
        return record

    def _prepare(self) -> None:
        """Before writing (lock held): close a torn line, account for it, open a new segment."""
        tail = self._tail()
        if tail.newline:
            self._write(b"\n", tail)  # never glue a record onto a torn line
            tail.newline = False
        if tail.torn is not None:
            torn, tail.torn = tail.torn, None
            self._emit(KIND_TORN, {"torn_bytes": len(torn), "torn_sha256": hashlib.sha256(torn).hexdigest()})
        if tail.needs_opening:
            tail.needs_opening = False
            self._emit(KIND_SEGMENT, {"segment": tail.segment})

    def _seal(self, reason: str, **extra: Any) -> dict[str, Any]:
        """Append a signed seal (lock held) and make it durable."""
        assert self.signer is not None
        self._check_current_key()
        record = self._emit(KIND_SEAL, {"key_id": self.signer.key_id, "reason": reason, **extra}, sign=True)
        self._sync_active()
        self._unsealed = 0
        self._last_seal = time.monotonic()
        return record

    def _rollover(self) -> None:
        """Seal and close the active segment, then open the next one (lock held)."""
        tail = self._tail()
        number = tail.segment
        self._seal(SEAL_ROLLOVER, segment=number)
        target = self.directory / SEGMENT_NAME.format(number)
        if target.exists():
            raise AuditError(f"cannot close segment {number}: {target} already exists; the trail folder is damaged")
        os.rename(self.path, target)
        fsync_dir(self.directory)
        tail.segment, tail.ino, tail.size, tail.count = number + 1, None, 0, 0
        self._emit(KIND_SEGMENT, {"segment": number + 1})
        self._sync_active()

    # ---- keys -----------------------------------------------------------------------------
    def _adopt(self, signer: AuditSigner) -> None:
        """Make ``signer`` this trail's key (lock held): refuse another key, record a new one."""
        meta = read_meta(self.directory)
        current = meta.get("key_id") or self._scan_key_id()
        if current and current != signer.key_id:
            hint = ""
            if signer.path is not None and signer.path.with_name(signer.path.name + ".new").exists():
                hint = f" ({signer.path}.new is left from an interrupted rotation: it may hold key {current})"
            raise AuditKeyError(
                f"the audit trail {self.directory} is sealed with key {current}, but {signer.path or 'the given key'} "
                f"holds key {signer.key_id}{hint}; pass the site's audit key (--audit-key, or audit-key in site.toml). "
                "If that key is lost, start a new trail folder: a trail cannot change keys except by "
                "`medfed audit rotate-key`"
            )
        if not current:
            self._prepare()
            self._emit(
                KIND_KEY_CREATED,
                {"key_id": signer.key_id, "algorithm": ALGORITHM, "public_key": b64(signer.public_raw)},
            )
        if meta.get("key_id") != signer.key_id or not meta.get("signing_key"):
            meta.update(format=FORMAT, key_id=signer.key_id, public_key=b64(signer.public_raw))
            if signer.path is not None:
                meta["signing_key"] = str(Path(signer.path).resolve())
            _write_meta(self.directory, meta)

    def _scan_key_id(self) -> str:
        """The key in force according to the records (when ``trail.json`` is missing)."""
        current = ""
        for rec in self.iter_records_unlocked():
            kind = rec.get("kind")
            if (kind == KIND_KEY_CREATED and not current) or kind == KIND_KEY_ROTATED:
                current = str(rec.get("key_id", ""))
        return current

    def iter_records_unlocked(self) -> Iterator[dict[str, Any]]:
        """Like :meth:`iter_records`, for callers that already hold the lock."""
        for _n, path in segment_files(self.directory):
            for raw in path.read_bytes().split(b"\n"):
                rec = parse_line(raw) if raw else None
                if rec is not None:
                    yield rec

    def _check_current_key(self) -> None:
        """Before signing: follow a rotation done by another process, or refuse a stale key."""
        assert self.signer is not None
        meta_id = read_meta(self.directory).get("key_id")
        if not meta_id or meta_id == self.signer.key_id:
            return
        if self.signer.path is not None:
            try:
                fresh = load_signing_key(self.signer.path)
            except AuditKeyError:
                fresh = None
            if fresh is not None and fresh.key_id == meta_id:
                self.signer = fresh
                return
        raise AuditKeyError(
            f"the audit trail {self.directory} is now sealed with key {meta_id} (rotated), not {self.signer.key_id}; "
            "reopen the trail with the current audit key"
        )


def resolve_key_path(directory: Path, explicit: Path | None, default: Path) -> Path:
    """Which key file seals the trail: ``explicit``, else the one the trail records, else ``default``.

    The trail records its key file when the first writer creates it, so de-identification
    (default: next to the site secret) and the site client (default: its state folder)
    sealing the same trail folder find the same key without configuration.
    """
    if explicit is not None:
        return Path(explicit)
    recorded = read_meta(directory).get("signing_key")
    if recorded:
        return Path(recorded)
    return Path(default)


def open_trail(
    directory: Path,
    *,
    audit_key: Path | None,
    default_key: Path,
    forbidden: tuple[Path, ...] = (),
    **options: Any,
) -> AuditTrail:
    """Open a trail with the site's signing key (see :func:`resolve_key_path`), creating the key
    only for a trail that has none yet. ``forbidden``: folders the key must not lie in (DST)."""
    directory = Path(directory)
    path = resolve_key_path(directory, audit_key, default_key)
    meta = read_meta(directory)
    if meta.get("key_id") and not path.exists():
        raise AuditKeyError(
            f"the audit trail {directory} is sealed with key {meta['key_id']}, kept at {path}, which does not exist; "
            "restore that file from the site's backup or pass it with --audit-key (audit-key in site.toml)"
        )
    signer, _created = load_or_create_signing_key(path, forbidden=(*forbidden, directory))
    return AuditTrail(directory, signer=signer, **options)

