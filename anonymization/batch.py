"""``medfed deid run``: de-identify a folder of DICOM files into a de-identified store.

One file at a time (optionally in a process pool); the parent is the only
writer of the manifest, the audit trail and the quarantine log, renames each
worker's temporary output into place, and never lets a bad file stop the run
(docs/design.md invariant 7). Nothing it logs or records names a patient (docs/design.md invariant 4).

Scale: files are listed lazily (a counting pass for the progress bar, then a
streaming pass), results are folded into counts as they arrive, and duplicates
within a run are found on disk (an output already written by this run has an
mtime after the run's start mark), so memory stays flat in the number of files.

Resume: ``DST/done/<fingerprint>.txt`` is a journal with one line per input
already de-identified under this key, policy and version: the keyed digest of
its bytes (HMAC with the site secret, 128 bits) and, for images, its manifest
row (pseudonyms and the output path only; no identifier). A re-run skips those
inputs. Outputs are made durable in batches (``syncfs``) before their lines are
appended, so a power cut never leaves a "done" input whose output is not on
disk. The manifest is rebuilt at the end of every run by a streaming merge of
the earlier manifest and the journal (:func:`~anonymization.manifest.write_merged`,
sorted chunks on disk), so even a run that was killed leaves nothing unlisted
once the next run ends.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import hmac
import json
import logging
import multiprocessing
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress

from anonymization import screening
from anonymization.audit import AUDIT_FILE, AuditError, AuditTrail, open_trail, resolve_key_path
from anonymization.audit.keys import SIGNING_KEY_NAME
from anonymization.engine import MEDFED_VERSION
from anonymization.errors import DeidError, DiskFullError, KeyFileError, LabelsError, is_disk_full
from anonymization.keys import load_or_create_secret
from anonymization.labels import read_labels
from anonymization.manifest import MANIFEST_FILE, RowSpool, write_merged
from anonymization.policy import Policy, load_policy
from anonymization.pseudonyms import Pseudonymizer
from anonymization.quarantine import QUARANTINE_LOG, Quarantine
from anonymization.reid import open_for_run as open_reid_for_run
from anonymization.worker import (
    DONE_DIGEST_HEX,
    IMAGES_DIR,
    KIND_DEIDENTIFIED,
    KIND_DISK_FULL,
    KIND_DONE,
    KIND_QUARANTINED,
    KIND_SKIPPED,
    OBJECTS_DIR,
    REASON_LINK,
    TMP_SUFFIX,
    FileResult,
    Job,
    init_worker,
    process_path,
    refusal_for_mode,
)

__all__ = ["DeidError", "DiskFullError", "KeyFileError", "LabelsError", "DeidSummary", "run_deid"]

log = logging.getLogger(__name__)

STATE_FILE = "deid.json"  # which key and profile wrote this store (no identifiers)
DONE_DIR = "done"  # resume index: keyed digests of inputs already de-identified
CHECKPOINT_FILES = 1000  # make outputs durable and extend the done-index this often ...
CHECKPOINT_SECONDS = 30.0  # ... or after this long, whichever comes first
REASON_RESUMED = "already de-identified by an earlier run (done-index)"


@dataclass
class DeidSummary:
    """Counts and where everything went, for the command line and the site report."""

    deidentified: int
    quarantined: int
    skipped: int
    dst: Path
    quarantine_dir: Path
    audit_dir: Path
    manifest: Path
    resumed: int = 0  # of ``deidentified``: done by an earlier run, skipped this time
    refused: int = 0  # symbolic links and special files: listed in the quarantine log, never read

    def line(self) -> str:
        """One human line, e.g. for the end of ``medfed deid run``."""
        text = f"de-identified {self.deidentified}"
        if self.resumed:
            text += f" ({self.resumed} already done by an earlier run)"
        text += f", quarantined {self.quarantined}"
        if self.quarantined:
            text += f" (see {self.quarantine_dir / QUARANTINE_LOG})"
        if self.skipped:
            text += f", skipped {self.skipped} duplicate(s)"
        if self.refused:
            text += (f", refused {self.refused} link(s) or special file(s) unread "
                     f"(see {self.quarantine_dir / QUARANTINE_LOG})")
        return f"{text}; manifest {self.manifest}; audit {self.audit_dir / AUDIT_FILE}"


@dataclass(frozen=True)
class _Task:
    path: Path
    relative: str  # relative to SRC, posix (only ever written to the quarantine folder)
    refusal: str | None = None  # a link or special file: refused unread, never handed to a worker


# ---- argument checks ------------------------------------------------------------
def _inside(path: Path, folder: Path) -> bool:
    """True if ``path`` is ``folder`` or below it (both resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _key_fingerprint(secret: bytes) -> str:
    return hmac.new(secret, b"medfed/key-fingerprint", hashlib.sha256).hexdigest()[:16]


def _check_store(dst: Path, secret: bytes, options: tuple[str, ...]) -> None:
    """Refuse to mix pseudonyms of two keys in one store; record ours on first use."""
    state = dst / STATE_FILE
    fingerprint = _key_fingerprint(secret)
    if state.exists():
        try:
            recorded = json.loads(state.read_text("utf-8")).get("key_fingerprint")
        except (OSError, ValueError):
            recorded = None
        if recorded and recorded != fingerprint:
            raise DeidError(
                f"{dst} was de-identified with a different site key; use that key "
                "(pseudonyms must stay consistent) or choose a new destination"
            )
        if recorded:
            return
    payload = {"key_fingerprint": fingerprint, "profile": list(options), "tool": f"medfed {MEDFED_VERSION}"}
    tmp = dst / f".{STATE_FILE}.{secrets.token_hex(4)}.tmp"
    tmp.write_text(json.dumps(payload, indent=1) + "\n", "utf-8")
    os.replace(tmp, state)


def _files(src: Path, excluded: list[Path]) -> list[_Task]:
    """Every regular file under SRC in a stable order, minus our own outputs and inputs."""
    return list(_iter_files(src, excluded))


def _iter_files(src: Path, excluded: list[Path]) -> Iterator[_Task]:
    """:func:`_files`, streamed: one directory listing in memory at a time."""
    if src.is_file():
        yield _Task(src.resolve(), src.name)  # named on the command line: the one path we resolve
        return
    skip = {p.resolve() for p in excluded}

    def skipped(path: Path) -> bool:
        return path in skip or any(parent in skip for parent in path.parents)

    top = src.resolve()
    for root, dirs, names in os.walk(src, followlinks=False):
        here = Path(root)
        resolved = here.resolve()
        if resolved != top and top not in resolved.parents:  # a folder swapped for a link mid-walk
            dirs[:] = []
            yield _Task(here, here.relative_to(src).as_posix(), REASON_LINK)
            continue
        links = sorted(d for d in dirs if os.path.islink(here / d))  # listed, never entered
        dirs[:] = sorted(d for d in dirs if d not in links and not skipped(resolved / d))
        for name in sorted([*names, *links]):
            path = here / name
            if skipped(resolved / name):
                continue
            try:
                refusal = refusal_for_mode(os.lstat(path).st_mode)  # lstat: a link is never followed
            except OSError:
                continue  # gone since the listing
            yield _Task(path, path.relative_to(src).as_posix(), refusal)


def _cannot_write(err: OSError, folder: Path) -> str:
    """What to say when the store cannot be set up: the path, the system's reason, what to do."""
    if is_disk_full(err):
        return _disk_full(folder, err)
    where = err.filename or folder
    return (
        f"cannot write to {where} ({err.strerror or err}): choose a destination you can write to, "
        f"or fix the permissions of {folder} (the site account needs to create folders and files there)"
    )


def _disk_full(folder: Path, err: OSError | str) -> str:
    """The full-disk message: why the run stopped, and that the same command resumes it."""
    why = err.strerror if isinstance(err, OSError) else err
    return (
        f"the disk holding {folder} is full ({why or 'no space left'}): the run stopped; no file was "
        "quarantined because of it. Free space (or raise the quota) and run the same command again: "
        "it resumes where it stopped"
    )


RESERVE_FILE = ".deid-reserve"
RESERVE_BYTES = 256 * 1024


class _Reserve:
    """Space set aside in DST so a run stopped by a full disk can still journal and seal its trail."""

    def __init__(self, dst: Path) -> None:
        self.path = dst / RESERVE_FILE
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            if os.write(fd, b"\0" * RESERVE_BYTES) != RESERVE_BYTES:  # real blocks, not a sparse hole
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        except OSError:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


# ---- durability and resume ------------------------------------------------------
_LIBC: ctypes.CDLL | None = None


def _sync_filesystem(folder: Path) -> None:
    """Flush every file written under ``folder`` to disk: one ``syncfs(2)``, else ``sync(2)``.

    One journal commit for a whole batch of outputs instead of an fsync per
    file (which cost more than de-identifying a small file).
    """
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        fd = os.open(folder, os.O_RDONLY)
        try:
            if _LIBC.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass
    os.sync()


class DoneIndex:
    """``DST/done/<fingerprint>.txt``: inputs already de-identified, by keyed content digest.

    The fingerprint is keyed too and covers the medfed version and the policy, so a
    new policy or release re-does everything. Lines are the first 128 bits (hex) of
    the HMAC of the input's bytes: no identifier, and meaningless without the key.
    Digests are appended only at a checkpoint, after the outputs are durable.
    """

    def __init__(self, dst: Path, secret: bytes, policy: Policy, before_commit: Callable[[], None] | None = None) -> None:
        fingerprint = getattr(policy, "fingerprint", None)
        policy_id = fingerprint() if callable(fingerprint) else repr(sorted(policy.applied_options))
        label = f"medfed/done-index\x00{MEDFED_VERSION}\x00{policy_id}".encode()
        name = hmac.new(secret, label, hashlib.sha256).hexdigest()[:16]
        self.dst = dst
        self.path = dst / DONE_DIR / f"{name}.txt"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()  # also the run's start mark: outputs newer than this are ours
        self.mark_ns = self.path.stat().st_mtime_ns
        self._pending: list[str] = []
        self._last = time.monotonic()
        self._before_commit = before_commit  # flush other per-file records first (re-identification table)

    def add(self, digest: str, row: dict[str, str] | None = None) -> None:
        """Journal an input as done, with its manifest row (images) - written at the next checkpoint."""
        if len(digest) < DONE_DIGEST_HEX:
            return
        line = digest[:DONE_DIGEST_HEX]
        if row is not None:
            line += "\t" + "\t".join(_journal_field(row.get(c, "")) for c in JOURNAL_COLUMNS)
        self._pending.append(line)

    def rows(self, chunk_rows: int = 20_000) -> RowSpool:
        """Every manifest row journaled under this fingerprint, as a rank-1 spool (bounded memory)."""
        spool = RowSpool(chunk_rows, rank=1)
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                fields = line.rstrip("\n").split("\t")
                if len(fields) == len(JOURNAL_COLUMNS) + 1:
                    spool.add(dict(zip(JOURNAL_COLUMNS, fields[1:])))
        return spool

    def checkpoint(self, *, force: bool = False) -> None:
        """If due (or ``force``): make outputs durable, then record their inputs as done."""
        if not self._pending:
            return
        if not force and len(self._pending) < CHECKPOINT_FILES and time.monotonic() - self._last < CHECKPOINT_SECONDS:
            return
        if self._before_commit is not None:
            self._before_commit()
        _sync_filesystem(self.dst)
        data = memoryview(("\n".join(self._pending) + "\n").encode("utf-8"))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            try:
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            except OSError:  # a full disk: no torn line may glue itself to the next checkpoint's
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
        self._pending.clear()
        self._last = time.monotonic()


JOURNAL_COLUMNS = ("patient", "study_uid", "series_uid", "sop_uid", "accession", "path")


def _journal_field(value: str) -> str:
    """Pseudonyms, UIDs and paths never hold tabs or newlines; make sure of it."""
    return str(value).replace("\t", " ").replace("\n", " ").replace("\r", " ")


def _written_this_run(path: Path, mark_ns: int) -> bool:
    """True if ``path`` exists and was written after the run's start mark (by this run)."""
    try:
        return path.stat().st_mtime_ns >= mark_ns
    except OSError:
        return False


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sweep_temporaries(dst: Path) -> None:
    """Remove temporary outputs a crashed run may have left (never a finished file)."""
    for top in (IMAGES_DIR, OBJECTS_DIR):
        base = dst / top
        if not base.exists():
            continue
        for root, _dirs, names in os.walk(base):
            for name in names:
                if name.startswith(".") and name.endswith(TMP_SUFFIX):
                    Path(root, name).unlink(missing_ok=True)


# ---- execution ------------------------------------------------------------------
ProcessFn = Callable[[str], FileResult]


def _isolated(task: _Task, job: Job, fn: ProcessFn) -> FileResult:
    """Re-run one file alone in a fresh process, to tell which file killed a worker."""
    ctx = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(1, mp_context=ctx, initializer=init_worker, initargs=(job,)) as pool:
            return pool.submit(fn, str(task.path)).result()
    except Exception:  # noqa: BLE001 - the worker died: this file is the culprit
        try:
            digest = Pseudonymizer(job.secret).digest(task.path.read_bytes())
        except OSError:
            digest = ""
        return FileResult(KIND_QUARANTINED, digest, reason=screening.REASON_CRASH)


def _results(
    tasks: Iterable[_Task], job: Job, workers: int, fn: ProcessFn = process_path
) -> Iterator[tuple[_Task, FileResult]]:
    """Results in task order: in this process, or from a spawn-based process pool.

    If a worker process dies (a decoder crash, the OOM killer), the files it may
    have held are re-run one by one in fresh processes: the culprit is
    quarantined, the others are de-identified, and the batch goes on.
    """
    if workers <= 1:
        init_worker(job)
        for task in tasks:
            yield task, fn(str(task.path))
        return
    ctx = multiprocessing.get_context("spawn")

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=(job,))

    window = workers * 4
    todo = iter(tasks)
    pending: deque[tuple[_Task, Future[FileResult]]] = deque()
    pool = new_pool()
    try:
        while True:
            while len(pending) < window:
                task = next(todo, None)
                if task is None:
                    break
                pending.append((task, pool.submit(fn, str(task.path))))
            if not pending:
                break
            task, future = pending.popleft()
            try:
                yield task, future.result()
                continue
            except Exception:  # noqa: BLE001 - a worker died (BrokenProcessPool)
                log.warning("a de-identification worker died; isolating the files it held")
            pool.shutdown(wait=True, cancel_futures=True)
            for held, held_future in [(task, future), *pending]:
                if held_future.done() and not held_future.cancelled() and held_future.exception() is None:
                    yield held, held_future.result()
                else:
                    yield held, _isolated(held, job, fn)
            pending.clear()
            pool = new_pool()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _progress(enabled: bool) -> Progress:
    """A rich progress bar on stderr: files/s and counts only, never a file name."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class FilesPerSecond(ProgressColumn):
        """Throughput over the whole run so far (rich's own speed is a short moving window)."""

        def render(self, task: Task) -> Text:
            elapsed = task.elapsed or 0.0
            rate = task.completed / elapsed if elapsed > 0 else 0.0
            return Text(f"{rate:,.1f} files/s", style="progress.data.speed")

    return Progress(
        TextColumn("de-identifying"),
        BarColumn(),
        MofNCompleteColumn(),
        FilesPerSecond(),
        TextColumn(
            "[green]{task.fields[ok]} ok[/] [yellow]{task.fields[quarantined]} quarantined[/] "
            "{task.fields[skipped]} skipped {task.fields[resumed]} done before"
        ),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


# ---- the command ------------------------------------------------------------------
def run_deid(
    src: Path,
    dst: Path,
    key_file: Path,
    *,
    labels: Path | None = None,
    quarantine: Path | None = None,
    audit: Path | None = None,
    audit_key: Path | None = None,
    workers: int = 1,
    progress: bool = True,
    policy: Policy | Path | None = None,
    reid_table: Path | None = None,
    clean_pixel_data: bool | None = None,
) -> DeidSummary:
    """De-identify every file under ``src`` into ``dst``; see the module docstring.

    ``clean_pixel_data=True`` turns on the Clean Pixel Data option on top of the
    policy (``medfed deid run --clean-pixels``): images that may carry burned-in
    text are cleaned with OCR instead of quarantined (see :mod:`anonymization.pixels`).
    """
    src, dst, key_file = Path(src), Path(dst), Path(key_file)
    if not src.exists():
        raise DeidError(f"source {src} does not exist; pass the folder holding the DICOM export")
    if workers < 1:
        raise DeidError("--workers must be at least 1")
    if dst.resolve() == src.resolve():
        raise DeidError("the destination must differ from the source")
    if _inside(src, dst):
        raise DeidError(f"the source {src} lies inside the destination {dst}; choose another destination")
    if src.is_dir() and _inside(dst, src):
        raise DeidError(
            f"the destination {dst} lies inside the source {src}: a later run would read its own "
            "output back in as input; choose a destination outside the source"
        )
    if dst.exists() and not dst.is_dir():
        raise DeidError(f"destination {dst} exists and is not a folder")
    quarantine_dir = Path(quarantine) if quarantine is not None else dst.parent / f"{dst.name}-quarantine"
    if _inside(quarantine_dir, dst):
        raise DeidError(
            f"the quarantine {quarantine_dir} lies inside the destination {dst}: it holds raw, "
            "identifying files; choose a folder outside the destination"
        )
    if src.is_dir() and _inside(quarantine_dir, src):
        raise DeidError(
            f"the quarantine {quarantine_dir} lies inside the source {src}: a later run would read "
            "its copies back in as input; choose a folder outside the source (--quarantine)"
        )
    if _inside(key_file, dst):
        raise DeidError(
            f"the key file {key_file} lies inside the destination {dst}; the site secret must "
            "never be stored with de-identified data: keep it elsewhere"
        )
    audit_dir = Path(audit) if audit is not None else dst / "audit"
    # The trail's signing key: --audit-key, else the one the trail records, else next to the site secret.
    audit_key_path = resolve_key_path(audit_dir, audit_key, key_file.parent / SIGNING_KEY_NAME)

    secret = load_or_create_secret(key_file)
    pseudo = Pseudonymizer(secret)
    site_policy = policy if isinstance(policy, Policy) else load_policy(policy)  # None: default policy
    label_table = read_labels(labels, pseudo, retain_uids=site_policy.retain_uids) if labels is not None else None
    if clean_pixel_data is not None and bool(clean_pixel_data) != site_policy.clean_pixel_data:
        site_policy = site_policy.model_copy(update={"clean_pixel_data": bool(clean_pixel_data)})
    if site_policy.clean_pixel_data:
        from anonymization.pixels import REASON_NO_OCR, tesseract_available

        if not tesseract_available():
            raise DeidError(REASON_NO_OCR)
    try:
        reid_writer, reid_key_pem = open_reid_for_run(site_policy, reid_table, dst)
        dst.mkdir(parents=True, exist_ok=True)
        options = site_policy.applied_options
        _check_store(dst, secret, options)
        _sweep_temporaries(dst)
        reserve = _Reserve(dst)
    except OSError as err:
        raise DeidError(_cannot_write(err, dst)) from None

    excluded = [dst, quarantine_dir, audit_dir, key_file, audit_key_path] + ([Path(labels)] if labels is not None else [])
    excluded += [reid_writer.path] if reid_writer is not None else []
    total = sum(1 for _ in _iter_files(src, excluded))  # counting pass: the bar's total
    log.info("de-identifying %d file(s) with %d worker(s)", total, workers)
    reid_flush = getattr(reid_writer, "flush", None)  # a done input's sealed row must be on disk too
    trail: AuditTrail | None = None
    try:
        done = DoneIndex(dst, secret, site_policy, before_commit=reid_flush if callable(reid_flush) else None)
        trail = open_trail(audit_dir, audit_key=audit_key_path, default_key=audit_key_path, forbidden=(dst,), fsync=False)
        trail.record_policy("deidentification", {**site_policy.model_dump(mode="json", exclude={"reid"}),
                                                 "reid_table": site_policy.reid is not None,
                                                 "tool": f"medfed {MEDFED_VERSION}"})
    except AuditError as err:
        reserve.release()
        raise DeidError(str(err)) from None
    except OSError as err:
        reserve.release()
        message = _cannot_write(err, audit_dir if audit is not None else dst)
        if trail is not None and is_disk_full(err):
            try:  # the trail was opened: end it with a sealed record of why
                trail.append("deid_stopped", reason=message, files=total)
                trail.close()
            except OSError:
                pass
        raise DeidError(message) from None
    assert trail is not None  # opened above, or the run has stopped
    if reid_writer is not None:
        reid_writer.use_signer(trail.signer)  # re-identification rows are signed with the trail's key
    quarantine_folder = Quarantine(quarantine_dir)
    job = Job(secret=secret, dst=str(dst.resolve()), options=site_policy.table_options, policy=site_policy,
              reid_public_key=reid_key_pem, done_index=str(done.path))
    manifest_path = dst / MANIFEST_FILE
    deidentified = quarantined = skipped = resumed = refused = 0

    def refuse(task: _Task, result: FileResult, reason: str) -> None:
        nonlocal quarantined, refused
        try:
            quarantine_folder.add(task.path, task.relative, reason, result.input_digest, copy=not result.unread)
        except OSError as err:
            if is_disk_full(err):
                raise DiskFullError(_disk_full(quarantine_dir, err)) from None
            raise
        trail.append(KIND_QUARANTINED, input_digest=result.input_digest, reason=reason)
        log.info("quarantined file %s: %s", result.input_digest[:16] or "(unread)", reason)
        if result.unread:
            refused += 1
        else:
            quarantined += 1

    def regular(tasks: Iterable[_Task]) -> Iterator[_Task]:
        """Hands regular files on to the workers; refuses links and special files here, unread."""
        for task in tasks:
            if task.refusal is None:
                yield task
                continue
            refuse(task, FileResult(KIND_QUARANTINED, "", reason=task.refusal, unread=True), task.refusal)
            bar.update(bar_task, advance=1, quarantined=quarantined + refused)

    stopped: DiskFullError | None = None
    pydicom_logger = logging.getLogger("pydicom")
    pydicom_level = pydicom_logger.level
    try:
        with _progress(progress) as bar:
            bar_task = bar.add_task("deid", total=total, ok=0, quarantined=0, skipped=0, resumed=0)
            for task, result in _results(regular(_iter_files(src, excluded)), job, workers):
                try:
                    if result.kind == KIND_DISK_FULL:  # no file is to blame: stop, quarantine nothing
                        raise DiskFullError(_disk_full(dst, result.reason))
                    if result.kind == KIND_DONE:
                        trail.append(KIND_SKIPPED, input_digest=result.input_digest, reason=REASON_RESUMED)
                        resumed += 1
                        continue
                    if result.kind != KIND_DEIDENTIFIED:
                        refuse(task, result, result.reason or screening.REASON_UNREADABLE)
                        continue
                    if result.rel_path is None or result.tmp_path is None:  # cannot happen: fail closed
                        refuse(task, result, screening.REASON_WRITE)
                        continue
                    target = dst / result.rel_path
                    if _written_this_run(target, done.mark_ns):
                        Path(result.tmp_path).unlink(missing_ok=True)
                        if _file_sha256(target) == result.output_digest:
                            trail.append(
                                KIND_SKIPPED,
                                input_digest=result.input_digest,
                                sop_uid=result.sop_uid,
                                reason="duplicate of a file already de-identified in this run",
                            )
                            skipped += 1
                            done.add(result.input_digest)  # its row is the first copy's
                        else:
                            refuse(task, result, screening.REASON_DUPLICATE)
                        continue
                    os.replace(result.tmp_path, target)
                    trail.append(
                        KIND_DEIDENTIFIED,
                        input_digest=result.input_digest,
                        sop_uid=result.sop_uid,
                        path=result.rel_path,
                        actions=result.actions,
                        output_digest=result.output_digest,
                        **({"pixel_cleaning": result.pixel_cleaning} if result.pixel_cleaning else {}),
                    )
                    done.add(result.input_digest, result.row)
                    deidentified += 1
                    if reid_writer is not None and result.reid_row is not None:
                        reid_writer.add(*result.reid_row)
                finally:
                    done.checkpoint()
                    bar.update(bar_task, advance=1, ok=deidentified, quarantined=quarantined + refused,
                               skipped=skipped, resumed=resumed)
    except DiskFullError as err:
        stopped = err
    except OSError as err:  # the trail, the journal, a rename: the disk, not a file, is to blame
        if not is_disk_full(err):
            raise
        stopped = DiskFullError(_disk_full(dst, err))
    finally:
        pydicom_logger.setLevel(pydicom_level)
        _sweep_temporaries(dst)  # also gives back the space of outputs still in flight
        reserve.release()  # after a full disk: room for the last journal lines and the sealed stop record
        try:
            if reid_writer is not None:
                reid_writer.close()
            done.checkpoint(force=True)  # even after an interruption: what is in place is done
        except OSError as err:
            if stopped is None or not is_disk_full(err):
                raise
            log.warning("the last %d done-index line(s) could not be written; a re-run redoes those files",
                        len(done._pending))

    counts = {
        "files": total,
        "deidentified": deidentified + resumed,
        "resumed": resumed,
        "quarantined": quarantined,
        "refused": refused,
        "skipped": skipped,
    }
    if stopped is not None:
        try:
            trail.append("deid_stopped", reason=str(stopped), **counts, key_fingerprint=_key_fingerprint(secret))
            trail.close()  # seals the run: it ends here, and says why
        except OSError as err:
            raise DiskFullError(f"{stopped}; the audit trail could not be sealed either ({err.strerror})") from None
        raise stopped
    journal = done.rows()
    try:
        write_merged(manifest_path, journal, dst, labels=label_table.labels if label_table else None,
                     label_column=label_table.column if label_table else "accession")
    finally:
        journal.close()
    trail.append("deid_run", **counts, profile=list(options), key_fingerprint=_key_fingerprint(secret))
    trail.close()  # seals the run
    summary = DeidSummary(
        deidentified=deidentified + resumed,
        resumed=resumed,
        quarantined=quarantined,
        skipped=skipped,
        refused=refused,
        dst=dst,
        quarantine_dir=quarantine_dir,
        audit_dir=audit_dir,
        manifest=manifest_path,
    )
    log.info("%s", summary.line())
    return summary
