"""``medfed site receive``: a DICOM Storage SCP that de-identifies images as they arrive.

A PACS (or a modality) sends studies by C-STORE; each instance is written to a
private spool file, de-identified by the engine of ``medfed deid run``
(:func:`anonymization.worker.process_path`, the same policy, key, audit trail,
quarantine, done-index journal and manifest), renamed into the store, made
durable, and only then answered with Success. The raw spool file is deleted in
every outcome, so no original outlives its de-identified copy:

* Success (0x0000) only after the output and its journal line are on disk;
* Out of Resources (0xA700) when the disk is past the watermark or full: nothing
  is kept, the sender retries later;
* Cannot Understand (0xC000) when the file cannot be de-identified safely: the
  raw file goes to the quarantine (as with ``deid run``) with the reason.

The same SOP instance sent twice yields one output. A study with no new instance
for ``study_timeout`` seconds is recorded complete in the audit trail (and the
manifest rewritten); an instance that arrives for a completed study is added and
recorded as late, never merged silently. Calling AE titles outside the allowed
list are refused at association; with TLS, so is every client whose certificate
was not issued by the given CA.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anonymization import screening
from anonymization.audit import AuditError, AuditTrail, open_trail, read_records, resolve_key_path
from anonymization.audit.keys import SIGNING_KEY_NAME
from anonymization.batch import (
    DoneIndex,
    FileTask,
    check_store,
    file_sha256,
    isolated,
    key_fingerprint,
    lies_inside,
    new_pool,
    sweep_temporaries,
    written_this_run,
)
from anonymization.engine import MEDFED_VERSION
from anonymization.errors import DeidError, is_disk_full
from anonymization.keys import load_or_create_secret
from anonymization.labels import read_labels
from anonymization.manifest import MANIFEST_FILE, write_merged
from anonymization.policy import Policy, load_policy
from anonymization.pseudonyms import Pseudonymizer
from anonymization.quarantine import Quarantine
from anonymization.reid import open_for_run as open_reid_for_run
from anonymization.worker import (
    IMAGES_DIR,
    KIND_DEIDENTIFIED,
    KIND_DISK_FULL,
    KIND_DONE,
    KIND_QUARANTINED,
    KIND_SKIPPED,
    FileResult,
    Job,
    init_worker,
    is_done,
    load_done_index,
    process_path,
)
from anonymization.writer import file_meta_bytes

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # C-STORE "Refused: Out of Resources": the sender may retry later
STATUS_CANNOT_DEIDENTIFY = 0xC000  # C-STORE "Error: Cannot understand": quarantined, never stored

DEFAULT_STUDY_TIMEOUT = 60.0
DEFAULT_MIN_FREE = 1 << 30  # refuse (0xA700) once the store's or the spool's disk has less than this free
# The largest PDU we ask senders for. Larger PDUs mean fewer per instance (pynetdicom decodes each in
# Python); DCMTK's storescu sends at most 128 KiB whatever we allow. A bound, not "unlimited", so that
# a conforming sender never makes pynetdicom buffer a huge instance as one PDU; a sender that ignores
# it is not stopped by it (pynetdicom does not enforce it on receipt): see docs/deployment.md.
MAX_PDU_BYTES = 1 << 20
SPOOL_SUFFIX = ".part"

KIND_STARTED = "intake_started"
KIND_STOPPED = "intake_stopped"
KIND_REFUSED = "intake_refused"  # out of resources: nothing kept
KIND_SPOOL_CLEARED = "intake_spool_cleared"
KIND_STUDY_COMPLETE = "study_complete"
KIND_RECOVERED = "intake_recovered"  # done-index lines rebuilt at start from the trail and the durable outputs
REASON_DUPLICATE_RECEIVED = "the same SOP instance was received before; one output kept"
REASON_ALREADY_DONE = "already de-identified (done-index)"
_SAFE_AE = re.compile(r"[^A-Za-z0-9_-]")


class IntakeError(DeidError):
    """Bad arguments to the intake (ports, certificates, folders); the message says what to do."""


@dataclass
class Outcome:
    """What one received instance came to: the DIMSE status and, for the audit trail, why."""

    status: int
    kind: str
    reason: str = ""
    late: bool = False


@dataclass
class _Study:
    patient: str
    last: float
    instances: int = 0
    late: int = 0


@dataclass
class IntakeCounts:
    received: int = 0
    deidentified: int = 0
    duplicates: int = 0
    quarantined: int = 0
    refused: int = 0  # out of resources
    late: int = 0
    studies_completed: int = 0

    def line(self) -> str:
        return (f"received {self.received}: de-identified {self.deidentified} (late {self.late}), "
                f"duplicates {self.duplicates}, quarantined {self.quarantined}, refused for space {self.refused}; "
                f"studies completed {self.studies_completed}")


def parse_size(text: str) -> int:
    """``"500M"``, ``"2G"``, ``"1048576"`` -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if match is None:
        raise IntakeError(f"--min-free {text!r} is not a size; write e.g. 500M, 2G or a number of bytes")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``folder``."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


class Intake:
    """The de-identifying store behind the SCP: received instances in, statuses out, no network.

    Thread-safe: every association's handler calls :meth:`receive`. Instances are
    de-identified in ``workers`` forked processes (as ``deid run --workers``), so
    several associations use several cores; with one worker the engine runs here,
    one instance at a time. Placing outputs and writing the records (trail,
    journal) is serialised by a lock, and a committer thread makes the outputs of
    every instance placed meanwhile durable together (group commit) before their
    handlers answer.
    """

    def __init__(
        self,
        dst: Path,
        key_file: Path,
        *,
        policy: Policy | Path | None = None,
        labels: Path | None = None,
        quarantine: Path | None = None,
        audit: Path | None = None,
        audit_key: Path | None = None,
        spool: Path | None = None,
        min_free_bytes: int = DEFAULT_MIN_FREE,
        study_timeout: float = DEFAULT_STUDY_TIMEOUT,
        clock: Any = time.monotonic,
        workers: int | None = None,
    ) -> None:
        self.dst, self.key_file = Path(dst), Path(key_file)
        beside = self.dst.parent
        self.quarantine_dir = Path(quarantine) if quarantine is not None else beside / f"{self.dst.name}-quarantine"
        self.spool_dir = Path(spool) if spool is not None else beside / f"{self.dst.name}-spool"
        self.audit_key = Path(audit_key) if audit_key is not None else None
        self.audit_dir = Path(audit) if audit is not None else self.dst / "audit"
        self.labels = Path(labels) if labels is not None else None
        self.min_free_bytes = int(min_free_bytes)
        self.study_timeout = float(study_timeout)
        self.counts = IntakeCounts()
        self._clock = clock
        self._lock = threading.Lock()
        self._studies: dict[str, _Study] = {}
        self._completed: set[str] = set()
        self._manifest_stale = False
        self._closed = True
        if self.dst.exists() and not self.dst.is_dir():
            raise IntakeError(f"destination {self.dst} exists and is not a folder")
        if self.study_timeout <= 0:
            raise IntakeError("--study-timeout must be more than 0 seconds")
        if self.min_free_bytes < 0:
            raise IntakeError("--min-free must not be negative")
        for name, folder in (("quarantine", self.quarantine_dir), ("spool", self.spool_dir)):
            if lies_inside(folder, self.dst):
                raise IntakeError(f"the {name} {folder} lies inside the destination {self.dst}: it holds raw, "
                                  f"identifying files; choose a folder outside the destination (--{name})")
        if lies_inside(self.key_file, self.dst):
            raise IntakeError(f"the key file {self.key_file} lies inside the destination {self.dst}; the site "
                              "secret must never be stored with de-identified data: keep it elsewhere")
        self._policy_arg = policy
        self.workers = int(workers) if workers is not None else max(1, os.cpu_count() or 1)
        if self.workers < 1:
            raise IntakeError("--workers must be at least 1")
        self._pool: ProcessPoolExecutor | None = None
        self._engine_lock = threading.Lock()  # one worker: the engine in this process, one caller at a time
        self._commits: _GroupCommit | None = None
        self._recovered = 0

    # ---- life cycle -------------------------------------------------------------------
    def open(self) -> Intake:
        """Set the store up as ``deid run`` does, clear the spool, open the trail; record the start."""
        secret = load_or_create_secret(self.key_file)
        self._secret = secret
        pseudo = Pseudonymizer(secret)
        policy = self._policy_arg
        self.policy = policy if isinstance(policy, Policy) else load_policy(policy)
        self.label_table = (read_labels(self.labels, pseudo, retain_uids=self.policy.retain_uids)
                            if self.labels is not None else None)
        if self.policy.clean_pixel_data:
            from anonymization.pixels import REASON_NO_OCR, tesseract_available

            if not tesseract_available():
                raise IntakeError(REASON_NO_OCR)
        audit_key_path = resolve_key_path(self.audit_dir, self.audit_key, self.key_file.parent / SIGNING_KEY_NAME)
        try:
            self.reid_writer, reid_key_pem = open_reid_for_run(self.policy, None, self.dst)
            self.dst.mkdir(parents=True, exist_ok=True)
            check_store(self.dst, secret, self.policy.applied_options)
            sweep_temporaries(self.dst)
            leftovers = self._clear_spool()
            flush = getattr(self.reid_writer, "flush", None)
            self.done = DoneIndex(self.dst, secret, self.policy, before_commit=flush if callable(flush) else None)
            records = read_records(self.audit_dir) if self.audit_dir.is_dir() else []
            self._completed = {str(r.get("study")) for r in records
                               if r.get("kind") == KIND_STUDY_COMPLETE and r.get("study")}
            self._recovered = self._catch_up(records)
            del records
            self.job = Job(secret=secret, dst=str(self.dst.resolve()), options=self.policy.table_options,
                           policy=self.policy, reid_public_key=reid_key_pem, done_index=str(self.done.path))
            self._start_engine()  # forked before the trail opens: the workers never hold its signing key
            self.trail: AuditTrail = open_trail(self.audit_dir, audit_key=None, default_key=audit_key_path,
                                                forbidden=(self.dst,), fsync=False)
        except AuditError as err:
            self._stop_engine()
            raise IntakeError(str(err)) from None
        except OSError as err:
            self._stop_engine()
            raise IntakeError(f"cannot set up {err.filename or self.dst} ({err.strerror or err}): choose folders "
                              "the site account can write to") from None
        if self.reid_writer is not None:
            self.reid_writer.use_signer(self.trail.signer)
        self.trail.record_policy("deidentification", {**self.policy.model_dump(mode="json", exclude={"reid"}),
                                                      "reid_table": self.policy.reid is not None,
                                                      "tool": f"medfed {MEDFED_VERSION}"})
        if leftovers:
            self.trail.append(KIND_SPOOL_CLEARED, files=leftovers,
                              reason="raw files left by an earlier intake that stopped; never stored")
        if self._recovered:
            self.trail.append(KIND_RECOVERED, instances=self._recovered,
                              reason="acknowledged instances whose done-index lines a crash lost; rebuilt from "
                                     "the trail and the durable outputs")
            self._manifest_stale = True
        self.quarantine = Quarantine(self.quarantine_dir)
        self._commits = _GroupCommit(self)
        self._closed = False
        return self

    def started(self, **fields: Any) -> None:
        """Record the listener's settings (AE titles, TLS, port: no identifier) in the trail."""
        with self._lock:
            self.trail.append(KIND_STARTED, **fields, study_timeout=self.study_timeout,
                              min_free_bytes=self.min_free_bytes, key_fingerprint=key_fingerprint(self._secret))
            self.trail.sync()

    def close(self) -> IntakeCounts:
        """Rewrite the manifest, record the stop with the counts and seal the trail."""
        with self._lock:
            if self._closed:
                return self.counts
            self._closed = True  # handlers still in flight answer "shutting down" from here on
        if self._commits is not None:
            self._commits.close()  # the last batch becomes durable (its handlers answer) first
        self._stop_engine()
        with self._lock:
            open_studies, manifest_current = len(self._studies), False
            try:
                manifest_current = self._write_manifest()
            finally:
                if self.reid_writer is not None:
                    self.reid_writer.close()
                try:  # the journal's lines were appended unsynced (the trail and the outputs can rebuild them)
                    self.done.sync()
                except OSError as err:
                    log.warning("the done-index could not be synced (%s); the next start rebuilds it from the trail",
                                err.strerror or err)
                self.trail.append(KIND_STOPPED, **vars(self.counts), studies_open=open_studies,
                                  manifest_current=manifest_current, key_fingerprint=key_fingerprint(self._secret))
                self.trail.close()
        return self.counts

    def __enter__(self) -> Intake:
        return self.open() if self._closed else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start_engine(self) -> None:
        """The de-identification engine: forked worker processes, or this process for one worker."""
        if self.workers > 1:
            self._pool = new_pool(self.job, self.workers, fork=True)
        else:
            init_worker(self.job)

    def _stop_engine(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _catch_up(self, records: list[dict[str, Any]]) -> int:
        """Journal lines a crash lost, rebuilt from the trail and the outputs on disk; how many.

        An instance is answered Success once its output and its trail record are durable; its
        done-index line is appended without a flush of its own (:class:`_GroupCommit`). After a
        crash the trail says which received instances were placed (``input_digest``, ``path``);
        each whose output is on disk and whose digest the journal lacks gets its line back, the
        manifest row read from the de-identified output itself.
        """
        placed = {str(r["input_digest"]): str(r["path"]) for r in records
                  if r.get("kind") == KIND_DEIDENTIFIED and r.get("via") == "dicom"
                  and r.get("input_digest") and r.get("path")}
        if not placed:
            return 0
        index = load_done_index(self.done.path)
        lines = []
        for digest, rel in placed.items():
            if is_done(index, digest):
                continue
            row = _row_of_output(self.dst, rel)
            if row is not False:
                line = DoneIndex.line(digest, row or None)
                if line is not None:
                    lines.append(line)
        self.done.append(lines)
        if lines:
            log.warning("rebuilt %d done-index line(s) a crash had lost (from the trail and the outputs)", len(lines))
        return len(lines)

    # ---- one instance -----------------------------------------------------------------
    def receive(self, data: bytes, calling_ae: str = "") -> Outcome:
        """De-identify one received instance (DICOM file bytes); the status to answer with.

        Success only once the de-identified output (its bytes, its name) and its trail record are
        on disk; the flush is shared with every instance placed meanwhile (:class:`_GroupCommit`).
        """
        with self._lock:
            if self._closed:
                return Outcome(STATUS_OUT_OF_RESOURCES, KIND_REFUSED, "the intake is shutting down")
            self.counts.received += 1
            if self._low_on_space(len(data)):
                return self._refuse("", f"less than {self.min_free_bytes} bytes would be left free on the store's "
                                    "or the spool's disk (watermark)")
        spool = self.spool_dir / f"{secrets.token_hex(8)}{SPOOL_SUFFIX}"
        try:
            try:
                fd = os.open(spool, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            except OSError as err:
                with self._lock:
                    return self._refuse("", f"the spool could not hold the instance ({err.strerror or err})")
            result = self._deidentify(spool)
            with self._lock:
                if self._closed:
                    if result.tmp_path:
                        Path(result.tmp_path).unlink(missing_ok=True)
                    return Outcome(STATUS_OUT_OF_RESOURCES, KIND_REFUSED, "the intake is shutting down")
                outcome, pending = self._commit(result, spool, calling_ae)
            if pending is None:
                return outcome
            try:
                pending.wait()
            except OSError as err:
                with self._lock:
                    return self._undo(pending, result, err)
            with self._lock:
                self._settle(pending)
            return outcome
        finally:
            spool.unlink(missing_ok=True)  # the original never outlives this call

    def _deidentify(self, spool: Path) -> FileResult:
        """The engine's result for the spool file: from a worker process, or here for one worker."""
        pool = self._pool
        if pool is None:
            with self._engine_lock:
                return process_path(str(spool))
        try:
            return pool.submit(process_path, str(spool)).result()
        except Exception:  # noqa: BLE001 - a worker died (BrokenProcessPool): find out whether this file did it
            if self._closed:  # the pool was shut down under us: nothing stored, the sender retries
                raise
            log.warning("a de-identification worker died; running the instance alone to tell")
            with self._engine_lock:
                if self._pool is pool and not self._closed:
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = new_pool(self.job, self.workers, fork=False)
            return isolated(FileTask(spool, spool.name), self.job, process_path)

    def _commit(self, result: FileResult, spool: Path, calling_ae: str) -> tuple[Outcome, _Pending | None]:
        """Place the output and record it (lock held); the pending flush its Success waits for."""
        if result.kind == KIND_DISK_FULL:
            return self._refuse(result.input_digest, f"the store's disk is full ({result.reason})"), None
        if result.kind == KIND_DONE:
            self.trail.append(KIND_SKIPPED, input_digest=result.input_digest, reason=REASON_ALREADY_DONE,
                              via="dicom", calling_ae=calling_ae)
            self.counts.duplicates += 1
            return Outcome(STATUS_SUCCESS, KIND_SKIPPED, REASON_ALREADY_DONE), None
        if result.kind != KIND_DEIDENTIFIED or result.rel_path is None or result.tmp_path is None:
            return self._quarantine(result, spool, calling_ae, result.reason or screening.REASON_UNREADABLE), None
        target = self.dst / result.rel_path
        tmp = Path(result.tmp_path)
        commits = self._commits
        assert commits is not None
        if written_this_run(target, self.done.mark_ns):  # a resend: one output (its flush may still be pending)
            tmp.unlink(missing_ok=True)
            if file_sha256(target) != result.output_digest:
                return self._quarantine(result, spool, calling_ae, screening.REASON_DUPLICATE), None
            self.trail.append(KIND_SKIPPED, input_digest=result.input_digest, sop_uid=result.sop_uid,
                              reason=REASON_DUPLICATE_RECEIVED, via="dicom", calling_ae=calling_ae)
            pending = commits.submit(_Pending(target, DoneIndex.line(result.input_digest), placed=False))
            return Outcome(STATUS_SUCCESS, KIND_SKIPPED, REASON_DUPLICATE_RECEIVED), pending
        _top, patient, study = result.rel_path.split("/")[:3]
        late = study in self._completed
        try:
            os.replace(tmp, target)
            self.trail.append(
                KIND_DEIDENTIFIED, input_digest=result.input_digest, sop_uid=result.sop_uid, path=result.rel_path,
                actions=result.actions, output_digest=result.output_digest, via="dicom", calling_ae=calling_ae,
                study=study, late=late,
                **({"pixel_cleaning": result.pixel_cleaning} if result.pixel_cleaning else {}),
            )
            if self.reid_writer is not None and result.reid_row is not None:
                self.reid_writer.add(*result.reid_row)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            target.unlink(missing_ok=True)
            if is_disk_full(err):
                return self._refuse(result.input_digest, f"the store's disk is full ({err.strerror})"), None
            raise
        pending = commits.submit(_Pending(target, DoneIndex.line(result.input_digest, result.row), study=study,
                                          patient=patient, late=late))
        return Outcome(STATUS_SUCCESS, KIND_DEIDENTIFIED, late=late), pending

    def _settle(self, pending: _Pending) -> None:
        """The output is durable: count it and keep its study open (lock held)."""
        if not pending.placed:
            self.counts.duplicates += 1
            return
        self._touch(pending.study, pending.patient, pending.late)
        self.counts.deidentified += 1

    def _undo(self, pending: _Pending, result: FileResult, err: OSError) -> Outcome:
        """The flush failed: the output is not known durable, so it goes and the sender retries (lock held)."""
        if pending.placed:
            pending.target.unlink(missing_ok=True)
        what = "full" if is_disk_full(err) else f"failing ({err.strerror or err})"
        return self._refuse(result.input_digest, f"the store's disk is {what}: the output could not be made durable")

    def _quarantine(self, result: FileResult, spool: Path, calling_ae: str, reason: str) -> Outcome:
        relative = f"dicom-{_SAFE_AE.sub('_', calling_ae) or 'unknown'}/{result.input_digest[:32] or spool.stem}.dcm"
        try:
            self.quarantine.add(spool, relative, reason, result.input_digest)
        except OSError as err:
            if is_disk_full(err):
                return self._refuse(result.input_digest, f"the quarantine's disk is full ({err.strerror})")
            raise
        self.trail.append(KIND_QUARANTINED, input_digest=result.input_digest, reason=reason, via="dicom",
                          calling_ae=calling_ae)
        self._sync_records()
        self.counts.quarantined += 1
        log.info("quarantined a received instance %s: %s", result.input_digest[:16], reason)
        return Outcome(STATUS_CANNOT_DEIDENTIFY, KIND_QUARANTINED, reason)

    def _refuse(self, digest: str, reason: str) -> Outcome:
        """Out of resources: nothing kept; the trail says so if the disk still takes a line."""
        self.counts.refused += 1
        log.warning("refused a received instance (0xA700): %s", reason)
        try:
            self.trail.append(KIND_REFUSED, input_digest=digest, reason=reason, status=STATUS_OUT_OF_RESOURCES)
            self.trail.sync()
        except OSError as err:
            log.warning("the audit trail could not record it either (%s)", err.strerror or err)
        return Outcome(STATUS_OUT_OF_RESOURCES, KIND_REFUSED, reason)

    def _sync_records(self, *, synced_dst: bool = False) -> None:
        """The trail is durable before a status goes out (a syncfs of DST covers it when it lives there)."""
        if not synced_dst or not lies_inside(self.audit_dir, self.dst):
            self.trail.sync()

    def _low_on_space(self, incoming: int) -> bool:
        try:
            return min(free_bytes(self.dst), free_bytes(self.spool_dir)) - 2 * incoming < self.min_free_bytes
        except OSError:
            return True

    def _clear_spool(self) -> int:
        """Remove whatever an earlier intake left in the spool (raw files never stored); how many."""
        self.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.spool_dir, 0o700)
        removed = 0
        for entry in os.scandir(self.spool_dir):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed += 1
        return removed

    # ---- studies ----------------------------------------------------------------------
    def _touch(self, study: str, patient: str, late: bool) -> None:
        entry = self._studies.get(study)
        if entry is None:
            entry = self._studies[study] = _Study(patient=patient, last=self._clock())
            self._completed.discard(study)
        entry.last = self._clock()
        entry.instances += 1
        if late:
            entry.late += 1
            self.counts.late += 1
        self._manifest_stale = True

    def check_studies(self) -> list[str]:
        """Record every study idle for ``study_timeout`` as complete; rewrite the manifest if any was."""
        with self._lock:
            if self._closed:
                return []
            now = self._clock()
            idle = [s for s, e in self._studies.items() if now - e.last >= self.study_timeout]
            for study in idle:
                entry = self._studies.pop(study)
                self.trail.append(KIND_STUDY_COMPLETE, study=study, patient=entry.patient, instances=entry.instances,
                                  late_instances=entry.late, idle_seconds=self.study_timeout)
                self._completed.add(study)
                self.counts.studies_completed += 1
            if idle:
                self._write_manifest()
                self.trail.sync()
            return idle

    def _write_manifest(self) -> bool:
        """Rebuild the manifest from the journal; on a full disk keep the old one (the next rewrite catches up)."""
        if not self._manifest_stale and (self.dst / MANIFEST_FILE).exists():
            return True
        journal = self.done.rows()
        try:
            table = self.label_table
            write_merged(self.dst / MANIFEST_FILE, journal, self.dst, labels=table.labels if table else None,
                         label_column=table.column if table else "accession")
        except OSError as err:
            if not is_disk_full(err):
                raise
            log.warning("the manifest could not be rewritten (%s); it catches up once space is freed",
                        err.strerror)
            return False
        finally:
            journal.close()
        self._manifest_stale = False
        return True


def _row_of_output(dst: Path, rel: str) -> dict[str, str] | None | bool:
    """The manifest row of a placed output, read from its de-identified header; None for a non-image
    object (no row); False if the output is not on disk (never made durable: no line)."""
    from pydicom import dcmread

    path = dst / rel
    if not path.is_file():
        return False
    _fsync(path)  # what survived a crash of the process may still be in the page cache only
    if not rel.startswith(f"{IMAGES_DIR}/"):
        return None
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - unreadable: the line is left out, a resend redoes it
        return False
    return {"patient": str(ds.get("PatientID", "")), "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
            "series_uid": str(ds.get("SeriesInstanceUID", "") or ""), "sop_uid": str(ds.get("SOPInstanceUID", "")),
            "accession": str(ds.get("AccessionNumber", "") or ""), "path": rel}


@dataclass(eq=False)
class _Pending:
    """One instance waiting for its output to be durable (or a resend waiting for the first copy's)."""

    target: Path
    line: str | None  # its done-index line, appended once the output is durable
    placed: bool = True  # False: a resend; the output is an earlier instance's
    study: str = ""
    patient: str = ""
    late: bool = False
    error: OSError | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise self.error


def _fsync(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _GroupCommit:
    """Group commit: one thread makes every output placed since its last flush durable at once.

    Each instance's handler places its output and writes its trail record, then waits here;
    the committer takes whatever is waiting, fsyncs those outputs, their folders (and a new
    folder's parents) and the trail - concurrently, so the filesystem joins them in one journal
    commit - then appends their done-index lines and releases every waiting handler. Instances
    arriving together on several associations share one flush; on one association each
    instance costs one flush. The done-index lines are not flushed each time: the trail and
    the outputs can rebuild them (:meth:`Intake._catch_up`).
    """

    def __init__(self, intake: Intake) -> None:
        self._intake = intake
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._stopping = False
        self.flushes = 0
        self._known: set[Path] = set()  # folders whose own entry is known durable
        self._io = ThreadPoolExecutor(8, thread_name_prefix="medfed-intake-fsync")
        self._thread = threading.Thread(target=self._run, name="medfed-intake-commit", daemon=True)
        self._thread.start()

    def submit(self, pending: _Pending) -> _Pending:
        with self._cond:
            self._queue.append(pending)
            self._cond.notify()
        return pending

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        self._io.shutdown(wait=True)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
            error: OSError | None = None
            try:
                self._flush(batch)
            except OSError as err:
                error = err
            except Exception as err:  # noqa: BLE001 - never leave a handler waiting, never claim durability
                error = OSError(f"the commit failed ({type(err).__name__})")
            for pending in batch:
                pending.error = error
                pending.done.set()

    def _flush(self, batch: list[_Pending]) -> None:
        intake = self._intake
        paths: set[Path] = set()
        folders: set[Path] = set()
        for pending in batch:
            paths.add(pending.target)
            folder = pending.target.parent
            paths.add(folder)  # the rename
            if folder not in self._known:  # a new study (or patient) folder: its entry in its parents too
                folders.add(folder)
                paths.update(p for p in (folder.parent, folder.parent.parent, intake.dst) if lies_inside(p, intake.dst))
        with intake._lock:  # the trail's active file as of now: every record of this batch is in it
            trail = intake.trail.path if intake.trail.path.exists() else None
        if trail is not None:
            paths.add(trail)
        self.flushes += 1
        list(self._io.map(_fsync, paths))  # raises the first failure
        self._known.update(folders)
        if len(self._known) > 100_000:
            self._known.clear()
        intake.done.append([p.line for p in batch if p.line is not None], fsync=False)


# ---- the network side --------------------------------------------------------------------
@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path


def tls_context(files: TlsFiles, *, client: bool = False, option: str = "--tls") -> ssl.SSLContext:
    """TLS 1.2+ with our certificate, trusting only peers whose certificate ``files.ca`` issued.

    Server side (the intake): a client without such a certificate is refused. Client side (results
    back to PACS): the PACS must present one, naming the host dialled. ``option`` names the CLI
    options in error messages.
    """
    for what, path in ((f"{option}-cert", files.cert), (f"{option}-key", files.key), (f"{option}-ca", files.ca)):
        if not Path(path).is_file():
            raise IntakeError(f"{what} {path} does not exist; pass the PEM file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if client else ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(files.cert), str(files.key))
    except (ssl.SSLError, OSError) as err:
        raise IntakeError(f"{option}-cert {files.cert} / {option}-key {files.key} are not a matching PEM certificate "
                          f"and key ({err})") from None
    try:
        ctx.load_verify_locations(cafile=str(files.ca))
    except (ssl.SSLError, OSError) as err:
        raise IntakeError(f"{option}-ca {files.ca} is not a PEM CA certificate ({err})") from None
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = client
    return ctx


def split_ae_titles(values: Iterable[str]) -> list[str]:
    """``--allow-ae A,B --allow-ae C`` -> ["A", "B", "C"], each a valid AE title."""
    titles = [t.strip() for v in values for t in str(v).split(",") if t.strip()]
    for title in titles:
        check_ae_title(title, "--allow-ae")
    if not titles:
        raise IntakeError("--allow-ae needs at least one calling AE title (the PACS's), e.g. --allow-ae PACS")
    return titles


def check_ae_title(title: str, option: str) -> str:
    if not 0 < len(title) <= 16 or "\\" in title or not title.isascii() or not title.isprintable():
        raise IntakeError(f"{option} {title!r} is not an AE title: 1 to 16 printable ASCII characters, no backslash")
    return title


@dataclass
class ReceiveServer:
    """pynetdicom Storage SCP in front of an :class:`Intake` (start, then stop)."""

    intake: Intake
    ae_title: str
    allowed: Sequence[str]
    port: int = 11112
    host: str = "0.0.0.0"
    tls: TlsFiles | None = None
    network_timeout: float = 60.0
    _server: Any = field(default=None, init=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _ticker: threading.Thread | None = field(default=None, init=False, repr=False)

    def start(self) -> int:
        """Listen (non-blocking); return the bound port."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
        from pynetdicom import _config as pynetdicom_config
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO lines name UIDs
        # Nor are its standard event handlers bound: they format every PDU and DIMSE message into INFO/DEBUG
        # lines that the level above drops (a twentieth of the SCP's work). Process-wide; warnings remain.
        pynetdicom_config.LOG_HANDLER_LEVEL = "none"
        check_ae_title(self.ae_title, "--ae-title")
        context = tls_context(self.tls) if self.tls is not None else None
        ae = AE(ae_title=self.ae_title)
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_calling_aet = list(self.allowed)
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.network_timeout = self.network_timeout
        ae.acse_timeout = ae.dimse_timeout = 30
        handlers = [(evt.EVT_C_STORE, self._handle_store), (evt.EVT_REJECTED, self._handle_rejected),
                    (evt.EVT_CONN_OPEN, _no_delay)]
        try:
            self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers,
                                           ssl_context=context)
        except OSError as err:
            raise IntakeError(f"cannot listen on {self.host}:{self.port} ({err.strerror or err}): choose a free port "
                              "with --port (ports below 1024 need privileges)") from None
        self.port = int(self._server.server_address[1])
        self.intake.started(ae_title=self.ae_title, allowed_ae=list(self.allowed), port=self.port,
                            tls=self.tls is not None)
        self._ticker = threading.Thread(target=self._tick, name="medfed-intake-studies", daemon=True)
        self._ticker.start()
        log.info("receiving as %s on %s:%d (%s), from %s", self.ae_title, self.host, self.port,
                 "TLS, client certificates required" if self.tls else "no TLS", ", ".join(self.allowed))
        return self.port

    def _tick(self) -> None:
        step = min(1.0, self.intake.study_timeout / 4)
        while not self._stop.wait(step):
            try:
                self.intake.check_studies()
            except Exception:  # noqa: BLE001 - the listener outlives a failed manifest rewrite; retried next tick
                log.exception("recording completed studies failed; retrying")

    def _handle_store(self, event: Any) -> int:
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            data = received_file(event)
        except Exception:  # noqa: BLE001 - a dataset pynetdicom cannot frame: nothing stored
            return STATUS_CANNOT_DEIDENTIFY
        try:
            return self.intake.receive(data, calling).status
        except Exception:  # noqa: BLE001 - never answer Success for what was not stored
            log.exception("storing a received instance failed")
            return STATUS_OUT_OF_RESOURCES

    @staticmethod
    def _handle_rejected(event: Any) -> None:
        log.warning("refused an association from calling AE %r at %s", str(event.assoc.requestor.ae_title).strip(),
                    event.assoc.requestor.address)

    def stop(self) -> IntakeCounts:
        """Stop listening (open associations end), record the stop, seal the trail."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._ticker is not None:
            self._ticker.join(timeout=10)
        return self.intake.close()

    def serve_until(self, stop: threading.Event) -> IntakeCounts:
        """Block until ``stop`` is set (SIGTERM), then :meth:`stop`."""
        try:
            while not stop.wait(1.0):
                pass
        finally:
            counts = self.stop()
        return counts


def received_file(event: Any) -> bytes:
    """A C-STORE request's instance as a DICOM file: the bytes of ``event.encoded_dataset()``, made faster.

    pynetdicom builds the file meta through pydicom datasets (about a third of the SCP's own work per
    instance); these five elements are written by hand instead (:func:`anonymization.writer.file_meta_bytes`),
    with the same values: the request's SOP class and instance, the context's transfer syntax, pynetdicom's
    implementation UID and version. The dataset is kept as the peer sent it.
    """
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    request = event.request
    meta = file_meta_bytes({
        "MediaStorageSOPClassUID": request.AffectedSOPClassUID or "",
        "MediaStorageSOPInstanceUID": request.AffectedSOPInstanceUID or "",
        "TransferSyntaxUID": event.context.transfer_syntax,
        "ImplementationClassUID": PYNETDICOM_IMPLEMENTATION_UID,
        "ImplementationVersionName": PYNETDICOM_IMPLEMENTATION_VERSION,
    })
    return b"".join((b"\x00" * 128, b"DICM", meta, request.DataSet.getvalue()))


def _no_delay(event: Any) -> None:
    """Answer each C-STORE at once: Nagle's algorithm would hold a response for the peer's delayed ACK (~40 ms)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def run_receive(
    dst: Path,
    key_file: Path,
    *,
    ae_title: str,
    allowed: Sequence[str],
    port: int,
    host: str = "0.0.0.0",
    tls: TlsFiles | None = None,
    stop: threading.Event | None = None,
    **intake_options: Any,
) -> IntakeCounts:
    """``medfed site receive``: open the intake, listen until SIGTERM/SIGINT (or ``stop``), close it."""
    import signal

    intake = Intake(dst, key_file, **intake_options).open()
    server = ReceiveServer(intake, ae_title=ae_title, allowed=list(allowed), port=port, host=host, tls=tls)
    try:
        server.start()
    except BaseException:
        intake.close()
        raise
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):
                signal.signal(sig, lambda *_: stop.set())
    return server.serve_until(stop)
