"""``medfed deid run``: de-identify a folder of DICOM files into a de-identified store.

One file at a time, in this process or in a pool of worker processes; the
parent is the only writer of the manifest, the audit trail, the done-index and
the quarantine log, renames each worker's temporary output into place, and
never lets a bad file stop the run (docs/design.md invariant 7). Nothing it logs or records
names a patient (docs/design.md invariant 4).

Workers: each worker reads, screens, cleans, encodes, hashes and writes its
files to temporary names (:class:`~anonymization.worker.FileWorker`); files go
to the pool a chunk at a time (one round trip per chunk, not per file; smaller
chunks at the end of the run, so the workers finish together), and the
parent takes the results back in listing order, so the trail, the journal, the
quarantine log and the manifest are the same whatever the number of workers.
The workers get their first chunks before the parent counts SRC for the
progress bar and opens the trail: that serial start overlaps their work.
Where the platform has ``fork`` the workers are forked, before the trail's
signing key is loaded, and so start in milliseconds instead of re-importing the
engine. The parent's own work per file is a rename, a stat and a trail record.

Scale: files are listed lazily (a counting pass for the progress bar, then a
streaming pass), results are folded into counts as they arrive, and duplicates
within a run are found on disk (an output already written by this run has an
mtime after the run's start mark), so memory stays flat in the number of files.

Resume: ``DST/done/<fingerprint>.txt`` is a journal with one line per input
already de-identified under this key, policy and version: the keyed digest of
its bytes (HMAC with the site secret, 128 bits) and, for images, its manifest
row (pseudonyms and the output path only; no identifier). A re-run skips those
inputs. Outputs are made durable in batches (``syncfs``, in a background thread
while the workers go on) before their lines are appended, so a power cut never
leaves a "done" input whose output is not on disk. The manifest is rebuilt at
the end of every run by a streaming merge of the earlier manifest and the
journal (:func:`~anonymization.manifest.write_merged`, sorted chunks on disk),
so even a run that was killed leaves nothing unlisted once the next run ends.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import hashlib
import hmac
import json
import logging
import multiprocessing
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from itertools import groupby, islice
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
from anonymization.labels import LabelTable, read_labels
from anonymization.manifest import MANIFEST_FILE, RowSpool, write_merged
from anonymization.policy import Policy, load_policy
from anonymization.pseudonyms import Pseudonymizer
from anonymization.quarantine import QUARANTINE_LOG, Quarantine
from anonymization.reid import ReidTable
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
COMMIT_FILES = 200  # and sooner, when no commit is running: the disk keeps pace, little is left for the end
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
class FileTask:
    path: Path
    relative: str  # relative to SRC, posix (only ever written to the quarantine folder)
    refusal: str | None = None  # a link or special file: refused unread, never handed to a worker


# ---- argument checks ------------------------------------------------------------
def lies_inside(path: Path, folder: Path) -> bool:
    """True if ``path`` is ``folder`` or below it (both resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def key_fingerprint(secret: bytes) -> str:
    return hmac.new(secret, b"medfed/key-fingerprint", hashlib.sha256).hexdigest()[:16]


def check_store(dst: Path, secret: bytes, options: tuple[str, ...]) -> None:
    """Refuse to mix pseudonyms of two keys in one store; record ours on first use."""
    state = dst / STATE_FILE
    fingerprint = key_fingerprint(secret)
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


def _files(src: Path, excluded: list[Path]) -> list[FileTask]:
    """Every regular file under SRC in a stable order, minus our own outputs and inputs."""
    return list(_iter_files(src, excluded))


def _iter_files(src: Path, excluded: list[Path]) -> Iterator[FileTask]:
    """:func:`_files`, streamed: one directory listing in memory at a time."""
    if src.is_file():
        yield FileTask(src.resolve(), src.name)  # named on the command line: the one path we resolve
        return
    skip = {str(p.resolve()) for p in excluded}
    top = src.resolve()
    if any(str(folder) in skip for folder in (top, *top.parents)):
        return  # SRC lies in one of our own folders: nothing in it is an input
    for root, dirs, names in os.walk(src, followlinks=False):
        here = Path(root)
        resolved = here.resolve()
        if resolved != top and top not in resolved.parents:  # a folder swapped for a link mid-walk
            dirs[:] = []
            yield FileTask(here, here.relative_to(src).as_posix(), REASON_LINK)
            continue
        yield from _listed(here, here.relative_to(src).as_posix(), f"{resolved}{os.sep}", dirs, names, skip)


def _listed(
    here: Path, relative: str, resolved: str, dirs: list[str], names: list[str], skip: set[str]
) -> Iterator[FileTask]:
    """One folder of :func:`_iter_files`: its files and links in name order; prunes ``dirs`` in place.

    Every folder above ``here`` was checked against ``skip`` on the way down, so a name is checked alone.
    """
    links = sorted(d for d in dirs if os.path.islink(here / d))  # listed, never entered
    dirs[:] = sorted(d for d in dirs if d not in links and resolved + d not in skip)
    prefix = "" if relative == "." else f"{relative}/"
    for name in sorted([*names, *links]):
        if resolved + name in skip:
            continue
        path = here / name
        try:
            refusal = refusal_for_mode(os.lstat(path).st_mode)  # lstat: a link is never followed
        except OSError:
            continue  # gone since the listing
        yield FileTask(path, prefix + name, refusal)


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

    def __init__(
        self, dst: Path, secret: bytes, policy: Policy, before_commit: Callable[[], None] | None = None
    ) -> None:
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
        self._committer: threading.Thread | None = None
        self._failure: tuple[OSError, list[str]] | None = None  # a background commit's error, its lines

    def add(self, digest: str, row: dict[str, str] | None = None) -> None:
        """Journal an input as done, with its manifest row (images) - written at the next checkpoint."""
        line = self.line(digest, row)
        if line is not None:
            self._pending.append(line)

    @staticmethod
    def line(digest: str, row: dict[str, str] | None = None) -> str | None:
        """The journal line for an input (None for a digest too short to be one)."""
        if len(digest) < DONE_DIGEST_HEX:
            return None
        line = digest[:DONE_DIGEST_HEX]
        if row is not None:
            line += "\t" + "\t".join(_journal_field(row.get(c, "")) for c in JOURNAL_COLUMNS)
        return line

    def rows(self, chunk_rows: int = 20_000) -> RowSpool:
        """Every manifest row journaled under this fingerprint, as a rank-1 spool (bounded memory)."""
        spool = RowSpool(chunk_rows, rank=1)
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                fields = line.rstrip("\n").split("\t")
                if len(fields) == len(JOURNAL_COLUMNS) + 1:
                    spool.add(dict(zip(JOURNAL_COLUMNS, fields[1:], strict=True)))
        return spool

    def checkpoint(self, *, force: bool = False) -> None:
        """If due (or ``force``): make outputs durable, then record their inputs as done.

        A checkpoint commits in a background thread (``syncfs`` waits on the disk, the
        workers need not), one commit at a time: every :data:`COMMIT_FILES` files while the
        last commit has ended, and waiting for it when due; ``force`` waits for every
        commit to end. A failed commit's error (a full disk) is raised by the next call,
        its lines kept.
        """
        if not (force or self._due()) and self._failure is None:
            return
        self.wait()
        if not self._pending:
            return
        if self._before_commit is not None:
            self._before_commit()  # in this thread: the records it flushes are this thread's
        lines, self._pending = self._pending, []
        self._last = time.monotonic()
        if force:
            try:
                self._commit(lines)
            except OSError:
                self._pending[:0] = lines  # still pending, in order
                raise
            return
        self._committer = threading.Thread(target=self._commit_in_background, args=(lines,),
                                           name="medfed-done-index", daemon=True)
        self._committer.start()

    def _due(self) -> bool:
        """A commit is due: enough lines or time since the last, or a few lines and no commit running."""
        pending = len(self._pending)
        if pending >= CHECKPOINT_FILES or time.monotonic() - self._last >= CHECKPOINT_SECONDS:
            return True
        return pending >= COMMIT_FILES and (self._committer is None or not self._committer.is_alive())

    def wait(self) -> None:
        """Until the background commit (if any) has ended; raise what it failed with."""
        if self._committer is not None:
            self._committer.join()
            self._committer = None
        failure, self._failure = self._failure, None
        if failure is not None:
            error, lines = failure
            self._pending[:0] = lines  # still pending, in order, ahead of later ones
            raise error

    @property
    def unwritten(self) -> int:
        """Lines journaled in memory only (a re-run redoes those inputs)."""
        return len(self._pending)

    def _commit_in_background(self, lines: list[str]) -> None:
        try:
            self._commit(lines)
        except OSError as err:
            self._failure = (err, lines)

    def _commit(self, lines: list[str]) -> None:
        """Make every output written so far durable, then append ``lines`` to the journal."""
        _sync_filesystem(self.dst)
        self.append(lines)

    def append(self, lines: list[str], *, fsync: bool = True) -> None:
        """Append ``lines`` to the journal now; the caller has made their outputs durable.

        A torn last line (a crash mid-append) is ended first so it cannot glue itself to ours.
        ``fsync=False`` is for callers that can rebuild lost lines from durable records.
        """
        if not lines:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
            data = memoryview((("\n" if torn else "") + "\n".join(lines) + "\n").encode("utf-8"))
            try:
                while data:
                    data = data[os.write(fd, data):]
                if fsync:
                    os.fsync(fd)
            except OSError:  # a full disk: no torn line may glue itself to the next checkpoint's
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)

    def sync(self) -> None:
        """Force lines appended with ``fsync=False`` to disk."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


JOURNAL_COLUMNS = ("patient", "study_uid", "series_uid", "sop_uid", "accession", "path")


def _journal_field(value: str) -> str:
    """Pseudonyms, UIDs and paths never hold tabs or newlines; make sure of it."""
    return str(value).replace("\t", " ").replace("\n", " ").replace("\r", " ")


def written_this_run(path: Path, mark_ns: int) -> bool:
    """True if ``path`` exists and was written after the run's start mark (by this run)."""
    try:
        return path.stat().st_mtime_ns >= mark_ns
    except OSError:
        return False


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sweep_temporaries(dst: Path) -> None:
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
CHUNK_FILES = 16  # files per pool task at most: one inter-process round trip serves this many files
WINDOW_CHUNKS = 3  # tasks in flight per worker: keeps every worker busy while the parent records


def _refused_unread(task: FileTask) -> FileResult:
    """The result for a link or special file: refused here, in order, never handed to a worker."""
    return FileResult(KIND_QUARANTINED, "", reason=task.refusal or REASON_LINK, unread=True)


def _run_chunk(fn: ProcessFn, paths: list[str]) -> list[FileResult]:
    """One pool task: de-identify a few files in a row (in a worker process)."""
    return [fn(path) for path in paths]


def _chunk_size(total: int, workers: int) -> int:
    """Files per pool task: :data:`CHUNK_FILES`, fewer when a small run would leave a worker idle.

    Applied to the files still to hand out, it also shrinks the last tasks of a run, so that
    no worker ends long after the others (guided self-scheduling, see :class:`_Plan`).
    """
    return max(1, min(CHUNK_FILES, total // (workers * 4)))


def _listed_at_most(src: Path, excluded: list[Path], cap: int) -> int:
    """How many files :func:`_iter_files` lists, counting no further than ``cap`` (a short walk)."""
    return sum(1 for _ in islice(_iter_files(src, excluded), cap))


@dataclass
class _Plan:
    """How many files each pool task takes: :func:`_chunk_size` of the files left, once their number is known.

    The full count is made while the workers already run (it is a walk of SRC), so it
    arrives after the first tasks were handed out; until then tasks take ``chunk`` files.
    """

    chunk: int
    total: int | None = None  # files listed in all, once counted

    def size(self, handed_out: int, workers: int) -> int:
        if self.total is None:
            return self.chunk
        return min(self.chunk, _chunk_size(self.total - handed_out, workers))


def isolated(task: FileTask, job: Job, fn: ProcessFn) -> FileResult:
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


def new_pool(job: Job, workers: int, *, fork: bool) -> ProcessPoolExecutor:
    """A pool whose workers each hold a :class:`~anonymization.worker.FileWorker` for ``job``.

    ``fork`` (where the platform has it): the workers inherit the parent's imported engine
    instead of each importing it anew (a spawned worker costs about 0.4 CPU-seconds, as
    much as 150 small files); they are started here, at once, before the process has any
    other thread and before it loads the audit signing key. Pools made later (after a
    worker died) are spawned.
    """
    method = "fork" if fork and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                               initializer=init_worker, initargs=(job,))
    if method == "fork":
        gc.freeze()  # the workers' collector leaves the inherited objects (and their pages) alone
        try:
            pool.submit(os.getpid)  # a fork pool starts all its workers on the first task: now
        finally:
            gc.unfreeze()
    return pool


def _results(
    tasks: Iterable[FileTask], job: Job, workers: int, fn: ProcessFn = process_path, chunk: int = CHUNK_FILES,
    plan: _Plan | None = None,
) -> _Results:
    """Results in task order: in this process, or from a process pool, ``chunk`` files per task.

    The pool (if any) is started, and its first tasks handed out, by this call, not by the
    first ``next``. ``plan`` (optional) sizes the tasks instead of ``chunk``, smaller towards
    the end. Links and special files are answered here, unread, in their place in the order.
    If a worker process dies (a decoder crash, the OOM killer), the files it may have held
    are re-run in fresh processes: the culprit is quarantined, the others are de-identified,
    the batch goes on.
    """
    if workers <= 1:
        init_worker(job)
        return _Results(_in_process(tasks, fn), None, [])
    pool, deaths = new_pool(job, workers, fork=True), []
    pending: deque[tuple[list[FileTask], Future[list[FileResult]]]] = deque()
    todo = iter(tasks)
    plan = plan if plan is not None else _Plan(chunk)
    try:
        handed_out = _hand_out(pool, todo, pending, workers, fn, plan, 0)  # the workers start now, not at next()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    return _Results(_pooled(pool, todo, job, workers, fn, plan, deaths, pending, handed_out), pool, deaths)


class _Results(Iterator[tuple[FileTask, FileResult]]):
    """What :func:`_results` returns; ``close`` also stops a pool that no result was read from yet."""

    def __init__(self, results: Generator[tuple[FileTask, FileResult], None, None],
                 pool: ProcessPoolExecutor | None, deaths: list[int]) -> None:
        self._results = results
        self._pool = pool
        self._deaths = deaths

    @property
    def worker_died(self) -> bool:
        """A worker process died during the run (its files were re-run; it may have left temporaries)."""
        return bool(self._deaths)

    def __next__(self) -> tuple[FileTask, FileResult]:
        return next(self._results)

    def close(self) -> None:
        self._results.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _in_process(tasks: Iterable[FileTask], fn: ProcessFn) -> Iterator[tuple[FileTask, FileResult]]:
    for task in tasks:
        yield task, _refused_unread(task) if task.refusal is not None else fn(str(task.path))


def _merged(batch: list[FileTask], results: list[FileResult]) -> Iterator[tuple[FileTask, FileResult]]:
    """A chunk's tasks with their results (the workers saw only its regular files)."""
    done = iter(results)
    for task in batch:
        yield task, _refused_unread(task) if task.refusal is not None else next(done)


def _hand_out(
    pool: ProcessPoolExecutor, todo: Iterator[FileTask],
    pending: deque[tuple[list[FileTask], Future[list[FileResult]]]], workers: int, fn: ProcessFn, plan: _Plan,
    handed_out: int,
) -> int:
    """Submit tasks until :data:`WINDOW_CHUNKS` per worker are in flight; returns the files handed out so far."""
    while len(pending) < workers * WINDOW_CHUNKS and (batch := list(islice(todo, plan.size(handed_out, workers)))):
        paths = [str(t.path) for t in batch if t.refusal is None]
        pending.append((batch, pool.submit(_run_chunk, fn, paths)))
        handed_out += len(batch)
    return handed_out


def _pooled(
    pool: ProcessPoolExecutor, todo: Iterator[FileTask], job: Job, workers: int, fn: ProcessFn, plan: _Plan,
    deaths: list[int], pending: deque[tuple[list[FileTask], Future[list[FileResult]]]] | None = None,
    handed_out: int = 0,
) -> Generator[tuple[FileTask, FileResult], None, None]:
    pending = pending if pending is not None else deque()
    chunk = plan.chunk
    try:
        while True:
            handed_out = _hand_out(pool, todo, pending, workers, fn, plan, handed_out)
            if not pending:
                return
            batch, future = pending.popleft()
            try:
                results = future.result()
            except Exception:  # noqa: BLE001 - a worker died (BrokenProcessPool)
                log.warning("a de-identification worker died; isolating the files it held")
                deaths.append(len(batch))
                pool.shutdown(wait=True, cancel_futures=True)
                held = [(batch, future), *pending]
                pending.clear()
                yield from _recovered(held, job, workers, fn, chunk, deaths)
                pool = new_pool(job, workers, fork=False)
                continue
            yield from _merged(batch, results)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _recovered(
    held: list[tuple[list[FileTask], Future[list[FileResult]]]], job: Job, workers: int, fn: ProcessFn, chunk: int,
    deaths: list[int],
) -> Iterator[tuple[FileTask, FileResult]]:
    """The held tasks' results, in order, after a worker died.

    A chunk that finished keeps its results. The others run again one file per task in
    a fresh pool; where that was already so, each file runs alone in its own process.
    """
    for finished, group in groupby(held, key=lambda item: _finished(item[1])):
        items = list(group)
        if finished:
            for batch, future in items:
                yield from _merged(batch, future.result())
        else:
            yield from _rerun([task for batch, _future in items for task in batch], job, workers, fn, chunk, deaths)


def _rerun(
    tasks: list[FileTask], job: Job, workers: int, fn: ProcessFn, chunk: int, deaths: list[int]
) -> Iterator[tuple[FileTask, FileResult]]:
    if chunk > 1:
        yield from _pooled(new_pool(job, workers, fork=False), iter(tasks), job, workers, fn, _Plan(1), deaths)
        return
    for task in tasks:
        yield task, _refused_unread(task) if task.refusal is not None else isolated(task, job, fn)


def _finished(future: Future[list[FileResult]]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def progress_bar(enabled: bool) -> Progress:
    """A rich progress bar on stderr: files/s and counts only, never a file name."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class FilesPerSecond(ProgressColumn):
        """Throughput over the whole run so far (rich's own speed is a short moving window)."""

        def render(self, task: Task) -> Text:
            elapsed = task.elapsed or 0.0
            rate = task.completed / elapsed if elapsed > 0 else 0.0
            return Text(f"{rate:,.1f} files/s", style="progress.data.speed")

    # Within 80 columns: files done, files/s, ok and quarantined, time left; the summary line gives the rest.
    return Progress(
        TextColumn("deid"),
        BarColumn(bar_width=8),
        MofNCompleteColumn(),
        FilesPerSecond(),
        TextColumn("[green]{task.fields[ok]} ok[/] [yellow]{task.fields[quarantined]} quarantined[/]"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


# ---- the command: preparation ------------------------------------------------------
@dataclass(frozen=True)
class _Paths:
    """Where a run reads and writes, checked against each other."""

    src: Path
    dst: Path
    key_file: Path
    labels: Path | None
    quarantine_dir: Path
    audit_dir: Path
    audit_given: bool  # --audit was passed: a failure to write there names that folder
    audit_key: Path

    @property
    def manifest(self) -> Path:
        return self.dst / MANIFEST_FILE

    def excluded(self, reid_writer: ReidTable | None) -> list[Path]:
        """Our own outputs and inputs: never listed as sources even when they lie under SRC."""
        found = [self.dst, self.quarantine_dir, self.audit_dir, self.key_file, self.audit_key]
        found += [self.labels] if self.labels is not None else []
        return found + ([reid_writer.path] if reid_writer is not None else [])


def _prepare_paths(
    src: Path, dst: Path, key_file: Path, labels: Path | None, quarantine: Path | None,
    audit: Path | None, audit_key: Path | None,
) -> _Paths:
    """Resolve the run's folders and refuse any layout that would mix raw and de-identified data."""
    src, dst, key_file = Path(src), Path(dst), Path(key_file)
    _check_source_and_destination(src, dst)
    quarantine_dir = Path(quarantine) if quarantine is not None else dst.parent / f"{dst.name}-quarantine"
    _check_quarantine_and_key(src, dst, quarantine_dir, key_file)
    audit_dir = Path(audit) if audit is not None else dst / "audit"
    # The trail's signing key: --audit-key, else the one the trail records, else next to the site secret.
    audit_key_path = resolve_key_path(audit_dir, audit_key, key_file.parent / SIGNING_KEY_NAME)
    return _Paths(src, dst, key_file, Path(labels) if labels is not None else None, quarantine_dir, audit_dir,
                  audit is not None, audit_key_path)


def _check_source_and_destination(src: Path, dst: Path) -> None:
    if not src.exists():
        raise DeidError(f"source {src} does not exist; pass the folder holding the DICOM export")
    if dst.resolve() == src.resolve():
        raise DeidError("the destination must differ from the source")
    if lies_inside(src, dst):
        raise DeidError(f"the source {src} lies inside the destination {dst}; choose another destination")
    if src.is_dir() and lies_inside(dst, src):
        raise DeidError(
            f"the destination {dst} lies inside the source {src}: a later run would read its own "
            "output back in as input; choose a destination outside the source"
        )
    if dst.exists() and not dst.is_dir():
        raise DeidError(f"destination {dst} exists and is not a folder")


def _check_quarantine_and_key(src: Path, dst: Path, quarantine_dir: Path, key_file: Path) -> None:
    if lies_inside(quarantine_dir, dst):
        raise DeidError(
            f"the quarantine {quarantine_dir} lies inside the destination {dst}: it holds raw, "
            "identifying files; choose a folder outside the destination"
        )
    if src.is_dir() and lies_inside(quarantine_dir, src):
        raise DeidError(
            f"the quarantine {quarantine_dir} lies inside the source {src}: a later run would read "
            "its copies back in as input; choose a folder outside the source (--quarantine)"
        )
    if lies_inside(key_file, dst):
        raise DeidError(
            f"the key file {key_file} lies inside the destination {dst}; the site secret must "
            "never be stored with de-identified data: keep it elsewhere"
        )


def _prepare_policy(policy: Policy | Path | None, clean_pixel_data: bool | None) -> Policy:
    """The site's policy (None: the default), with ``--clean-pixels`` applied; refuse OCR without tesseract."""
    site_policy = policy if isinstance(policy, Policy) else load_policy(policy)
    if clean_pixel_data is not None and bool(clean_pixel_data) != site_policy.clean_pixel_data:
        site_policy = site_policy.model_copy(update={"clean_pixel_data": bool(clean_pixel_data)})
    if site_policy.clean_pixel_data:
        from anonymization.pixels import REASON_NO_OCR, tesseract_available

        if not tesseract_available():
            raise DeidError(REASON_NO_OCR)
    return site_policy


@dataclass
class _Store:
    """DST made ready: its re-identification table writer, the officer's key and the space reserve."""

    reid_writer: ReidTable | None
    reid_key_pem: bytes | None
    reserve: _Reserve


def _prepare_store(paths: _Paths, secret: bytes, site_policy: Policy, reid_table: Path | None) -> _Store:
    """Create DST, check it is ours (same key), sweep a crashed run's temporaries, reserve space."""
    try:
        reid_writer, reid_key_pem = open_reid_for_run(site_policy, reid_table, paths.dst)
        paths.dst.mkdir(parents=True, exist_ok=True)
        check_store(paths.dst, secret, site_policy.applied_options)
        sweep_temporaries(paths.dst)
        return _Store(reid_writer, reid_key_pem, _Reserve(paths.dst))
    except OSError as err:
        raise DeidError(_cannot_write(err, paths.dst)) from None


def _prepare_done_index(paths: _Paths, secret: bytes, site_policy: Policy, store: _Store) -> DoneIndex:
    reid_flush = getattr(store.reid_writer, "flush", None)  # a done input's sealed row must be on disk too
    try:
        return DoneIndex(paths.dst, secret, site_policy, before_commit=reid_flush if callable(reid_flush) else None)
    except OSError as err:
        store.reserve.release()
        raise DeidError(_cannot_write(err, paths.dst)) from None


def _prepare_trail(paths: _Paths, site_policy: Policy, store: _Store, total: int) -> AuditTrail:
    """Open the audit trail and record the policy in force; a failure to do so stops the run."""
    trail: AuditTrail | None = None
    try:
        trail = open_trail(paths.audit_dir, audit_key=paths.audit_key, default_key=paths.audit_key,
                           forbidden=(paths.dst,), fsync=False)
        trail.record_policy("deidentification", {**site_policy.model_dump(mode="json", exclude={"reid"}),
                                                 "reid_table": site_policy.reid is not None,
                                                 "tool": f"medfed {MEDFED_VERSION}"})
    except AuditError as err:
        store.reserve.release()
        raise DeidError(str(err)) from None
    except OSError as err:
        store.reserve.release()
        message = _cannot_write(err, paths.audit_dir if paths.audit_given else paths.dst)
        if trail is not None and is_disk_full(err):
            _seal_stop(trail, message, {"files": total})
        raise DeidError(message) from None
    if store.reid_writer is not None:
        store.reid_writer.use_signer(trail.signer)  # re-identification rows are signed with the trail's key
    return trail


def _seal_stop(trail: AuditTrail, reason: str, counts: dict[str, object]) -> None:
    """End a stopped run's trail with a sealed record of why, if the disk still allows it."""
    try:
        trail.append("deid_stopped", reason=reason, **counts)
        trail.close()
    except OSError:
        pass


# ---- the command: the parent's records ----------------------------------------------
@dataclass
class _Tally:
    deidentified: int = 0  # this run (``resumed`` are counted apart)
    quarantined: int = 0
    skipped: int = 0
    resumed: int = 0
    refused: int = 0

    def counts(self, total: int) -> dict[str, int]:
        """What the end-of-run record says (``deidentified`` includes files done by an earlier run)."""
        return {"files": total, "deidentified": self.deidentified + self.resumed, "resumed": self.resumed,
                "quarantined": self.quarantined, "refused": self.refused, "skipped": self.skipped}


class _Recorder:
    """The parent's side of a run: the only writer of DST's names, the trail, the done-index and the quarantine.

    Results arrive in task order whatever the number of workers, so the records are the same too.
    """

    def __init__(self, paths: _Paths, trail: AuditTrail, done: DoneIndex, store: _Store) -> None:
        self.paths = paths
        self.trail = trail
        self.done = done
        self.store = store
        self.quarantine = Quarantine(paths.quarantine_dir)
        self.tally = _Tally()

    def record(self, task: FileTask, result: FileResult) -> None:
        """Place a worker's output, or quarantine its input, and record which; then checkpoint."""
        try:
            self._record(task, result)
        finally:
            self.done.checkpoint()

    def _record(self, task: FileTask, result: FileResult) -> None:
        if result.kind == KIND_DISK_FULL:  # no file is to blame: stop, quarantine nothing
            raise DiskFullError(_disk_full(self.paths.dst, result.reason))
        if result.kind == KIND_DONE:
            self.trail.append(KIND_SKIPPED, input_digest=result.input_digest, reason=REASON_RESUMED)
            self.tally.resumed += 1
        elif result.kind != KIND_DEIDENTIFIED:
            self.refuse(task, result, result.reason or screening.REASON_UNREADABLE)
        elif result.rel_path is None or result.tmp_path is None:  # cannot happen: fail closed
            self.refuse(task, result, screening.REASON_WRITE)
        else:
            self._place(task, result, result.rel_path, result.tmp_path)

    def _place(self, task: FileTask, result: FileResult, rel_path: str, tmp_path: str) -> None:
        """Rename the output into place (or settle a duplicate of this run) and journal its input."""
        target = self.paths.dst / rel_path
        if written_this_run(target, self.done.mark_ns):
            Path(tmp_path).unlink(missing_ok=True)
            self._duplicate(task, result, target)
            return
        os.replace(tmp_path, target)
        self.trail.append(
            KIND_DEIDENTIFIED,
            input_digest=result.input_digest,
            sop_uid=result.sop_uid,
            path=rel_path,
            actions=result.actions,
            output_digest=result.output_digest,
            **({"pixel_cleaning": result.pixel_cleaning} if result.pixel_cleaning else {}),
        )
        self.done.add(result.input_digest, result.row)
        self.tally.deidentified += 1
        if self.store.reid_writer is not None and result.reid_row is not None:
            self.store.reid_writer.add(*result.reid_row)

    def _duplicate(self, task: FileTask, result: FileResult, target: Path) -> None:
        """A second input with the same output path: the same bytes are a duplicate, others a conflict."""
        if file_sha256(target) != result.output_digest:
            self.refuse(task, result, screening.REASON_DUPLICATE)
            return
        self.trail.append(KIND_SKIPPED, input_digest=result.input_digest, sop_uid=result.sop_uid,
                          reason="duplicate of a file already de-identified in this run")
        self.tally.skipped += 1
        self.done.add(result.input_digest)  # its row is the first copy's

    def refuse(self, task: FileTask, result: FileResult, reason: str) -> None:
        """Quarantine the input (a copy, unless it was never read) and record why."""
        try:
            self.quarantine.add(task.path, task.relative, reason, result.input_digest, copy=not result.unread)
        except OSError as err:
            if is_disk_full(err):
                raise DiskFullError(_disk_full(self.paths.quarantine_dir, err)) from None
            raise
        self.trail.append(KIND_QUARANTINED, input_digest=result.input_digest, reason=reason)
        log.info("quarantined file %s: %s", result.input_digest[:16] or "(unread)", reason)
        if result.unread:
            self.tally.refused += 1
        else:
            self.tally.quarantined += 1

    def close(self, stopped: DiskFullError | None, *, sweep: bool) -> None:
        """After the last result (or an interruption): sweep temporaries if any may be left, make the journal durable.

        A run that received every result, with no worker lost, left none: each output was renamed or removed.
        """
        if sweep:
            sweep_temporaries(self.paths.dst)  # also gives back the space of outputs still in flight
        self.store.reserve.release()  # after a full disk: room for the last journal lines and the stop record
        try:
            if self.store.reid_writer is not None:
                self.store.reid_writer.close()
            self.done.checkpoint(force=True)  # even after an interruption: what is in place is done
        except OSError as err:
            if stopped is None or not is_disk_full(err):
                raise
            log.warning("the last %d done-index line(s) could not be written; a re-run redoes those files",
                        self.done.unwritten)


def _deidentify_all(
    recorder: _Recorder, results: Iterator[tuple[FileTask, FileResult]] | _Results, total: int, progress: bool
) -> DiskFullError | None:
    """Record every result; a full disk stops the run (returned), anything else propagates."""
    stopped: DiskFullError | None = None
    complete = False
    pydicom_logger = logging.getLogger("pydicom")
    pydicom_level = pydicom_logger.level
    try:
        with closing(results), progress_bar(progress) as bar:  # closing: the pool is gone before the sweep
            bar_task = bar.add_task("deid", total=total, ok=0, quarantined=0, skipped=0, resumed=0)
            tally = recorder.tally
            for task, result in results:
                try:
                    recorder.record(task, result)
                finally:
                    if progress:
                        bar.update(bar_task, advance=1, ok=tally.deidentified, skipped=tally.skipped,
                                   quarantined=tally.quarantined + tally.refused, resumed=tally.resumed)
        recorder.done.wait()  # a background commit's failure stops the run like any other
        complete = not getattr(results, "worker_died", True)
    except DiskFullError as err:
        stopped = err
    except OSError as err:  # the trail, the journal, a rename: the disk, not a file, is to blame
        if not is_disk_full(err):
            raise
        stopped = DiskFullError(_disk_full(recorder.paths.dst, err))
    finally:
        pydicom_logger.setLevel(pydicom_level)
        recorder.close(stopped, sweep=not complete)
    return stopped


def _finish(recorder: _Recorder, stopped: DiskFullError | None, total: int, secret: bytes, site_policy: Policy,
            labels: LabelTable | None) -> DeidSummary:
    """Seal the trail: with the stop record (and raise), or after rebuilding the manifest."""
    trail, paths = recorder.trail, recorder.paths
    counts = recorder.tally.counts(total)
    fingerprint = key_fingerprint(secret)
    if stopped is not None:
        try:
            trail.append("deid_stopped", reason=str(stopped), **counts, key_fingerprint=fingerprint)
            trail.close()  # seals the run: it ends here, and says why
        except OSError as err:
            raise DiskFullError(f"{stopped}; the audit trail could not be sealed either ({err.strerror})") from None
        raise stopped
    journal = recorder.done.rows()
    try:
        write_merged(paths.manifest, journal, paths.dst, labels=labels.labels if labels else None,
                     label_column=labels.column if labels else "accession")
    finally:
        journal.close()
    trail.append("deid_run", **counts, profile=list(site_policy.applied_options), key_fingerprint=fingerprint)
    trail.close()  # seals the run
    tally = recorder.tally
    return DeidSummary(
        deidentified=tally.deidentified + tally.resumed,
        resumed=tally.resumed,
        quarantined=tally.quarantined,
        skipped=tally.skipped,
        refused=tally.refused,
        dst=paths.dst,
        quarantine_dir=paths.quarantine_dir,
        audit_dir=paths.audit_dir,
        manifest=paths.manifest,
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
    if workers < 1:
        raise DeidError("--workers must be at least 1")
    paths = _prepare_paths(src, dst, key_file, labels, quarantine, audit, audit_key)
    secret = load_or_create_secret(paths.key_file)
    site_policy = _prepare_policy(policy, clean_pixel_data)
    labels_read = (read_labels(paths.labels, Pseudonymizer(secret), retain_uids=site_policy.retain_uids)
                   if paths.labels is not None else None)
    store = _prepare_store(paths, secret, site_policy, reid_table)
    done = _prepare_done_index(paths, secret, site_policy, store)
    job = Job(secret=secret, dst=str(paths.dst.resolve()), options=site_policy.table_options, policy=site_policy,
              reid_public_key=store.reid_key_pem, done_index=str(done.path))
    excluded = paths.excluded(store.reid_writer)
    # A short walk sizes the first tasks; the full count (the bar's total) runs while the workers do.
    plan = _Plan(_chunk_size(_listed_at_most(paths.src, excluded, CHUNK_FILES * workers * 4), workers))
    results: _Results | None = None
    try:  # the workers start before the trail opens: they never hold its signing key
        results = _results(_iter_files(paths.src, excluded), job, workers, chunk=plan.chunk, plan=plan)
        plan.total = total = sum(1 for _ in _iter_files(paths.src, excluded))
        log.info("de-identifying %d file(s) with %d worker(s)", total, workers)
        trail = _prepare_trail(paths, site_policy, store, total)
    except BaseException:
        if results is not None:
            results.close()
            sweep_temporaries(paths.dst)  # the first tasks were handed out: their outputs are never placed
        store.reserve.release()
        raise
    recorder = _Recorder(paths, trail, done, store)
    stopped = _deidentify_all(recorder, results, total, progress)
    summary = _finish(recorder, stopped, total, secret, site_policy, labels_read)
    log.info("%s", summary.line())
    return summary
