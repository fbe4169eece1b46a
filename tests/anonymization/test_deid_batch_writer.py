"""The fast writer produces exactly the bytes ``pydicom.dcmwrite`` would, on every pydicom test file."""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset

from anonymization.writer import encode_file, encode_file_meta


def local_test_files() -> list[Path]:
    """pydicom's bundled test files (a pattern search would try to download more, and time out offline)."""
    return sorted(Path(get_testdata_file("CT_small.dcm")).parent.rglob("*.dcm"))


def _meta(ds: pydicom.Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.7")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "1.2.3.4")
    meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    meta.ImplementationVersionName = "MEDFED_TEST"
    return meta


def test_same_bytes_as_dcmwrite_on_pydicom_test_files() -> None:
    compared = 0
    warnings.simplefilter("ignore")
    for name in local_test_files():
        data = Path(name).read_bytes()
        try:
            ours, theirs = pydicom.dcmread(io.BytesIO(data)), pydicom.dcmread(io.BytesIO(data))
            if not ours.file_meta.get("TransferSyntaxUID"):
                continue
            for ds in (ours, theirs):  # change a little, as de-identification does
                if "PatientName" in ds:
                    ds.PatientName = "ANON"
                if "StudyDate" in ds:
                    ds.StudyDate = "20000101"
            meta = _meta(ours)
            theirs.file_meta, theirs.preamble = copy.deepcopy(meta), b"\x00" * 128
            expected = io.BytesIO()
            pydicom.dcmwrite(expected, theirs, enforce_file_format=True)
        except Exception:  # noqa: BLE001 - files pydicom itself cannot read or write
            continue
        assert encode_file(ours, meta, data) == expected.getvalue(), Path(name).name
        compared += 1
    assert compared > 60  # of the ~90 files bundled with pydicom


def test_meta_written_by_hand_matches_pydicom() -> None:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    meta = _meta(ds)
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = False, True
    write_file_meta_info(buffer, copy.deepcopy(meta), enforce_standard=True)
    assert encode_file_meta(meta) == buffer.getvalue()


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "MR_small_implicit.dcm", "image_dfl.dcm"])
def test_other_encodings_fall_back_or_copy_exactly(name: str) -> None:
    path = get_testdata_file(name)
    data = Path(path).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    out = encode_file(ds, _meta(ds), data)
    back = pydicom.dcmread(io.BytesIO(out))
    assert (back.pixel_array == pydicom.dcmread(path).pixel_array).all()


@pytest.mark.parametrize("policy_name", ["default", "basic", "cleaning"])
def test_deidentified_data_sets_written_exactly_as_dcmwrite_would(policy_name: str) -> None:
    """After the engine (its raw fast paths write dates, UIDs, emptied and dummy values of its
    own), the fast writer's bytes are still exactly pydicom's."""
    from anonymization.engine import Deidentifier
    from anonymization.policy import Policy
    from anonymization.pseudonyms import Pseudonymizer

    policy = {
        "default": Policy(),
        "basic": Policy(retain_longitudinal_modified_dates=False),
        "cleaning": Policy(clean_descriptors=True, clean_structured_content=True, retain_safe_private=True),
    }[policy_name]
    engine = Deidentifier(Pseudonymizer(b"\x03" * 32), policy=policy)
    compared = 0
    warnings.simplefilter("ignore")
    for name in local_test_files():
        data = Path(name).read_bytes()
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
            if not ds.file_meta.get("TransferSyntaxUID") or "SOPInstanceUID" not in ds:
                continue
            engine.deidentify(ds, original=lambda data=data: pydicom.dcmread(io.BytesIO(data)))
            meta = _meta(ds)
            ours = encode_file(ds, meta, data)
            ds.file_meta, ds.preamble = copy.deepcopy(meta), b"\x00" * 128
            expected = io.BytesIO()
            pydicom.dcmwrite(expected, ds, enforce_file_format=True)
        except Exception:  # noqa: BLE001 - files pydicom itself cannot read or write
            continue
        assert ours == expected.getvalue(), Path(name).name
        compared += 1
    assert compared > 50


@pytest.mark.filterwarnings("ignore:Expected explicit VR, but found implicit VR:UserWarning")
@pytest.mark.parametrize("syntax", [None, "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
def test_data_set_read_in_another_encoding_than_its_syntax_says_is_written(syntax: str | None) -> None:
    """SC_rgb_jpeg.dcm says JPEG Baseline (explicit VR) but its data set is implicit VR:
    pydicom reads it, and its own writer fails on it; ours converts those elements and writes."""
    data = Path(get_testdata_file("SC_rgb_jpeg.dcm")).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.get_item(0x00080008).is_implicit_VR and not ds.original_encoding[0]  # the odd case
    meta = _meta(ds)
    if syntax is not None:
        meta.TransferSyntaxUID = syntax
    back = pydicom.dcmread(io.BytesIO(encode_file(ds, meta, data)))
    assert back.ImageType == ["DERIVED", "SECONDARY", "OTHER"] and back["ImageType"].VR == "CS"
    assert back.file_meta.TransferSyntaxUID == meta.TransferSyntaxUID
