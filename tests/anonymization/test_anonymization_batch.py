"""``run_deid`` end to end on a small tree: store, manifest, quarantine, audit, reruns."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from anonymization.batch import DeidError, DeidSummary, _files, _results, run_deid
from anonymization.keys import load_or_create_secret
from anonymization.manifest import COLUMNS
from anonymization.pseudonyms import Pseudonymizer
from anonymization.screening import REASON_CRASH
from anonymization.table import DEFAULT_OPTIONS
from anonymization.worker import FileResult, Job, process_path
from tests.dicom_factory import (
    PHI_MARKERS,
    Patient,
    all_bytes_under,
    make_ct,
    pixels,
    tree_digest,
    write,
)

pytestmark = pytest.mark.integration

P0, P1, P2 = Patient(0), Patient(1), Patient(2)
DAY0 = dt.date(2021, 3, 15)


@dataclass
class Site:
    root: Path
    src: Path
    dst: Path
    key: Path
    labels: Path
    summary: DeidSummary
    src_digest: str
    originals: dict[str, pydicom.Dataset]  # relative source path -> original dataset


def build_source(src: Path) -> dict[str, pydicom.Dataset]:
    """A PACS-like export whose folder names themselves carry PHI."""
    originals: dict[str, pydicom.Dataset] = {}

    def put(rel: str, ds: pydicom.Dataset) -> Path:
        originals[rel] = ds
        return write(ds, src / rel)

    p0 = "Phiname0_Zelda PHIPID-837261-0"
    put(f"{p0}/study0/img0.dcm", make_ct(P0, study=0, instance=0, study_date=DAY0))
    put(f"{p0}/study0/img1.dcm", make_ct(P0, study=0, instance=1, study_date=DAY0))
    put(f"{p0}/study1/img0.dcm", make_ct(P0, study=1, instance=0, study_date=DAY0 + dt.timedelta(days=30)))
    put("Phiname1_Zelda/a.dcm", make_ct(P1, study=0, instance=0))
    put("Phiname1_Zelda/b.dcm", make_ct(P1, study=0, instance=1))
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "CT_small.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), src / "MR_small.dcm")
    shutil.copy(get_testdata_file("rtplan.dcm"), src / "rtplan.dcm")  # no pixels: objects/
    # Files to quarantine.
    (src / "notes PHIPID-837261-0.txt").write_text("Phiname0 Zelda: call back")
    put("burned.dcm", make_ct(P2, study=0, instance=0, burned_in=True))
    leak = make_ct(P2, study=0, instance=1)
    leak.Manufacturer = "ZELDA SCANNERS"  # the patient's name where no rule looks
    put("leak.dcm", leak)
    whole = write(make_ct(P2, study=1, instance=0), src / "truncated_pixels.dcm").read_bytes()
    (src / "truncated_pixels.dcm").write_bytes(whole[: len(whole) - 500])
    (src / "truncated_header.dcm").write_bytes(whole[:700])
    return originals


def write_labels(path: Path) -> Path:
    path.write_text(
        "AccessionNumber,label\n"
        f"{P0.accession(0)},1\n"
        f"{P1.accession(0)},0\n"
        "UNKNOWN-ACC,1\n"
    )
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    root = tmp_path_factory.mktemp("site")
    src = root / "export"
    originals = build_source(src)
    labels = write_labels(root / "labels.csv")
    digest = tree_digest(src)
    dst = root / "deid"
    summary = run_deid(src, dst, root / "keys" / "site.key", labels=labels, progress=False)
    return Site(root, src, dst, root / "keys" / "site.key", labels, summary, digest, originals)


def manifest_rows(dst: Path) -> list[dict[str, str]]:
    with open(dst / "manifest.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == COLUMNS
        return list(reader)


def pseudo(site: Site) -> Pseudonymizer:
    return Pseudonymizer(load_or_create_secret(site.key))


# ---- what lands in DST -----------------------------------------------------------
def test_summary_counts(site: Site) -> None:
    s = site.summary
    assert (s.deidentified, s.quarantined, s.skipped) == (8, 5, 0)
    assert s.quarantine_dir == site.root / "deid-quarantine"
    assert s.audit_dir == site.dst / "audit" and s.manifest == site.dst / "manifest.csv"
    assert "de-identified 8, quarantined 5" in s.line() and "quarantine.jsonl" in s.line()


def test_no_identifier_in_any_byte_under_dst(site: Site) -> None:
    blobs = all_bytes_under(site.dst)
    assert any(p.name == "audit.jsonl" for p in blobs) and any(p.name == "manifest.csv" for p in blobs)
    forbidden = list(PHI_MARKERS) + ["CompressedSamples", "study0", "img0.dcm", "leak.dcm"]
    for ds in site.originals.values():
        forbidden += [ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.AccessionNumber]
    for name in ("CT_small.dcm", "MR_small.dcm"):
        ds = pydicom.dcmread(site.src / name)
        forbidden += [ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID]
    for path, data in blobs.items():
        lowered = data.lower()
        for marker in forbidden:
            assert marker.lower().encode() not in lowered, (path.relative_to(site.dst), marker)


def test_manifest_rows_paths_and_labels(site: Site) -> None:
    rows = manifest_rows(site.dst)
    assert len(rows) == 7  # images only: 5 factory CTs + CT_small + MR_small
    assert len({r["path"] for r in rows}) == 7
    p = pseudo(site)
    for row in rows:
        path = site.dst / row["path"]
        assert path.is_file() and "\\" not in row["path"]
        assert re.fullmatch(r"images/P[A-Z2-7]{20}/2\.25\.\d+/2\.25\.\d+\.dcm", row["path"])
        ds = pydicom.dcmread(path)
        assert (row["patient"], row["study_uid"], row["series_uid"], row["sop_uid"]) == (
            ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
        )
        assert row["accession"] == (ds.AccessionNumber or "")
    by_acc = {r["accession"]: r["label"] for r in rows}
    assert by_acc[p.accession(P0.accession(0))] == "1"
    assert by_acc[p.accession(P1.accession(0))] == "0"
    assert by_acc[p.accession(P0.accession(1))] == ""  # not in the labels file
    assert by_acc[""] == ""  # CT_small has no accession number


def test_files_readable_meta_rebuilt_pixels_intact(site: Site) -> None:
    expected = {pixels(seed).tobytes() for seed in (0, 1, 100, 1000, 1001)}
    seen = set()
    for row in manifest_rows(site.dst):
        ds = pydicom.dcmread(site.dst / row["path"])
        meta = ds.file_meta
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert meta.ImplementationVersionName == "MEDFED_010"
        assert meta.ImplementationClassUID.startswith("2.25.")
        assert "SourceApplicationEntityTitle" not in meta
        assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert ds.PatientIdentityRemoved == "YES"
        arr = ds.pixel_array
        if ds.Manufacturer == "ACME":
            seen.add(arr.tobytes())
    assert seen == expected
    ct_small = pydicom.dcmread(site.src / "CT_small.dcm")
    out = [r for r in manifest_rows(site.dst) if r["sop_uid"] == pseudo(site).uid(ct_small.SOPInstanceUID)]
    assert (pydicom.dcmread(site.dst / out[0]["path"]).pixel_array == ct_small.pixel_array).all()


def test_uids_consistent_and_intervals_kept(site: Site) -> None:
    p = pseudo(site)
    outputs = {}
    for rel, original in site.originals.items():
        study = site.dst / "images" / p.patient_id(original.PatientID) / p.uid(original.StudyInstanceUID)
        path = study / f"{p.uid(original.SOPInstanceUID)}.dcm"
        if path.exists():
            outputs[rel] = pydicom.dcmread(path)
    assert len(outputs) == 5
    a = outputs["Phiname0_Zelda PHIPID-837261-0/study0/img0.dcm"]
    b = outputs["Phiname0_Zelda PHIPID-837261-0/study0/img1.dcm"]
    later = outputs["Phiname0_Zelda PHIPID-837261-0/study1/img0.dcm"]
    assert a.SeriesInstanceUID == b.SeriesInstanceUID and a.StudyInstanceUID == b.StudyInstanceUID
    assert a.FrameOfReferenceUID == b.FrameOfReferenceUID and a.SOPInstanceUID != b.SOPInstanceUID
    assert a.PatientID == later.PatientID and a.StudyInstanceUID != later.StudyInstanceUID
    # The ReferencedImageSequence of img0 points at img1's new SOP Instance UID.
    assert a.ReferencedImageSequence[0].ReferencedSOPInstanceUID == b.SOPInstanceUID

    def day(ds: pydicom.Dataset) -> dt.date:
        return dt.datetime.strptime(ds.StudyDate, "%Y%m%d").date()

    assert (day(later) - day(a)).days == 30
    assert 365 <= (DAY0 - day(a)).days <= 3650
    other = outputs["Phiname1_Zelda/a.dcm"]
    assert other.PatientID != a.PatientID


# ---- quarantine and audit -------------------------------------------------------------
def test_quarantine_sibling_with_reasons_and_copies(site: Site) -> None:
    qdir = site.summary.quarantine_dir
    assert qdir.parent == site.dst.parent and not qdir.is_relative_to(site.dst)
    assert stat.S_IMODE(qdir.stat().st_mode) == 0o700
    lines = (qdir / "quarantine.jsonl").read_text().splitlines()
    records = {r["source"]: r for r in (json.loads(line) for line in lines)}
    assert set(records) == {
        "notes PHIPID-837261-0.txt", "burned.dcm", "leak.dcm", "truncated_pixels.dcm", "truncated_header.dcm",
    }
    assert "not a DICOM file" in records["notes PHIPID-837261-0.txt"]["reason"]
    assert "Burned In Annotation" in records["burned.dcm"]["reason"]
    assert "identifier" in records["leak.dcm"]["reason"]
    assert "truncated" in records["truncated_pixels.dcm"]["reason"]
    assert "truncated" in records["truncated_header.dcm"]["reason"]
    for rel, rec in records.items():
        assert (qdir / rel).read_bytes() == (site.src / rel).read_bytes()
        assert rec["time"] and len(rec["input_digest"]) == 64


def test_source_untouched_and_nothing_half_written(site: Site) -> None:
    assert tree_digest(site.src) == site.src_digest
    names = [p.name for p in site.dst.rglob("*")]
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")]
    assert stat.S_IMODE(site.key.stat().st_mode) == 0o600
    assert sum(1 for p in (site.dst / "objects").rglob("*.dcm")) == 1  # the RT plan


def test_audit_one_record_per_file_keyed_digests(site: Site) -> None:
    from anonymization.audit import AuditTrail

    trail = AuditTrail(site.dst / "audit")
    assert trail.verify()
    records = trail.records()
    per_file = [r for r in records if r["kind"] in ("deidentified", "quarantined", "skipped")]
    assert len(per_file) == 13
    secret = load_or_create_secret(site.key)
    digests = {
        hmac.new(secret, p.read_bytes(), hashlib.sha256).hexdigest() for p in site.src.rglob("*") if p.is_file()
    }
    assert {r["input_digest"] for r in per_file} == digests
    for r in per_file:
        if r["kind"] == "deidentified":
            out = site.dst / r["path"]
            assert hashlib.sha256(out.read_bytes()).hexdigest() == r["output_digest"]
            assert r["sop_uid"].startswith("2.25.") and r["actions"]["U"] >= 1
        else:
            assert r["reason"]
    assert records[-1]["kind"] == "deid_run" and records[-1]["deidentified"] == 8


# ---- reruns, workers, keys ---------------------------------------------------------------
def test_rerun_is_idempotent(site: Site) -> None:
    before_manifest = (site.dst / "manifest.csv").read_bytes()
    before = {p: d for p, d in all_bytes_under(site.dst / "images").items()}
    summary = run_deid(site.src, site.dst, site.key, labels=site.labels, progress=False)
    assert (summary.deidentified, summary.quarantined) == (8, 5)
    assert (site.dst / "manifest.csv").read_bytes() == before_manifest
    assert all_bytes_under(site.dst / "images") == before


def test_two_workers_same_manifest(site: Site, tmp_path: Path) -> None:
    dst = tmp_path / "deid2"
    summary = run_deid(site.src, dst, site.key, labels=site.labels, workers=2, progress=False)
    assert (summary.deidentified, summary.quarantined) == (8, 5)
    assert (dst / "manifest.csv").read_bytes() == (site.dst / "manifest.csv").read_bytes()


def test_another_secret_other_uids_and_refused_on_same_store(site: Site, tmp_path: Path) -> None:
    key = tmp_path / "other.key"
    src = tmp_path / "src"
    shutil.copytree(site.src / "Phiname1_Zelda", src)
    run_deid(src, tmp_path / "out", key, progress=False)
    ours = {r["sop_uid"] for r in manifest_rows(site.dst)}
    theirs = {r["sop_uid"] for r in manifest_rows(tmp_path / "out")}
    assert len(theirs) == 2 and not ours & theirs
    with pytest.raises(DeidError, match="different site key"):
        run_deid(src, site.dst, key, progress=False)


def test_duplicate_instance_in_one_run_is_skipped(site: Site, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(site.src / "CT_small.dcm", src / "a.dcm")
    shutil.copy(site.src / "CT_small.dcm", src / "b.dcm")
    summary = run_deid(src, tmp_path / "out", site.key, progress=False)
    assert (summary.deidentified, summary.skipped) == (1, 1)
    assert len(manifest_rows(tmp_path / "out")) == 1


# ---- bad arguments -------------------------------------------------------------------------
def test_argument_errors(site: Site, tmp_path: Path) -> None:
    with pytest.raises(DeidError, match="does not exist"):
        run_deid(tmp_path / "missing", tmp_path / "out", site.key, progress=False)
    with pytest.raises(DeidError, match="quarantine"):
        run_deid(site.src, tmp_path / "out", site.key, quarantine=tmp_path / "out" / "q", progress=False)
    with pytest.raises(DeidError, match="key file"):
        run_deid(site.src, tmp_path / "out", tmp_path / "out" / "site.key", progress=False)
    bad = tmp_path / "labels.csv"
    bad.write_text(f"AccessionNumber,label\n{P0.accession(0)},maybe?\n")
    with pytest.raises(DeidError, match="line 2") as info:
        run_deid(site.src, tmp_path / "out", site.key, labels=bad, progress=False)
    assert P0.accession(0) not in str(info.value)
    bad.write_text("Accession,label\nX,1\n")
    with pytest.raises(DeidError, match="AccessionNumber"):
        run_deid(site.src, tmp_path / "out", site.key, labels=bad, progress=False)
    assert not (tmp_path / "out" / "manifest.csv").exists()


def crash_on_marked(path: str) -> FileResult:
    """Stands in for a decoder that kills its process on one file."""
    if path.endswith("crash.dcm"):
        os._exit(3)
    return process_path(path)


def test_worker_crash_quarantines_only_the_culprit(site: Site, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name, origin in (("a.dcm", "CT_small.dcm"), ("crash.dcm", "MR_small.dcm"), ("c.dcm", "MR_small.dcm")):
        shutil.copy(site.src / origin, src / name)
    tasks = _files(src, [])
    job = Job(secret=load_or_create_secret(site.key), dst=str(tmp_path / "dst"), options=DEFAULT_OPTIONS)
    results = {t.relative: r for t, r in _results(tasks, job, 2, crash_on_marked)}
    assert {k: r.kind for k, r in results.items()} == {
        "a.dcm": "deidentified", "c.dcm": "deidentified", "crash.dcm": "quarantined",
    }
    assert results["crash.dcm"].reason == REASON_CRASH
    assert len(results["crash.dcm"].input_digest) == 64


def test_progress_bar_runs(site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(site.src / "CT_small.dcm", src / "a.dcm")
    summary = run_deid(src, tmp_path / "out", site.key, progress=True)
    assert summary.deidentified == 1
    assert "a.dcm" not in capsys.readouterr().err  # counts only, never a file name


def test_key_inside_source_is_not_an_input(site: Site, tmp_path: Path) -> None:
    """(A destination inside the source is refused: tests/anonymization/test_deid_hostile_disk.py.)"""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(site.src / "CT_small.dcm", src / "a.dcm")
    for _ in range(2):
        summary = run_deid(src, tmp_path / "out", src / "site.key", progress=False)
        assert (summary.deidentified, summary.quarantined) == (1, 0)
    assert not summary.quarantine_dir.exists()
