"""Clean Pixel Data: burned-in names are found with OCR, blanked in every frame, and stay unreadable.

The OCR tests need Debian's ``tesseract-ocr``: on a laptop without it they are
skipped loudly; under CI (``CI=true``) a missing OCR engine fails them, because
the option would then quarantine every burned-in image instead of cleaning it.
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from anonymization import pixels, screening
from anonymization.batch import run_deid
from anonymization.keys import load_or_create_secret
from anonymization.pseudonyms import Pseudonymizer
from tests.dicom_factory import Patient, make_ct, write

NAME = "QUIGLEYMORROW"  # burned into the crafted images; a made-up surname OCR reads well
MRN = "48213377"


@pytest.fixture(scope="module")
def ocr() -> None:
    """Tesseract must be there: skip loudly on a laptop, fail under CI."""
    if pixels.tesseract_available():
        return
    message = (
        "tesseract-ocr is not installed: Clean Pixel Data cannot be tested "
        "(apt-get install tesseract-ocr tesseract-ocr-eng; pip install pytesseract)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    warnings.warn(message, stacklevel=1)
    pytest.skip(message)


# ---- crafted images ------------------------------------------------------------------------
def burn(arr: np.ndarray, lines: list[str], value: int, *, size: int = 14, at: tuple[int, int] = (6, 6)) -> np.ndarray:
    """Draw ``lines`` into ``arr`` (2-D, or 3-D colour) at ``value``, like a scanner console."""
    mask = Image.new("L", (arr.shape[1], arr.shape[0]), 0)
    draw = ImageDraw.Draw(mask)
    font = ImageFont.load_default(size=size)
    x, y = at
    for line in lines:
        draw.text((x, y), line, fill=255, font=font)
        y += size + 3
    ink = np.asarray(mask) > 96
    out = arr.copy()
    out[ink] = value
    return out


def burned_ct(patient: Patient | None = None, *, rows: int = 256) -> Dataset:
    """A factory CT (16-bit, signed) with the patient's name and MRN (default: Patient(7)) burned in at the top left."""
    patient = Patient(7) if patient is None else patient
    ds = make_ct(patient, instance=3, burned_in=True)
    rng = np.random.default_rng(3)
    body = rng.integers(-60, 60, size=(rows, rows)).astype(np.int16) + 40
    yy, xx = np.mgrid[:rows, :rows]
    body[((yy - rows * 0.6) / (rows * 0.35)) ** 2 + ((xx - rows / 2) / (rows * 0.42)) ** 2 > 1] = -1000
    arr = burn(body, [f"{NAME}, ZELDA", f"MRN {MRN}"], 3071, size=max(12, rows // 18))
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.astype("<i2").tobytes()
    ds.PatientName = f"{NAME}^ZELDA"
    ds.PatientID = MRN
    del ds[0x60003000]  # keep the overlay group only where a test wants it
    return ds


def _as(ds: Dataset, syntax: str) -> Dataset:
    """``ds`` re-encoded in ``syntax`` with pydicom's own encoders."""
    ds = copy.deepcopy(ds)  # Dataset.copy() would share the file meta
    arr = ds.pixel_array
    if syntax in (RLELossless, JPEG2000Lossless):
        ds.compress(syntax, arr, generate_instance_uid=False)
    elif syntax == JPEG2000:
        ds.compress(syntax, arr, j2k_cr=[12], generate_instance_uid=False)  # lossy, 12:1
    elif syntax == JPEGBaseline8Bit:
        eight = np.clip((arr.astype(np.float32) + 1000) / 4071 * 255, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(eight).save(buffer, format="JPEG", quality=92)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _write_as(ds: Dataset, path: Path, syntax: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.preamble = b"\x00" * 128
    if syntax == ExplicitVRBigEndian:
        big = copy.deepcopy(ds)
        big.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        big.PixelData = ds.pixel_array.astype(">i2").tobytes()
        pydicom.dcmwrite(path, big, enforce_file_format=True)
        return path
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _outputs(dst: Path, key: Path, originals: dict[str, Dataset]) -> dict[str, Path]:
    pseudo = Pseudonymizer(load_or_create_secret(key))
    found = {}
    for name, ds in originals.items():
        path = (dst / "images" / pseudo.patient_id(str(ds.PatientID)) / pseudo.uid(ds.StudyInstanceUID)
                / f"{pseudo.uid(ds.SOPInstanceUID)}.dcm")
        if path.exists():
            found[name] = path
    return found


# ---- no OCR needed ------------------------------------------------------------------------------
def test_lines_merge_words_and_a_missed_initial() -> None:
    words = [pixels.Box(10, 10, 60, 22), pixels.Box(75, 11, 130, 22), pixels.Box(10, 40, 70, 52)]  # gap 15 < 1.5 h
    lines = pixels._lines(words)
    assert sorted((b.left, b.top, b.right, b.bottom) for b in lines) == [(10, 10, 130, 22), (10, 40, 70, 52)]


def test_regions_grow_over_letters_next_to_a_word_but_not_over_anatomy() -> None:
    gray = np.zeros((120, 200), dtype=np.float32)
    gray[10:22, 10:60] = 1000  # the word OCR read
    gray[11:22, 66:72] = 1000  # a letter it missed, on the same line
    gray[60:110, 20:180] = 800  # a body: bright, big, not text
    word = pixels.Word("SMITH", 90.0, pixels.Box(10, 10, 60, 22))
    (region,) = pixels.regions_for(gray, [word])
    assert region.left <= 10 and region.right >= 72 and region.top <= 10 and region.bottom >= 22
    assert region.bottom < 60  # the body is untouched


def test_identifier_tokens_and_fuzzy_match() -> None:
    ds = burned_ct()
    ds.PatientBirthDate = "19610417"
    tokens = pixels.identifier_tokens(ds)
    assert {NAME, "ZELDA", MRN, "19610417"} <= set(tokens)
    assert pixels._matches("QUIGLEYM0RROW,", tokens)  # one misread letter still counts
    assert not pixels._matches("ABDOMEN", tokens)


def test_screening_sends_burned_in_images_to_the_cleaner_only_under_the_option() -> None:
    ds = burned_ct()
    assert screening.refusal(ds) == screening.REASON_BURNED_IN
    assert screening.refusal(ds, clean_pixel_data=True) is None and screening.needs_pixel_cleaning(ds)
    us = make_ct()
    us.Modality = "US"
    assert screening.refusal(us, clean_pixel_data=True) is None and screening.strict_text_search(us)
    faces = burned_ct()
    faces.RecognizableVisualFeatures = "YES"
    assert screening.refusal(faces, clean_pixel_data=True) == screening.REASON_VISUAL
    plain = make_ct()
    assert not screening.needs_pixel_cleaning(plain)  # says Burned In Annotation NO: trusted


def test_run_refuses_to_start_without_ocr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from anonymization.batch import DeidError

    monkeypatch.setattr(pixels, "tesseract_available", lambda: False)
    (tmp_path / "src").mkdir()
    with pytest.raises(DeidError, match="tesseract-ocr"):
        run_deid(tmp_path / "src", tmp_path / "out", tmp_path / "k.key", clean_pixel_data=True, progress=False)


# ---- OCR ---------------------------------------------------------------------------------------
@pytest.mark.integration
def test_synthetic_burned_in_names_unreadable_after_cleaning(ocr: None, tmp_path: Path) -> None:
    """medfed synth's burned-in images (every matrix, 12- and 16-bit): OCR reads them before, not after."""
    from medfed.synth import generate_hospitals

    src = tmp_path / "synth"
    try:
        generate_hospitals(src, sites=5, patients=2, seed=4, burned_in_fraction=1.0)
    except TypeError:  # the generator's tuning knob moved: fall back to its default share
        generate_hospitals(src, sites=5, patients=12, seed=4)
    originals: dict[str, Dataset] = {}
    sites_seen: set[str] = set()
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(path) if path.suffix == ".dcm" else None
        site = path.relative_to(src).parts[0]
        if ds is not None and str(ds.get("BurnedInAnnotation", "")) == "YES" and site not in sites_seen:
            originals[path.relative_to(src).as_posix()] = ds  # one per site: every matrix and bit depth
            sites_seen.add(site)
        else:
            path.unlink()
    assert len(originals) == 5
    readable_before = sum(bool(pixels.burned_in_names_read(ds, ds)) for ds in originals.values())
    assert readable_before == len(originals), "the OCR must read the burned-in names before cleaning"

    key = tmp_path / "site.key"
    summary = run_deid(src, tmp_path / "deid", key, clean_pixel_data=True, progress=False)
    assert (summary.deidentified, summary.quarantined) == (len(originals), 0)
    outputs = _outputs(tmp_path / "deid", key, originals)
    assert len(outputs) == len(originals)
    residual = {name: pixels.burned_in_names_read(pydicom.dcmread(path), originals[name])
                for name, path in outputs.items()}
    assert {k: v for k, v in residual.items() if v} == {}  # the share OCR still reads: 0
    for path in outputs.values():
        assert pydicom.dcmread(path).BurnedInAnnotation == "NO"
    records = [json.loads(line) for line in (tmp_path / "deid" / "audit" / "audit.jsonl").read_text().splitlines()]
    cleaned = [r for r in records if r.get("kind") == "deidentified"]
    assert cleaned and all(r["pixel_cleaning"]["pixel_cleaning"] == "done" and r["pixel_cleaning"]["regions"] >= 1
                           for r in cleaned)


@pytest.mark.integration
def test_every_transfer_syntax_cleaned_and_written_to_match(ocr: None, tmp_path: Path) -> None:
    """Native (implicit, explicit, big endian, deflated), RLE, JPEG 2000 lossless, JPEG baseline."""
    base = burned_ct()
    base.add_new(0x60000010, "US", 32)  # an overlay group: removed under Clean Pixel Data
    base.add_new(0x60003000, "OW", b"\xff\x00" * 64)
    cases = {
        "explicit": (ExplicitVRLittleEndian, ExplicitVRLittleEndian),
        "implicit": (ImplicitVRLittleEndian, ImplicitVRLittleEndian),
        "bigendian": (ExplicitVRBigEndian, ExplicitVRLittleEndian),
        "deflated": (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian),
        "rle": (RLELossless, RLELossless),
        "j2k": (JPEG2000Lossless, JPEG2000Lossless),
        "j2k-lossy": (JPEG2000, ExplicitVRLittleEndian),
        "jpeg": (JPEGBaseline8Bit, ExplicitVRLittleEndian),
    }
    src = tmp_path / "src"
    originals = {}
    for i, (name, (syntax, _)) in enumerate(cases.items()):
        ds = _as(base, syntax)
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.77.{i}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        originals[name] = ds
        _write_as(ds, src / f"{name}.dcm", syntax)
    key = tmp_path / "k.key"
    summary = run_deid(src, tmp_path / "out", key, clean_pixel_data=True, progress=False)
    assert (summary.deidentified, summary.quarantined) == (len(cases), 0)
    outputs = _outputs(tmp_path / "out", key, originals)
    for name, (_, expected) in cases.items():
        out = pydicom.dcmread(outputs[name])
        assert out.file_meta.TransferSyntaxUID == expected, name
        assert out.BurnedInAnnotation == "NO" and not any(t >> 16 == 0x6000 for t in out.keys()), name  # noqa: SIM118 - a pydicom Dataset iterates over elements
        assert pixels.burned_in_names_read(out, originals[name]) == [], name
        arr = out.pixel_array
        assert arr.shape == (base.Rows, base.Columns)
        if name not in ("jpeg", "j2k-lossy"):  # lossless paths: everything outside the text is untouched
            assert np.array_equal(arr[150:, :], base.pixel_array[150:, :]), name
    jpeg = pydicom.dcmread(outputs["jpeg"])
    assert jpeg.LossyImageCompression == "01" and jpeg.LossyImageCompressionMethod == "ISO_10918_1"
    j2k = pydicom.dcmread(outputs["j2k-lossy"])  # decoded once lossy: flagged lossy though now stored native
    assert j2k.LossyImageCompression == "01" and j2k.LossyImageCompressionMethod == "ISO_15444_1"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "lossy"),
    [
        ("JPGExtended.dcm", True),  # JPEG Extended (process 2 and 4), 12-bit
        ("SC_rgb_jpeg_gdcm.dcm", False),  # JPEG Lossless, first-order prediction, RGB
        ("MR_small_jpeg_ls_lossless.dcm", False),  # JPEG-LS lossless
        ("JPEGLSNearLossless_16.dcm", True),  # JPEG-LS near-lossless
        ("SC_rgb_gdcm_KY.dcm", True),  # JPEG 2000 (lossy allowed)
    ],
)
def test_syntaxes_this_machine_cannot_encode_are_cleaned_and_stored_native(ocr: None, name: str, lossy: bool) -> None:
    """Real files in the other syntaxes pydicom decodes: OCR reads every frame, the pixels are
    written uncompressed (no encoder for the syntax here) with a transfer syntax saying so."""
    from anonymization.writer import encode_file

    path = Path(get_testdata_file(name))
    data = path.read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    syntax = str(ds.file_meta.TransferSyntaxUID)
    before = ds.pixel_array.copy()
    result = pixels.clean_pixel_data(ds, syntax)
    assert result.transfer_syntax == ExplicitVRLittleEndian, name
    meta = {"MediaStorageSOPClassUID": str(ds.SOPClassUID), "MediaStorageSOPInstanceUID": str(ds.SOPInstanceUID),
            "TransferSyntaxUID": result.transfer_syntax, "ImplementationClassUID": "2.25.1",
            "ImplementationVersionName": "TEST"}
    out = pydicom.dcmread(io.BytesIO(encode_file(ds, meta, data)))
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and "PixelData" in out
    after = out.pixel_array
    assert after.shape == before.shape
    if result.regions == 0:
        assert np.array_equal(after, before), name  # nothing read as text: pixels as decoded
    if lossy:
        assert out.LossyImageCompression == "01" and out.get("LossyImageCompressionMethod"), name


@pytest.mark.integration
def test_multiframe_text_blanked_in_every_frame(ocr: None) -> None:
    ds = burned_ct(rows=192)
    frame = ds.pixel_array
    frames = np.stack([np.roll(frame, 0), frame, frame])
    frames[1, 120:, :] += 5  # frames differ below the text
    ds.NumberOfFrames = 3
    ds.PixelData = frames.astype("<i2").tobytes()
    result = pixels.clean_pixel_data(ds, ExplicitVRLittleEndian, identifiers=pixels.identifier_tokens(ds))
    assert result.frames == 3 and result.regions >= 1
    cleaned = ds.pixel_array
    assert cleaned.shape == (3, 192, 192)
    top = cleaned[:, :40, :120]
    assert (top == top.min()).all()  # the text block is blank in every frame
    assert pixels.burned_in_names_read(ds, burned_ct()) == []


@pytest.mark.integration
def test_ultrasound_colour_text_cleaned_and_document_like_image_refused(ocr: None) -> None:
    us = make_ct()
    us.Modality = "US"
    rgb = np.zeros((240, 320, 3), dtype=np.uint8)
    rgb[60:200, 60:260] = 70  # the sector
    rgb = burn(rgb, [f"{NAME} ZELDA"], 0, size=16)
    rgb[..., 0] = burn(rgb[..., 0], [f"{NAME} ZELDA"], 255, size=16)  # yellow text: red + green
    rgb[..., 1] = burn(rgb[..., 1], [f"{NAME} ZELDA"], 255, size=16)
    us.Rows, us.Columns = 240, 320
    us.SamplesPerPixel, us.PhotometricInterpretation, us.PlanarConfiguration = 3, "RGB", 0
    us.BitsAllocated, us.BitsStored, us.HighBit, us.PixelRepresentation = 8, 8, 7, 0
    us.PixelData = rgb.tobytes()
    us.PatientName = f"{NAME}^ZELDA"
    original = copy.deepcopy(us)
    pixels.clean_pixel_data(us, ExplicitVRLittleEndian, strict=True, identifiers=pixels.identifier_tokens(us))
    assert pixels.burned_in_names_read(us, original) == []
    assert (us.pixel_array[120, 150] == 70).all()  # the sector is kept

    page = np.zeros((256, 256), dtype=np.uint8)
    page = burn(page, [f"LINE {i} REPORT TEXT {MRN}" for i in range(13)], 255, size=14, at=(4, 2))
    doc = make_ct()
    doc.Modality = "US"
    doc.Rows, doc.Columns = page.shape
    doc.BitsAllocated, doc.BitsStored, doc.HighBit, doc.PixelRepresentation = 8, 8, 7, 0
    doc.PixelData = page.tobytes()
    with pytest.raises(pixels.PixelCleaningError) as info:
        pixels.clean_pixel_data(doc, ExplicitVRLittleEndian, strict=True)
    assert info.value.reason in (pixels.REASON_TOO_MUCH_TEXT, pixels.REASON_UNRELIABLE)


@pytest.mark.integration
def test_what_cannot_be_cleaned_is_quarantined_with_its_reason(ocr: None, tmp_path: Path) -> None:
    src = tmp_path / "src"
    bad = burned_ct()
    bad.file_meta.TransferSyntaxUID = JPEG2000Lossless
    bad.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])  # a J2K stream that does not decode
    bad["PixelData"].VR = "OB"
    write(bad, src / "undecodable.dcm")
    pdf = make_ct(Patient(8))
    pdf.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    pdf.file_meta.MediaStorageSOPClassUID = pdf.SOPClassUID
    write(pdf, src / "report.dcm")
    faces = burned_ct(Patient(9))
    faces.RecognizableVisualFeatures = "YES"
    write(faces, src / "face.dcm")
    cda = make_ct(Patient(10))
    cda.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.2"  # Encapsulated CDA
    cda.file_meta.MediaStorageSOPClassUID = cda.SOPClassUID
    write(cda, src / "cda.dcm")
    page = burn(np.zeros((256, 256), dtype=np.uint8), [f"LINE {i} REPORT TEXT {MRN}" for i in range(13)], 255,
                size=14, at=(4, 2))
    screen = make_ct(Patient(11))  # an ultrasound "image" that is a page of text: not cleanable reliably
    screen.Modality = "US"
    screen.Rows, screen.Columns = page.shape
    screen.BitsAllocated, screen.BitsStored, screen.HighBit, screen.PixelRepresentation = 8, 8, 7, 0
    screen.PixelData = page.tobytes()
    del screen[0x60003000]
    write(screen, src / "us-page.dcm")
    summary = run_deid(src, tmp_path / "out", tmp_path / "k.key", clean_pixel_data=True, progress=False)
    assert (summary.deidentified, summary.quarantined) == (0, 5)
    reasons = {json.loads(line)["source"]: json.loads(line)["reason"]
               for line in (summary.quarantine_dir / "quarantine.jsonl").read_text().splitlines()}
    assert "cannot be decoded" in reasons["undecodable.dcm"]
    assert reasons["report.dcm"] == reasons["cda.dcm"] == screening.REASON_ENCAPSULATED
    assert reasons["face.dcm"] == screening.REASON_VISUAL
    assert reasons["us-page.dcm"] in (pixels.REASON_TOO_MUCH_TEXT, pixels.REASON_UNRELIABLE)


@pytest.mark.integration
def test_pydicom_ultrasound_files_cleaned_or_refused(ocr: None, tmp_path: Path) -> None:
    """Real vendor ultrasound (palette colour, JPEG lossless, big-endian RGB): never written with text left."""
    src = tmp_path / "src"
    src.mkdir()
    # ... and a JPEG secondary capture whose data set is implicit VR although its syntax says explicit
    names = ["OBXXXX1A.dcm", "ExplVR_BigEnd.dcm", "color-px.dcm", "SC_rgb_jpeg.dcm"]
    for name in names:
        (src / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    summary = run_deid(src, tmp_path / "out", tmp_path / "k.key", clean_pixel_data=True, progress=False)
    assert summary.deidentified + summary.quarantined == len(names)
    log = summary.quarantine_dir / "quarantine.jsonl"
    reasons = [json.loads(line)["reason"] for line in log.read_text().splitlines()] if log.exists() else []
    assert not [r for r in reasons if r.startswith((screening.REASON_WRITE, screening.REASON_FAILED))], reasons
    for path in (tmp_path / "out" / "images").rglob("*.dcm"):
        out = pydicom.dcmread(path)
        assert out.BurnedInAnnotation == "NO"
        legible = [w for w in pixels.read_words(out, min_conf=pixels.VERIFY_CONF) if len(w) >= 4 and w.isalnum()]
        assert legible == [], legible
