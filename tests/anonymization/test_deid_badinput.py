"""Real-world input: every odd file is de-identified or quarantined with a reason, never half-written.

Uses pydicom's own test files (real vendors, every encoding, deliberately broken
ones) and crafted truncations. Each case runs in its own destination, since
pydicom ships several encodings of one instance under the same SOP Instance UID.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from anonymization import screening, worker
from anonymization.batch import DeidSummary, run_deid

pytestmark = pytest.mark.integration


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} missing: pip install pydicom==3.0.2"
    return Path(path)


def run_one(tmp_path: Path, name: str, data: bytes) -> tuple[DeidSummary, list[Path], dict[str, str]]:
    """De-identify a folder holding just this file; return the summary, outputs and quarantine reasons."""
    src = tmp_path / "src"
    src.mkdir(parents=True, exist_ok=True)
    (src / name).write_bytes(data)
    summary = run_deid(src, tmp_path / "out", tmp_path / "k.key", progress=False)
    outputs = sorted((tmp_path / "out").glob("*/*/*/*.dcm"))
    log = summary.quarantine_dir / "quarantine.jsonl"
    reasons = {}
    if log.exists():
        reasons = {json.loads(line)["source"]: json.loads(line)["reason"] for line in log.read_text().splitlines()}
    assert_nothing_half_written(tmp_path / "out")
    return summary, outputs, reasons


def assert_nothing_half_written(dst: Path) -> None:
    leftovers = [p for p in dst.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert leftovers == []
    for path in dst.rglob("*.dcm"):
        pydicom.dcmread(path)  # every output is a complete, readable DICOM file


# ---- encodings that must be de-identified, pixels intact ------------------------------------
@pytest.mark.parametrize(
    ("name", "syntax", "frames"),
    [
        ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2", 1),  # Explicit VR Big Endian (retired)
        ("MR_small_implicit.dcm", "1.2.840.10008.1.2", 1),  # Implicit VR Little Endian
        ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5", 1),  # RLE Lossless
        ("emri_small.dcm", "1.2.840.10008.1.2.1", 10),  # multi-frame
        ("liver.dcm", "1.2.840.10008.1.2.1", 3),  # segmentation: 1-bit packed frames
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", None, 1),  # JPEG lossless (ultrasound: quarantined by default)
    ],
)
def test_encodings_deidentified_with_pixels_intact(tmp_path: Path, name: str, syntax: str | None, frames: int) -> None:
    original = pydicom.dcmread(pydicom_file(name))
    summary, outputs, reasons = run_one(tmp_path, name, pydicom_file(name).read_bytes())
    if syntax is None:
        assert summary.quarantined == 1 and reasons[name] == screening.REASON_ULTRASOUND
        return
    assert (summary.deidentified, summary.quarantined) == (1, 0), reasons
    (out,) = outputs
    ds = pydicom.dcmread(out)
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert int(ds.get("NumberOfFrames", 1) or 1) == frames
    assert np.array_equal(ds.pixel_array, original.pixel_array)
    assert ds.PatientIdentityRemoved == "YES"


def test_deflated_dataset_deidentified_and_still_deflated(tmp_path: Path) -> None:
    original = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    original.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, original, enforce_file_format=True)
    summary, (out,), _ = run_one(tmp_path, "deflated.dcm", buffer.getvalue())
    assert summary.deidentified == 1
    ds = pydicom.dcmread(out)
    assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert np.array_equal(ds.pixel_array, pydicom.dcmread(pydicom_file("MR_small.dcm")).pixel_array)


def test_pydicom_deflated_secondary_capture_is_quarantined(tmp_path: Path) -> None:
    summary, outputs, reasons = run_one(tmp_path, "image_dfl.dcm", pydicom_file("image_dfl.dcm").read_bytes())
    assert outputs == [] and reasons["image_dfl.dcm"] == screening.REASON_SECONDARY_CAPTURE


def test_raw_dataset_without_file_meta(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    del ds.file_meta
    ds.preamble = None
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, implicit_vr=True, little_endian=True)
    assert b"DICM" not in buffer.getvalue()[:132]
    summary, (out,), _ = run_one(tmp_path, "raw", buffer.getvalue())
    assert summary.deidentified == 1
    back = pydicom.dcmread(out)
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(back.pixel_array, pydicom.dcmread(pydicom_file("CT_small.dcm")).pixel_array)


def test_rt_plan_goes_to_objects_not_to_the_manifest(tmp_path: Path) -> None:
    summary, _, _ = run_one(tmp_path, "rtplan.dcm", pydicom_file("rtplan.dcm").read_bytes())
    assert summary.deidentified == 1
    assert len(list((tmp_path / "out" / "objects").rglob("*.dcm"))) == 1
    assert (tmp_path / "out" / "manifest.csv").read_text().count("\n") == 1  # header only


# ---- what must be quarantined --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("DICOMDIR", screening.REASON_DICOMDIR),
        ("no_meta.dcm", screening.REASON_NOT_DICOM),
        ("meta_missing_tsyntax.dcm", screening.REASON_NOT_INSTANCE),
        ("no_meta_group_length.dcm", screening.REASON_NOT_INSTANCE),
        ("emri_small_jpeg_2k_lossless_too_short.dcm", screening.REASON_TRUNCATED),
        ("SC_rgb_jpeg_dcmtk.dcm", screening.REASON_SECONDARY_CAPTURE),
        ("OBXXXX1A.dcm", screening.REASON_ULTRASOUND),
    ],
)
def test_pydicom_files_quarantined_with_reason(tmp_path: Path, name: str, reason: str) -> None:
    summary, outputs, reasons = run_one(tmp_path, name, pydicom_file(name).read_bytes())
    assert (summary.deidentified, summary.quarantined, outputs) == (0, 1, [])
    assert reasons[name] == reason
    assert (summary.quarantine_dir / name).read_bytes() == pydicom_file(name).read_bytes()


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("empty", b""),
        ("notes.txt", b"Patient called back, see chart\n" * 10),
        ("scan.png", b"\x89PNG\r\n\x1a\n" + bytes(200)),
        ("random.bin", random.Random(5).randbytes(4096)),
        ("header-only.dcm", b"\x00" * 128 + b"DICM"),
        ("preamble-garbage.dcm", b"\x00" * 128 + b"DICM" + random.Random(6).randbytes(300)),
    ],
)
def test_non_dicom_files_quarantined(tmp_path: Path, name: str, data: bytes) -> None:
    summary, outputs, reasons = run_one(tmp_path, name, data)
    assert (summary.deidentified, summary.quarantined, outputs) == (0, 1, [])
    assert reasons[name]


@pytest.mark.parametrize("cut", [60, 132, 300, 700, 1500, -4000, -1])
def test_truncated_files_quarantined_never_written(tmp_path: Path, cut: int) -> None:
    whole = pydicom_file("CT_small.dcm").read_bytes()
    summary, outputs, reasons = run_one(tmp_path, "cut.dcm", whole[:cut])
    assert (summary.deidentified, summary.quarantined, outputs) == (0, 1, [])
    assert any(word in reasons["cut.dcm"] for word in ("truncated", "not a DICOM", "unreadable", "composite")), reasons


def test_corrupt_compressed_pixels_quarantined(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom_file("MR_small_RLE.dcm"))
    frame = bytearray(ds.PixelData)
    frame[16:] = bytes(len(frame) - 16)  # RLE header intact, segments gone
    ds.PixelData = bytes(frame)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    summary, outputs, reasons = run_one(tmp_path, "rle.dcm", buffer.getvalue())
    assert (summary.deidentified, outputs) == (0, [])
    assert reasons["rle.dcm"] in (screening.REASON_PIXELS_UNDECODABLE, screening.REASON_PIXELS_TRUNCATED)


def test_encapsulated_pdf_quarantined(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom_file("rtplan.dcm"))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.EncapsulatedDocument = b"%PDF-1.4 Patient: Doe^Jane\n"
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    summary, outputs, reasons = run_one(tmp_path, "report.dcm", buffer.getvalue())
    assert outputs == [] and reasons["report.dcm"] == screening.REASON_ENCAPSULATED


# ---- the whole zoo in one batch; leftovers of a crash ------------------------------------------
def test_zoo_in_one_batch_never_crashes_and_sweeps_leftovers(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small_bigendian.dcm", "emri_small.dcm", "DICOMDIR", "no_meta.dcm", "rtplan.dcm",
                 "emri_small_jpeg_2k_lossless_too_short.dcm", "liver.dcm", "image_dfl.dcm"):
        shutil.copy(pydicom_file(name), src / name)
    (src / "cut.dcm").write_bytes(pydicom_file("CT_small.dcm").read_bytes()[:900])
    (src / "notes.txt").write_text("not an image")
    dst = tmp_path / "out"
    stale = dst / "images" / "P0" / "study" / ".2.25.1.deadbeef.tmp"  # a crashed run's half-written output
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\x00" * 10)
    for workers in (1, 2):
        summary = run_deid(src, dst, tmp_path / "k.key", workers=workers, progress=False)
        assert summary.deidentified + summary.quarantined + summary.skipped == 11
        assert summary.deidentified == 5 and summary.quarantined == 6
        assert not stale.exists()
        assert_nothing_half_written(dst)
    assert summary.resumed == 5  # the second run found them done


def test_unreadable_source_file_is_quarantined_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(pydicom_file("CT_small.dcm"), src / "a.dcm")
    shutil.copy(pydicom_file("MR_small.dcm"), src / "b.dcm")
    read_regular = worker.read_regular

    def flaky(path: str | Path) -> bytes:  # a file that vanished or lost its permissions mid-run
        if Path(path).name == "b.dcm":
            raise PermissionError(13, "Permission denied")
        return read_regular(path)

    monkeypatch.setattr(worker, "read_regular", flaky)
    summary = run_deid(src, tmp_path / "out", tmp_path / "k.key", progress=False)
    assert (summary.deidentified, summary.quarantined) == (1, 1)
