"""``deid run --workers N``: the same store, manifest, audit trail and quarantine log as one worker."""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import pytest

from anonymization import batch
from anonymization.audit import read_records
from anonymization.audit.verify import verify_trail
from anonymization.batch import DONE_DIR, DeidError, run_deid
from anonymization.keys import load_or_create_secret
from anonymization.quarantine import QUARANTINE_LOG
from anonymization.screening import REASON_DUPLICATE
from anonymization.table import DEFAULT_OPTIONS
from anonymization.worker import KIND_QUARANTINED, FileResult, Job
from tests.dicom_factory import Patient, make_ct, write

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNORDERED = ("time", "prev", "sig")  # the clock and the hashes that cover it: all else must match


def make_mixed_source(src: Path) -> None:
    """Enough files for several pool tasks per worker, and every kind of outcome among them."""
    for i in range(36):
        ds = make_ct(Patient(i % 5), study=i % 2, instance=i)
        write(ds, src / f"p{i % 5}" / f"img{i:03d}.dcm")
    first = src / "p0" / "img000.dcm"
    (src / "p0" / "copy-of-img000.dcm").write_bytes(first.read_bytes())  # the same instance again: skipped
    clash = make_ct(Patient(0), study=0, instance=0)  # same SOP instance, other content: quarantined
    clash.PixelData = bytes(len(clash.PixelData))  # other pixels under the same UID
    write(clash, src / "p9" / "clash.dcm")
    (src / "p2" / "notes.txt").write_text("not DICOM")  # quarantined: not DICOM
    (src / "p3" / "link.dcm").symlink_to(first)  # refused unread
    (src / "p4" / "cut.dcm").write_bytes(first.read_bytes()[:700])  # quarantined: truncated


def run_with(workers: int, src: Path, root: Path, key: Path) -> Path:
    dst = root / f"out-{workers}"
    run_deid(src, dst, key, workers=workers, progress=False)
    return dst


def trail_content(dst: Path) -> list[dict[str, object]]:
    """Every record of the verified trail (seals included), less its clock and the hashes over it."""
    assert verify_trail(dst / "audit").exit_code == 0
    return [{k: v for k, v in r.items() if k not in UNORDERED} for r in read_records(dst / "audit")]


def quarantine_content(root: Path, dst: Path) -> list[dict[str, str]]:
    lines = (root / f"{dst.name}-quarantine" / QUARANTINE_LOG).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


def store_bytes(dst: Path) -> dict[str, bytes]:
    """The de-identified files, the manifest and the done-index, by path relative to DST."""
    return {p.relative_to(dst).as_posix(): p.read_bytes() for p in sorted(dst.rglob("*"))
            if p.is_file() and p.relative_to(dst).parts[0] in ("images", "objects", DONE_DIR, "manifest.csv")}


def test_two_workers_write_exactly_what_one_worker_writes(tmp_path: Path) -> None:
    src, key = tmp_path / "src", tmp_path / "k.key"
    make_mixed_source(src)
    one, two = run_with(1, src, tmp_path, key), run_with(2, src, tmp_path, key)

    records = trail_content(one)
    kinds = [r["kind"] for r in records]
    assert kinds.count("deidentified") == 36 and kinds.count("skipped") == 1
    assert kinds.count("quarantined") == 4 and kinds[-2:] == ["deid_run", "seal"]
    assert [r for r in records if r.get("reason") == REASON_DUPLICATE]
    assert trail_content(two) == records  # same records, same order, same seq
    assert quarantine_content(tmp_path, two) == quarantine_content(tmp_path, one)
    store = store_bytes(one)
    assert len([p for p in store if p.startswith("images/")]) == 36
    assert store_bytes(two) == store  # outputs, manifest.csv and done-index, byte for byte


def test_two_workers_resume_exactly_as_one_worker(tmp_path: Path) -> None:
    """A re-run over a finished store: every input found done, recorded in the same order."""
    src, key = tmp_path / "src", tmp_path / "k.key"
    make_mixed_source(src)
    one, two = run_with(1, src, tmp_path, key), run_with(2, src, tmp_path, key)
    run_deid(src, one, key, workers=2, progress=False)
    run_deid(src, two, key, workers=1, progress=False)
    assert trail_content(two) == trail_content(one)
    assert store_bytes(two) == store_bytes(one)


def interrupted_then_resumed(workers: int, src: Path, root: Path, key: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Commits in the background (every 2 files when none runs, waited for at 6), Ctrl-C after 20 results."""
    monkeypatch.setattr(batch, "COMMIT_FILES", 2)
    monkeypatch.setattr(batch, "CHECKPOINT_FILES", 6)
    real = batch._results

    def interrupted(*args: object, **kwargs: object) -> Iterator[object]:
        results = real(*args, **kwargs)
        try:
            for count, item in enumerate(results):
                if count == 20:
                    raise KeyboardInterrupt  # the operator pressed Ctrl-C
                yield item
        finally:
            results.close()

    monkeypatch.setattr(batch, "_results", interrupted)
    dst = root / f"out-{workers}"
    with pytest.raises(KeyboardInterrupt):
        run_deid(src, dst, key, workers=workers, progress=False)
    monkeypatch.setattr(batch, "_results", real)
    journal = [line.split("\t") for line in next((dst / DONE_DIR).iterdir()).read_text().splitlines()]
    assert len(journal) == 20  # the first 20 listed are images: each placed one journaled, none after it
    assert all((dst / row[-1]).is_file() for row in journal if len(row) > 1)  # a journaled output exists
    assert not list(dst.rglob("*.tmp"))  # in-flight outputs swept
    summary = run_deid(src, dst, key, workers=workers, progress=False)
    assert summary.resumed == 20
    return dst


def test_interrupted_and_resumed_run_is_the_same_with_two_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, key = tmp_path / "src", tmp_path / "k.key"
    make_mixed_source(src)
    one = interrupted_then_resumed(1, src, tmp_path, key, monkeypatch)
    two = interrupted_then_resumed(2, src, tmp_path, key, monkeypatch)
    assert trail_content(two) == trail_content(one)
    assert store_bytes(two) == store_bytes(one)


def memory_holds(pid: int, needles: tuple[bytes, ...]) -> bool:
    """True if any readable mapping of process ``pid`` holds one of ``needles``."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r") or line.rstrip().endswith(("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            if any(needle in chunk for needle in needles):
                return True
    return False


@pytest.mark.adversarial
def test_a_worker_never_holds_the_audit_signing_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile file that takes over a worker (a decoder exploit) finds no key that seals the trail."""
    src, key = tmp_path / "src", tmp_path / "keys" / "site.key"
    make_mixed_source(src)
    signing_key = key.parent / "audit-signing.key"
    subprocess.run([sys.executable, "-c", "import sys; from anonymization.audit.keys import "
                    "AuditSigner, write_private_key as w; w(__import__('pathlib').Path(sys.argv[1]), "
                    "AuditSigner.generate(None))", str(signing_key)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})  # made elsewhere: never in this process
    real, found = batch._results, {}

    def inspected(*args: object, **kwargs: object) -> Iterator[object]:
        results = real(*args, **kwargs)  # called, as run_deid calls it: the workers start here

        def first_result_inspected() -> Iterator[object]:
            try:
                for count, item in enumerate(results):
                    if count == 0:  # the workers are up, and the parent has opened the trail
                        pem = signing_key.read_bytes()
                        body = b"".join(pem.splitlines()[1:-1])
                        needles = (body, base64.b64decode(body)[-32:])  # the PEM and the raw Ed25519 seed
                        found["parent"] = memory_holds(os.getpid(), needles)
                        found.update({child.pid: memory_holds(child.pid, needles)
                                      for child in multiprocessing.active_children()})
                    yield item
            finally:
                results.close()

        return first_result_inspected()

    monkeypatch.setattr(batch, "_results", inspected)
    run_deid(src, tmp_path / "out", key, workers=2, progress=False)
    assert found.pop("parent")  # the search finds the key where it is
    assert len(found) == 2 and not any(found.values()), found


def _answer(path: str) -> FileResult:
    """Stands in for the engine where only the order and the sizes of the pool's tasks matter."""
    return FileResult(KIND_QUARANTINED, "", reason=Path(path).name)


def test_the_last_pool_tasks_shrink_so_no_worker_ends_long_after_the_other(tmp_path: Path) -> None:
    tasks = [batch.FileTask(tmp_path / f"f{i:03d}", f"f{i:03d}") for i in range(200)]
    plan = batch._Plan(batch.CHUNK_FILES, total=len(tasks))
    sizes, answered, todo, handed_out = [], [], iter(tasks), 0
    pending: deque[tuple[list[batch.FileTask], Future[list[FileResult]]]] = deque()
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        while True:
            handed_out = batch._hand_out(pool, todo, pending, 2, _answer, plan, handed_out)
            if not pending:
                break
            chunk, future = pending.popleft()
            sizes.append(len(chunk))
            answered += [result.reason for result in future.result()]
    assert answered == [task.relative for task in tasks]  # every file, once, in order
    assert sizes[0] == batch.CHUNK_FILES and sizes[-1] == 1  # 200 = 12 x 16 + 8 would end on a task of 8
    assert sizes == sorted(sizes, reverse=True)


def test_the_workers_start_before_the_first_result_is_asked_for(tmp_path: Path) -> None:
    """The parent lists SRC in full (the bar's total) while the workers already de-identify."""
    src, key = tmp_path / "src", tmp_path / "k.key"
    make_mixed_source(src)
    job = Job(secret=load_or_create_secret(key), dst=str(tmp_path / "out"), options=DEFAULT_OPTIONS)
    results = batch._results(batch._iter_files(src, []), job, 2, chunk=4)
    try:
        deadline = time.monotonic() + 20
        while not list((tmp_path / "out").rglob("*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list((tmp_path / "out").rglob("*.tmp")), "no worker wrote an output before next()"
        assert [task.relative for task, _result in results] == [t.relative for t in batch._iter_files(src, [])]
    finally:
        results.close()


def test_a_run_whose_trail_cannot_open_leaves_no_temporary_of_its_started_workers(tmp_path: Path) -> None:
    src, key, dst = tmp_path / "src", tmp_path / "k.key", tmp_path / "out"
    make_mixed_source(src)
    not_a_folder = tmp_path / "audit"
    not_a_folder.write_text("a file where the trail's folder should be\n")
    with pytest.raises(DeidError, match="cannot write"):
        run_deid(src, dst, key, workers=2, progress=False, audit=not_a_folder)
    assert (dst / "images").is_dir()  # the workers had begun ...
    assert not list(dst.rglob("*.tmp"))  # ... and what they wrote was swept
