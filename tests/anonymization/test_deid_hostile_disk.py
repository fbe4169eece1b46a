"""``medfed deid run`` against a hostile disk: links, nested folders, a full disk, bad path values.

Each attack is a test that fails if its defence is removed. The full disk is a
real 2 MB tmpfs (root only): skipped, loudly, where it cannot be mounted, except
under CI=true, where it must run.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from anonymization import batch, worker
from anonymization.audit import read_records
from anonymization.audit.verify import verify_trail
from anonymization.batch import (
    RESERVE_FILE,
    DeidError,
    DiskFullError,
    _iter_files,
    run_deid,
)
from anonymization.policy import Policy
from anonymization.quarantine import QUARANTINE_LOG, Quarantine
from anonymization.worker import REASON_LINK, REASON_PATH_VALUE, REASON_SPECIAL
from medfed.cli import app
from tests.dicom_factory import Patient, make_ct, write

pytestmark = [pytest.mark.adversarial, pytest.mark.integration]

SECRET_BYTES = b"-----BEGIN PRIVATE KEY-----\nTHE-SITE-SIGNING-KEY\n-----END PRIVATE KEY-----\n"


def make_source(src: Path, n: int, *, size: int = 32) -> list[Path]:
    """``n`` factory CTs (``size`` x ``size`` pixels) of a few patients."""
    paths = []
    for i in range(n):
        ds = make_ct(Patient(i % 3), study=i % 2, instance=i)
        if size != 32:
            ds.Rows = ds.Columns = size
            ds.PixelData = np.random.default_rng(i).integers(0, 3000, (size, size), dtype=np.int16).tobytes()
        paths.append(write(ds, src / f"p{i % 3}" / f"img{i:03d}.dcm"))
    return paths


def quarantine_log(folder: Path) -> list[dict[str, str]]:
    path = folder / QUARANTINE_LOG
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def said(result: object) -> str:
    """The CLI's output with rich's line wrapping undone."""
    return " ".join(str(getattr(result, "output", "")).split())


def all_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() or p.is_symlink()] if folder.exists() else []


def mount_tmpfs(folder: Path, size: str) -> None:
    """A real small filesystem; skip (loudly) where that is impossible, unless CI=true."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        message = f"cannot mount a {size} tmpfs (needs root): {done.stderr.strip()}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " -- under CI this test must run")
        pytest.skip("SKIPPED LOUDLY: " + message)


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "2m")
    try:
        yield disk
    finally:
        unmount(disk)


# ---- links and special files ------------------------------------------------------------------
def test_links_and_special_files_are_refused_unread_and_never_copied(tmp_path: Path) -> None:
    keys, src, outside = tmp_path / "keys", tmp_path / "src", tmp_path / "elsewhere"
    keys.mkdir()
    (keys / "site.key").write_bytes(SECRET_BYTES)
    (keys / "audit-signing.key").write_bytes(SECRET_BYTES)
    make_source(src, 2)
    make_source(outside, 1)  # a DICOM tree reachable only through a folder link
    os.symlink(keys / "site.key", src / "site.key")
    os.symlink(keys / "audit-signing.key", src / "p0" / "audit-signing.key")
    os.symlink(outside, src / "more-images")
    os.symlink(tmp_path / "nowhere", src / "dangling")
    os.mkfifo(src / "pipe")  # read blindly, it would hang the run

    summary = run_deid(src, tmp_path / "out", tmp_path / "k.key", progress=False)

    assert (summary.deidentified, summary.quarantined, summary.refused) == (2, 0, 5)
    assert "refused 5 link(s) or special file(s)" in summary.line()
    reasons = {r["source"]: r["reason"] for r in quarantine_log(summary.quarantine_dir)}
    assert reasons == {"site.key": REASON_LINK, "p0/audit-signing.key": REASON_LINK, "more-images": REASON_LINK,
                       "dangling": REASON_LINK, "pipe": REASON_SPECIAL}
    for path in all_files(summary.quarantine_dir):  # only the log: nothing was copied or read
        assert path.name == QUARANTINE_LOG and SECRET_BYTES not in path.read_bytes()
    for path in all_files(tmp_path / "out"):
        assert SECRET_BYTES not in path.read_bytes()
    assert verify_trail(summary.audit_dir).exit_code == 0


def test_listing_refuses_links_without_handing_them_to_a_worker(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_source(src, 1)
    os.symlink(tmp_path / "secret", src / "link.dcm")
    tasks = {t.relative: t.refusal for t in _iter_files(src, [])}
    assert tasks == {"p0/img000.dcm": None, "link.dcm": REASON_LINK}


def test_worker_never_follows_a_file_swapped_for_a_link(tmp_path: Path) -> None:
    """Listed as a regular file, replaced by a link to the key before the worker reads it."""
    (tmp_path / "site.key").write_bytes(SECRET_BYTES)
    swapped = tmp_path / "a.dcm"
    os.symlink(tmp_path / "site.key", swapped)
    worker.init_worker(worker.Job(secret=b"k" * 32, dst=str(tmp_path / "out"), options=()))
    result = worker.process_path(str(swapped))
    assert (result.kind, result.reason, result.unread, result.input_digest) == (
        worker.KIND_QUARANTINED, REASON_LINK, True, "")


def test_quarantine_copy_is_0600_and_never_follows_a_link(tmp_path: Path) -> None:
    (tmp_path / "site.key").write_bytes(SECRET_BYTES)
    (tmp_path / "notes.txt").write_bytes(b"not dicom, identifying")
    os.symlink(tmp_path / "site.key", tmp_path / "swapped.dcm")
    old = os.umask(0o022)
    try:
        folder = Quarantine(tmp_path / "q")
        folder.add(tmp_path / "notes.txt", "notes.txt", "not a DICOM file")
        record = folder.add(tmp_path / "swapped.dcm", "swapped.dcm", "not a DICOM file")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "q" / "notes.txt").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "q").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "q" / QUARANTINE_LOG).stat().st_mode) == 0o600
    assert not (tmp_path / "q" / "swapped.dcm").exists() and REASON_LINK in record["reason"]


def test_quarantined_file_in_a_run_is_0600(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_bytes(b"Patient DOE^JOHN, not a DICOM file")
    old = os.umask(0o022)
    try:
        summary = run_deid(src, tmp_path / "out", tmp_path / "k.key", progress=False)
    finally:
        os.umask(old)
    assert summary.quarantined == 1
    assert stat.S_IMODE((summary.quarantine_dir / "notes.txt").stat().st_mode) == 0o600


# ---- nested folders -----------------------------------------------------------------------------
def test_destination_inside_source_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_source(src, 2)
    with pytest.raises(DeidError, match="the destination .* lies inside the source"):
        run_deid(src, src / "out", tmp_path / "k.key", progress=False)
    with pytest.raises(DeidError, match="quarantine .* lies inside the source"):
        run_deid(src, tmp_path / "out", tmp_path / "k.key", quarantine=src / "q", progress=False)
    result = CliRunner().invoke(app, ["deid", "run", str(src), str(src / "p0" / "out"), "--key",
                                      str(tmp_path / "k.key"), "--no-progress"])
    assert result.exit_code == 2 and "a later run would read its own output back in" in said(result)
    assert not (src / "out").exists() and not (src / "p0" / "out").exists()


def test_source_inside_destination_is_refused(tmp_path: Path) -> None:
    make_source(tmp_path / "store" / "src", 1)
    with pytest.raises(DeidError, match="lies inside the destination"):
        run_deid(tmp_path / "store" / "src", tmp_path / "store", tmp_path / "k.key", progress=False)


# ---- path values --------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("study_uid", ["..", ".", ".1.2", "-1.2"])
def test_retained_uid_that_is_not_a_plain_name_is_quarantined(tmp_path: Path, study_uid: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "out"
    ds = make_ct(Patient(0))
    ds.StudyInstanceUID = study_uid
    write(ds, src / "evil.dcm")
    write(make_ct(Patient(1)), src / "good.dcm")
    summary = run_deid(src, dst, tmp_path / "k.key", progress=False, policy=Policy(retain_uids=True))
    assert (summary.deidentified, summary.quarantined) == (1, 1)
    assert quarantine_log(summary.quarantine_dir)[0]["reason"] == REASON_PATH_VALUE
    outputs = sorted(p.relative_to(dst).parts for p in (dst / "images").rglob("*.dcm"))
    assert len(outputs) == 1 and len(outputs[0]) == 4  # images/<patient>/<study>/<sop>.dcm


def test_plain_name() -> None:
    assert worker.plain_name("1.2.840.113619.2") and worker.plain_name("no-study")
    for bad in ("..", ".", "", "a/b", "-rf", ".hidden", "a\\b", "x" * 200, "a\x00"):
        assert not worker.plain_name(bad), bad


# ---- an unwritable destination --------------------------------------------------------------------
def test_unwritable_destination_says_what_to_do(tmp_path: Path) -> None:
    src, ro = tmp_path / "src", tmp_path / "ro"
    make_source(src, 1)
    ro.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: use a read-only filesystem
        mount_tmpfs(ro, "1m")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    else:
        ro.chmod(0o500)
    try:
        result = CliRunner().invoke(app, ["deid", "run", str(src), str(ro / "out"), "--key",
                                          str(tmp_path / "k.key"), "--no-progress"])
    finally:
        if os.geteuid() == 0:
            unmount(ro)
        else:
            ro.chmod(0o700)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # no traceback
    assert "cannot write to" in said(result) and "choose a destination you can write to" in said(result)


# ---- a full disk --------------------------------------------------------------------------------
def test_full_disk_stops_the_run_seals_the_trail_and_a_rerun_resumes(tmp_path: Path, small_disk: Path) -> None:
    src, dst, key = tmp_path / "src", small_disk / "out", tmp_path / "k.key"
    (src / "0-notes").mkdir(parents=True)
    (src / "0-notes" / "notes.txt").write_bytes(b"not DICOM")  # a real refusal, before the disk fills
    make_source(src, 24, size=256)  # 24 x 128 KiB of pixels: more than the 2 MB disk holds

    result = CliRunner().invoke(app, ["deid", "run", str(src), str(dst), "--key", str(key), "--no-progress"])

    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "is full" in said(result) and "run the same command again" in said(result)
    records = quarantine_log(small_disk / "out-quarantine")
    assert [r["source"] for r in records] == ["0-notes/notes.txt"]  # nothing quarantined for the disk
    assert sorted(all_files(small_disk / "out-quarantine")) == sorted(
        [small_disk / "out-quarantine" / "0-notes" / "notes.txt", small_disk / "out-quarantine" / QUARANTINE_LOG])
    trail = read_records(dst / "audit")
    assert trail[-1]["kind"] == "seal" and trail[-2]["kind"] == "deid_stopped"
    assert "is full" in trail[-2]["reason"] and 0 < trail[-2]["deidentified"] < 24
    assert verify_trail(dst / "audit").exit_code == 0
    assert not list(dst.rglob(f"*{worker.TMP_SUFFIX}")) and not (dst / RESERVE_FILE).exists()
    first = trail[-2]["deidentified"]

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    summary = run_deid(src, dst, key, progress=False)
    assert summary.deidentified == 24 and summary.resumed >= first - 1 and summary.quarantined == 1
    assert len((dst / "manifest.csv").read_text().splitlines()) == 25
    assert verify_trail(dst / "audit").exit_code == 0


@pytest.mark.parametrize(("workers", "checkpoint_files"), [(1, 1000), (2, 1000), (2, 3)])
def test_full_disk_raises_disk_full_error_in_the_api(
    tmp_path: Path, small_disk: Path, workers: int, checkpoint_files: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch, "CHECKPOINT_FILES", checkpoint_files)  # 3: commits in the background fail too
    src = tmp_path / "src"
    make_source(src, 20, size=256)
    with pytest.raises(DiskFullError, match="is full"):
        run_deid(src, small_disk / "out", tmp_path / "k.key", progress=False, workers=workers)
    assert not (small_disk / "out-quarantine").exists()
    assert not (small_disk / "out" / "manifest.csv").exists()  # written by the run that finishes
    assert not list((small_disk / "out").rglob(f"*{worker.TMP_SUFFIX}"))  # in-flight outputs swept
    assert verify_trail(small_disk / "out" / "audit").exit_code == 0


def test_disk_already_full_before_the_run(tmp_path: Path, small_disk: Path) -> None:
    src = tmp_path / "src"
    make_source(src, 1)
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 65536):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    with pytest.raises(DeidError, match="is full"):
        run_deid(src, small_disk / "out", tmp_path / "k.key", progress=False)
    filler.unlink()
    shutil.rmtree(small_disk / "out", ignore_errors=True)
