"""What the engine refuses (quarantine rules) and what it must not over-refuse."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from anonymization import screening
from anonymization.batch import run_deid
from tests.dicom_factory import make_ct, pixels


def variant(**changes: object) -> Dataset:
    ds = make_ct()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({}, None),
        ({"ImageType": ["DERIVED", "SECONDARY", "REFORMATTED"]}, None),  # MPR: normal, keep
        ({"BurnedInAnnotation": "YES"}, screening.REASON_BURNED_IN),
        ({"RecognizableVisualFeatures": "YES"}, screening.REASON_VISUAL),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, screening.REASON_SECONDARY_CAPTURE),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7.4"}, screening.REASON_SECONDARY_CAPTURE),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.6.1"}, screening.REASON_ULTRASOUND),
        ({"Modality": "US"}, screening.REASON_ULTRASOUND),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.77.1.4"}, screening.REASON_VISIBLE_LIGHT),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.104.1"}, screening.REASON_ENCAPSULATED),  # PDF
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.104.2"}, screening.REASON_ENCAPSULATED),  # CDA
        ({"SOPClassUID": "1.2.840.10008.1.3.10"}, screening.REASON_DICOMDIR),
        ({"ImageType": ["DERIVED", "SECONDARY", "SCREEN SAVE"]}, screening.REASON_SCREEN_CAPTURE),
    ],
)
def test_refusal_rules(changes: dict[str, object], reason: str | None) -> None:
    assert screening.refusal(variant(**changes)) == reason


def test_image_without_pixels_and_non_image_objects() -> None:
    ds = make_ct()
    del ds.PixelData
    assert screening.refusal(ds) == screening.REASON_NO_PIXELS
    for name in ("rtplan.dcm", "test-SR.dcm", "MR_small.dcm", "CT_small.dcm"):
        assert screening.refusal(pydicom.dcmread(get_testdata_file(name))) is None, name


def test_truncation_detected_before_conversion() -> None:
    buf = io.BytesIO()
    ds = make_ct()
    ds.preamble = b"\x00" * 128
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    data = buf.getvalue()
    whole = pydicom.dcmread(io.BytesIO(data))
    assert screening.truncation(whole, len(data)) is None
    cut = data[:-10]
    assert screening.truncation(pydicom.dcmread(io.BytesIO(cut)), len(cut)) == screening.REASON_PIXELS_TRUNCATED
    cut = data[:701]
    assert screening.truncation(pydicom.dcmread(io.BytesIO(cut)), len(cut)) == screening.REASON_TRUNCATED


def test_file_without_meta_gets_explicit_vr_little_endian(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    ds = make_ct(instance=3)
    del ds.file_meta
    pydicom.dcmwrite(src / "raw.dcm", ds, implicit_vr=True, little_endian=True)
    assert b"DICM" not in (src / "raw.dcm").read_bytes()[:132]
    summary = run_deid(src, tmp_path / "out", tmp_path / "k.key", progress=False)
    assert summary.deidentified == 1
    (out,) = (tmp_path / "out" / "images").rglob("*.dcm")
    back = pydicom.dcmread(out)
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert (back.pixel_array == pixels(3)).all()
