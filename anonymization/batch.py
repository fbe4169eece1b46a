"""``medfed deid run``: de-identify a folder of DICOM files into a de-identified store.

One file at a time (optionally in a process pool); the parent is the only
writer of the manifest, the audit trail and the quarantine log, renames each
worker's temporary output into place, and never lets a bad file stop the run
(invariant 7). Nothing it logs or records names a patient (invariant 4).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import multiprocessing
import os
import secrets
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from rich.progress import Progress

from anonymization.audit import AUDIT_FILE, AuditTrail
from anonymization.engine import MEDFED_VERSION
from anonymization.errors import DeidError, KeyFileError, LabelsError
from anonymization.keys import load_or_create_secret
from anonymization.labels import load_labels
from anonymization.manifest import MANIFEST_FILE, merge_rows, read_manifest, write_manifest
from anonymization.pseudonyms import Pseudonymizer
from anonymization.quarantine import QUARANTINE_LOG, Quarantine
from anonymization import screening
from anonymization.table import DEFAULT_OPTIONS
from anonymization.worker import (
    IMAGES_DIR,
    KIND_DEIDENTIFIED,
    KIND_QUARANTINED,
    KIND_SKIPPED,
    OBJECTS_DIR,
    TMP_SUFFIX,
    FileResult,
    Job,
    init_worker,
    process_path,
)

__all__ = ["DeidError", "KeyFileError", "LabelsError", "DeidSummary", "run_deid"]

log = logging.getLogger(__name__)

STATE_FILE = "deid.json"  # which key and profile wrote this store (no identifiers)


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

    def line(self) -> str:
        """One human line, e.g. for the end of ``medfed deid run``."""
        text = f"de-identified {self.deidentified}, quarantined {self.quarantined}"
        if self.quarantined:
            text += f" (see {self.quarantine_dir / QUARANTINE_LOG})"
        if self.skipped:
            text += f", skipped {self.skipped} duplicate(s)"
        return f"{text}; manifest {self.manifest}; audit {self.audit_dir / AUDIT_FILE}"


@dataclass(frozen=True)
class _Task:
    path: Path
    relative: str  # relative to SRC, posix (only ever written to the quarantine folder)


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
    if src.is_file():
        return [_Task(src, src.name)]
    skip = {p.resolve() for p in excluded}

    def skipped(path: Path) -> bool:
        return path in skip or any(parent in skip for parent in path.parents)

    tasks: list[_Task] = []
    for root, dirs, names in os.walk(src, followlinks=False):
        here = Path(root)
        resolved = here.resolve()
        dirs[:] = sorted(d for d in dirs if not skipped(resolved / d))
        for name in sorted(names):
            path = here / name
            if skipped(resolved / name) or not path.is_file():
                continue
            tasks.append(_Task(path, path.relative_to(src).as_posix()))
    return tasks


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
    tasks: list[_Task], job: Job, workers: int, fn: ProcessFn = process_path
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
    """A rich progress bar on stderr; it shows counts only, never a file name."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("de-identifying"),
        BarColumn(),
        MofNCompleteColumn(),
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
    workers: int = 1,
    progress: bool = True,
) -> DeidSummary:
    """De-identify every file under ``src`` into ``dst``; see the module docstring."""
    src, dst, key_file = Path(src), Path(dst), Path(key_file)
    if not src.exists():
        raise DeidError(f"source {src} does not exist; pass the folder holding the DICOM export")
    if workers < 1:
        raise DeidError("--workers must be at least 1")
    if dst.resolve() == src.resolve():
        raise DeidError("the destination must differ from the source")
    if _inside(src, dst):
        raise DeidError(f"the source {src} lies inside the destination {dst}; choose another destination")
    if dst.exists() and not dst.is_dir():
        raise DeidError(f"destination {dst} exists and is not a folder")
    quarantine_dir = Path(quarantine) if quarantine is not None else dst.parent / f"{dst.name}-quarantine"
    if _inside(quarantine_dir, dst):
        raise DeidError(
            f"the quarantine {quarantine_dir} lies inside the destination {dst}: it holds raw, "
            "identifying files; choose a folder outside the destination"
        )
    if _inside(key_file, dst):
        raise DeidError(
            f"the key file {key_file} lies inside the destination {dst}; the site secret must "
            "never be stored with de-identified data: keep it elsewhere"
        )
    audit_dir = Path(audit) if audit is not None else dst / "audit"

    secret = load_or_create_secret(key_file)
    pseudo = Pseudonymizer(secret)
    label_map = load_labels(labels, pseudo) if labels is not None else {}

    dst.mkdir(parents=True, exist_ok=True)
    options = DEFAULT_OPTIONS
    _check_store(dst, secret, options)
    _sweep_temporaries(dst)

    excluded = [dst, quarantine_dir, audit_dir, key_file] + ([Path(labels)] if labels is not None else [])
    tasks = _files(src, excluded)
    log.info("de-identifying %d file(s) with %d worker(s)", len(tasks), workers)

    trail = AuditTrail(audit_dir, fsync=False)
    quarantine_folder = Quarantine(quarantine_dir)
    job = Job(secret=secret, dst=str(dst.resolve()), options=options)
    manifest_path = dst / MANIFEST_FILE
    rows: list[dict[str, str]] = []
    written: dict[str, str] = {}  # final relative path -> output digest, this run
    deidentified = quarantined = skipped = 0

    def refuse(task: _Task, result: FileResult, reason: str) -> None:
        nonlocal quarantined
        quarantine_folder.add(task.path, task.relative, reason, result.input_digest)
        trail.append(KIND_QUARANTINED, input_digest=result.input_digest, reason=reason)
        log.info("quarantined file %s: %s", result.input_digest[:16], reason)
        quarantined += 1

    pydicom_logger = logging.getLogger("pydicom")
    pydicom_level = pydicom_logger.level
    try:
        with _progress(progress) as bar:
            bar_task = bar.add_task("deid", total=len(tasks))
            for task, result in _results(tasks, job, workers):
                try:
                    if result.kind != KIND_DEIDENTIFIED:
                        refuse(task, result, result.reason or screening.REASON_UNREADABLE)
                        continue
                    if result.rel_path is None or result.tmp_path is None:  # cannot happen: fail closed
                        refuse(task, result, screening.REASON_WRITE)
                        continue
                    earlier = written.get(result.rel_path)
                    if earlier is not None:
                        Path(result.tmp_path).unlink(missing_ok=True)
                        if earlier == result.output_digest:
                            trail.append(
                                KIND_SKIPPED,
                                input_digest=result.input_digest,
                                sop_uid=result.sop_uid,
                                reason="duplicate of a file already de-identified in this run",
                            )
                            skipped += 1
                        else:
                            refuse(task, result, screening.REASON_DUPLICATE)
                        continue
                    os.replace(result.tmp_path, dst / result.rel_path)
                    written[result.rel_path] = result.output_digest
                    if result.row is not None:
                        rows.append({**result.row, "label": label_map.get(result.row["accession"], "")})
                    trail.append(
                        KIND_DEIDENTIFIED,
                        input_digest=result.input_digest,
                        sop_uid=result.sop_uid,
                        path=result.rel_path,
                        actions=result.actions,
                        output_digest=result.output_digest,
                    )
                    deidentified += 1
                finally:
                    bar.advance(bar_task)
    finally:
        pydicom_logger.setLevel(pydicom_level)
        _sweep_temporaries(dst)

    write_manifest(manifest_path, merge_rows(read_manifest(manifest_path), rows, dst))
    trail.append(
        "deid_run",
        files=len(tasks),
        deidentified=deidentified,
        quarantined=quarantined,
        skipped=skipped,
        profile=list(options),
        key_fingerprint=_key_fingerprint(secret),
    )
    trail.sync()
    summary = DeidSummary(
        deidentified=deidentified,
        quarantined=quarantined,
        skipped=skipped,
        dst=dst,
        quarantine_dir=quarantine_dir,
        audit_dir=audit_dir,
        manifest=manifest_path,
    )
    log.info("%s", summary.line())
    return summary
