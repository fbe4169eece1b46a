"""Scale and restarts: resumable runs, flat memory, progress, and no ML stack in ``deid run``."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

import anonymization.batch as batch
from anonymization.batch import DONE_DIR, run_deid
from anonymization.manifest import COLUMNS, RowSpool, write_merged
from tests.dicom_factory import PHI_MARKERS, Patient, make_ct, write

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def make_source(src: Path, n: int) -> list[Path]:
    """``n`` factory CTs of a few patients, in a PACS-like tree."""
    paths = []
    for i in range(n):
        ds = make_ct(Patient(i % 3), study=i % 2, instance=i)
        paths.append(write(ds, src / f"p{i % 3}" / f"s{i % 2}" / f"img{i:03d}.dcm"))
    return paths


def outputs(dst: Path) -> dict[Path, int]:
    """Every output image and its modification time (ns)."""
    return {p: p.stat().st_mtime_ns for p in sorted((dst / "images").rglob("*.dcm"))}


def manifest(dst: Path) -> list[dict[str, str]]:
    with open(dst / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


# ---- resume ------------------------------------------------------------------------------------
def test_rerun_skips_done_inputs_and_rewrites_nothing(tmp_path: Path) -> None:
    src, dst, key = tmp_path / "src", tmp_path / "out", tmp_path / "k.key"
    make_source(src, 8)
    first = run_deid(src, dst, key, progress=False)
    before, before_manifest = outputs(dst), (dst / "manifest.csv").read_bytes()
    second = run_deid(src, dst, key, progress=False)
    assert (first.deidentified, first.resumed) == (8, 0)
    assert (second.deidentified, second.resumed, second.quarantined) == (8, 8, 0)
    assert "8 already done" in second.line()
    assert outputs(dst) == before  # not one file rewritten
    assert (dst / "manifest.csv").read_bytes() == before_manifest
    records = [json.loads(line) for line in (dst / "audit" / "audit.jsonl").read_text().splitlines()]
    resumed = [r for r in records if r.get("reason") == batch.REASON_RESUMED]
    assert len(resumed) == 8 and all(len(r["input_digest"]) == 64 for r in resumed)


def test_done_index_holds_keyed_digests_only(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "out"
    make_source(src, 4)
    run_deid(src, dst, tmp_path / "k.key", progress=False)
    (index,) = (dst / DONE_DIR).iterdir()
    assert re.fullmatch(r"[0-9a-f]{16}\.txt", index.name)
    lines = index.read_text().splitlines()
    assert len(lines) == 4
    for line in lines:  # keyed digest, then the manifest row: pseudonyms and a path only
        digest, patient, study, series, sop, accession, path = line.split("\t")
        assert re.fullmatch(r"[0-9a-f]{32}", digest) and re.fullmatch(r"P[A-Z2-7]{20}", patient)
        assert all(uid.startswith("2.25.") for uid in (study, series, sop)) and path.startswith("images/")
    text = index.read_text().lower()
    assert not any(marker.lower() in text for marker in PHI_MARKERS)


def test_interrupted_run_resumes_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst, key = tmp_path / "src", tmp_path / "out", tmp_path / "k.key"
    make_source(src, 9)
    real = batch._results

    def interrupted(*args: object, **kwargs: object):  # noqa: ANN202 - a generator like the real one
        for count, item in enumerate(real(*args, **kwargs)):
            if count == 5:
                raise KeyboardInterrupt  # the operator pressed Ctrl-C
            yield item

    monkeypatch.setattr(batch, "_results", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_deid(src, dst, key, progress=False)
    monkeypatch.setattr(batch, "_results", real)
    assert len(outputs(dst)) == 5
    assert not [p for p in dst.rglob("*") if p.name.endswith(".tmp")]
    summary = run_deid(src, dst, key, progress=False)
    assert (summary.deidentified, summary.resumed, summary.quarantined) == (9, 5, 0)
    assert len(manifest(dst)) == 9 and len(outputs(dst)) == 9


def test_another_policy_redoes_everything(tmp_path: Path) -> None:
    from anonymization.policy import Policy

    src, dst, key = tmp_path / "src", tmp_path / "out", tmp_path / "k.key"
    make_source(src, 3)
    run_deid(src, dst, key, progress=False)
    other = Policy(retain_device_identity=True)
    summary = run_deid(src, dst, key, progress=False, policy=other)
    assert (summary.deidentified, summary.resumed) == (3, 0)
    assert len(list((dst / DONE_DIR).iterdir())) == 2


def test_resume_with_workers_and_labels_update(tmp_path: Path) -> None:
    src, dst, key = tmp_path / "src", tmp_path / "out", tmp_path / "k.key"
    paths = make_source(src, 6)
    run_deid(src, dst, key, workers=2, progress=False)
    accession = pydicom.dcmread(paths[0]).AccessionNumber
    labels = tmp_path / "labels.csv"
    labels.write_text(f"AccessionNumber,label\n{accession},1\n")
    summary = run_deid(src, dst, key, workers=2, labels=labels, progress=False)
    assert summary.resumed == 6
    assert sorted(r["label"] for r in manifest(dst)).count("1") >= 1  # labels reach rows of earlier runs


def test_duplicate_within_run_found_on_disk(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    ct = Path(get_testdata_file("CT_small.dcm"))
    shutil.copy(ct, src / "a.dcm")
    shutil.copy(ct, src / "b.dcm")
    changed = pydicom.dcmread(ct)  # same instance UID, other pixels
    arr = changed.pixel_array.copy()
    arr[0, 0] += 1
    changed.PixelData = arr.tobytes()
    changed.save_as(src / "c.dcm")
    summary = run_deid(src, tmp_path / "out", tmp_path / "k.key", progress=False)
    assert (summary.deidentified, summary.skipped, summary.quarantined) == (1, 1, 1)


# ---- bounded memory -----------------------------------------------------------------------------
def test_row_spool_spills_and_merges_sorted_latest_wins(tmp_path: Path) -> None:
    root = tmp_path / "store"
    for name in ("a", "b", "c", "d", "gone"):
        (root / "images").mkdir(parents=True, exist_ok=True)
        if name != "gone":
            (root / "images" / f"{name}.dcm").write_bytes(b"x")
    path = root / "manifest.csv"

    def row(name: str, label: str = "", series: str = "old") -> dict[str, str]:
        return {"patient": "P", "study_uid": "1", "series_uid": series, "sop_uid": name, "accession": "",
                "path": f"images/{name}.dcm", "label": label}

    with open(path, "w", newline="") as fh:  # an earlier run's manifest
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS), lineterminator="\n")
        writer.writeheader()
        for name in ("a", "c", "gone"):
            writer.writerow(row(name, label="0"))
    spool = RowSpool(chunk_rows=2)
    for name, label in (("d", "1"), ("b", "1"), ("c", "1"), ("b", "2")):
        spool.add(row(name, label, series="new"))
    assert spool._chunks, "rows must have spilled to disk"
    try:
        assert write_merged(path, spool, root) == 4
    finally:
        spool.close()
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    # The newest row wins, but without a labels file a path keeps the label the earlier manifest gave it.
    assert [(r["sop_uid"], r["series_uid"], r["label"]) for r in rows] == [
        ("a", "old", "0"), ("b", "new", "2"), ("c", "new", "0"), ("d", "new", "1")]
    spool = RowSpool()
    write_merged(path, spool, root, labels={"": "7"})
    with open(path, newline="") as fh:
        assert {r["label"] for r in csv.DictReader(fh)} == {"7"}


def test_files_are_listed_lazily(tmp_path: Path) -> None:
    make_source(tmp_path / "src", 3)
    listing = batch._iter_files(tmp_path / "src", [])
    assert iter(listing) is listing  # a generator: one directory in memory at a time
    assert len(list(listing)) == 3


# ---- progress and imports -------------------------------------------------------------------------
def test_progress_shows_rate_and_counts_never_names(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_source(src, 3)
    (src / "Phiname_notes.txt").write_text("x")
    code = (
        "import sys; from anonymization.batch import run_deid; "
        f"run_deid({str(src)!r}, {str(tmp_path / 'out')!r}, {str(tmp_path / 'k.key')!r}, progress=True)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "files/s" in proc.stderr and "3 ok" in proc.stderr and "1 quarantined" in proc.stderr
    assert "Phiname" not in proc.stderr and "img0" not in proc.stderr


def test_deid_run_imports_neither_torch_nor_flower(tmp_path: Path) -> None:
    from anonymization.pixels import tesseract_available

    src = tmp_path / "src"
    make_source(src, 2)
    clean = ', "--clean-pixels"' if tesseract_available() else ""  # the OCR stack must not pull them in either
    code = f"""
import sys
from medfed.cli import app
try:
    app(["deid", "run", {str(src)!r}, {str(tmp_path / 'out')!r}, "--key", {str(tmp_path / 'k.key')!r},
         "--no-progress"{clean}], standalone_mode=False)
except SystemExit as exc:
    assert not exc.code, exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "flwr", "ray", "opacus", "monai"))
print("HEAVY", heavy)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HEAVY []" in proc.stdout, proc.stdout
    assert len(list((tmp_path / "out" / "images").rglob("*.dcm"))) == 2
