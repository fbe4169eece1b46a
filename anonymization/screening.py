"""Which files the engine refuses: header rules cannot make them safe (for now).

Header de-identification cannot remove text burned into pixels, faces, or the
content of encapsulated documents, and a file whose pixel data is damaged
cannot be checked or trained on. Such files are quarantined with a reason; the
reasons are fixed strings (never values from the file: docs/design.md invariant 4).
"""

from __future__ import annotations

import functools

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "SH", "TM", "UI"})

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
SECONDARY_CAPTURE_ROOT = "1.2.840.10008.5.1.4.1.1.7"
ULTRASOUND_ROOTS = ("1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.3")
ENCAPSULATED_DOCUMENT_ROOT = "1.2.840.10008.5.1.4.1.1.104"
VISIBLE_LIGHT_ROOT = "1.2.840.10008.5.1.4.1.1.77.1"
SCREEN_CAPTURE_TYPES = frozenset({"SCREEN SAVE", "SCREENSHOT", "SCREEN CAPTURE"})
# Modalities whose images often carry burned-in text when they do not say otherwise.
TEXT_PRONE_MODALITIES = frozenset({"CR", "DX", "XA", "RF", "MG", "IO", "PX", "ES", "XC", "OT", "SC", "US"})
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)

REASON_NOT_DICOM = "not a DICOM file (no DICM prefix and no readable data set)"
REASON_UNREADABLE = "unreadable or truncated DICOM file"
REASON_NOT_INSTANCE = "not a composite DICOM instance (no SOP Class UID or SOP Instance UID)"
REASON_DICOMDIR = (
    "DICOMDIR media directory: holds file paths and patient records; rebuild it from the de-identified files"
)
REASON_ENCAPSULATED = "encapsulated document (PDF, CDA, 3D model): its content cannot be de-identified by header rules"
REASON_BURNED_IN = "Burned In Annotation is YES: text burned into the pixels"
REASON_VISUAL = "Recognizable Visual Features is YES: the image may show a face"
REASON_SECONDARY_CAPTURE = "Secondary Capture image: likely to carry burned-in text"
REASON_ULTRASOUND = "ultrasound image: likely to carry burned-in text"
REASON_VISIBLE_LIGHT = "visible-light photograph or video: may show faces or burned-in text"
REASON_SCREEN_CAPTURE = "screen capture (Image Type): likely to carry burned-in text"
REASON_TRUNCATED = "truncated DICOM file (it ends inside a data element)"
REASON_NO_PIXELS = "image object without pixel data (probably a truncated file)"
REASON_PIXELS_TRUNCATED = "pixel data shorter than its header says (truncated file)"
REASON_PIXELS_UNDECODABLE = "pixel data cannot be decoded"
REASON_PIXELS_UNCLEANABLE = "Clean Pixel Data cannot be applied to float pixel data; the file may carry burned-in text"
REASON_RESIDUAL = "an identifier of the patient survived de-identification (free text the table does not cover)"
REASON_WRITE = "the de-identified data set could not be written"
REASON_FAILED = "the file could not be de-identified safely (an element could not be decoded or rewritten)"
REASON_CRASH = "the de-identification process crashed on this file"
REASON_DUPLICATE = "another file in this run has the same SOP Instance UID but different content"


def _under(uid: str, root: str) -> bool:
    return uid == root or uid.startswith(root + ".")


def _text(ds: Dataset, keyword: str) -> str:
    value = _peek(ds, keyword)
    return value.strip().upper() if value is not None else ""


_TAGS: dict[str, int] = {}


def _peek(ds: Dataset, keyword: str) -> str | None:
    """A text attribute's value (multiple values joined by backslashes) without converting it.

    Screening runs before the engine: an element it converted would lose the
    writer's byte-for-byte copy (see :mod:`anonymization.writer`) for nothing.
    """
    tag = _TAGS.get(keyword)
    if tag is None:
        tag = _TAGS.setdefault(keyword, int(tag_for_keyword(keyword) or 0))
    elem = ds.get_item(tag) if tag else None
    if elem is None:
        return None
    if type(elem) is RawDataElement and elem.VR in _ASCII_VRS and isinstance(elem.value, bytes):
        return elem.value.decode("latin-1").strip(" \x00")
    value = ds.get(keyword)
    if value is None:
        return None
    return "\\".join(str(v) for v in value) if isinstance(value, (list, MultiValue)) else str(value)


def peek_int(ds: Dataset, keyword: str) -> int | None:
    """An US/IS attribute's first value without converting it; None if it cannot be read that way."""
    tag = int(tag_for_keyword(keyword) or 0)
    elem = ds.get_item(tag) if tag else None
    if elem is None:
        return None
    if type(elem) is RawDataElement and isinstance(elem.value, bytes):
        if elem.VR == "US" and len(elem.value) >= 2:
            return int.from_bytes(elem.value[:2], "little" if elem.is_little_endian else "big")
        if elem.VR == "IS":
            text = elem.value.decode("latin-1").strip(" \x00").split("\\")[0]
            return int(text) if text.strip().lstrip("+-").isdigit() else None
        return None
    value = elem.value
    try:
        return int(value[0] if isinstance(value, (list, MultiValue)) else value)
    except (TypeError, ValueError, IndexError):
        return None


def refusal(ds: Dataset, *, clean_pixel_data: bool = False) -> str | None:
    """Reason to quarantine a parsed data set, or None if the engine may de-identify it.

    Under the Clean Pixel Data option, images whose pixels may carry burned-in
    text (:func:`text_risk`) are not refused here: the worker cleans them with
    OCR and refuses them only if that cannot be done reliably. Faces
    (Recognizable Visual Features, visible-light photographs) and encapsulated
    documents are refused either way: OCR cannot remove a face or clean a PDF.
    """
    sop_class = (_peek(ds, "SOPClassUID") or "").strip()
    sop_instance = (_peek(ds, "SOPInstanceUID") or "").strip()
    if not sop_class or not sop_instance:
        if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
            return REASON_DICOMDIR
        return REASON_NOT_INSTANCE
    if sop_class == MEDIA_STORAGE_DIRECTORY:
        return REASON_DICOMDIR
    if _under(sop_class, ENCAPSULATED_DOCUMENT_ROOT) or "EncapsulatedDocument" in ds:
        return REASON_ENCAPSULATED
    risk = text_risk(ds)
    if risk == REASON_BURNED_IN and not clean_pixel_data:
        return REASON_BURNED_IN
    if _text(ds, "RecognizableVisualFeatures") == "YES":
        return REASON_VISUAL
    if risk is not None and not clean_pixel_data:
        return risk
    if _under(sop_class, VISIBLE_LIGHT_ROOT):
        return REASON_VISIBLE_LIGHT
    if is_image_class(sop_class) and not has_pixels(ds):
        return REASON_NO_PIXELS
    if risk is not None and clean_pixel_data and 0x7FE00010 not in ds:
        return REASON_PIXELS_UNCLEANABLE  # float pixel data: the cleaner cannot write it back
    return pixel_problem(ds)


def text_risk(ds: Dataset) -> str | None:
    """Why the pixels may carry burned-in text (a refusal reason), or None.

    Burned In Annotation YES; Secondary Capture, ultrasound and screen captures
    (consoles and scanners that paint names into the image).
    """
    sop_class = (_peek(ds, "SOPClassUID") or "").strip()
    if _text(ds, "BurnedInAnnotation") == "YES":
        return REASON_BURNED_IN
    if _under(sop_class, SECONDARY_CAPTURE_ROOT):
        return REASON_SECONDARY_CAPTURE
    if any(_under(sop_class, root) for root in ULTRASOUND_ROOTS) or _text(ds, "Modality") == "US":
        return REASON_ULTRASOUND
    image_type = _peek(ds, "ImageType")
    # "SECONDARY" alone is normal for reformatted CT/MR: only screen captures count.
    if image_type and any(v.strip().upper() in SCREEN_CAPTURE_TYPES for v in image_type.split("\\")):
        return REASON_SCREEN_CAPTURE
    return None


def needs_pixel_cleaning(ds: Dataset) -> bool:
    """Under Clean Pixel Data: should OCR look at this image?

    Yes when :func:`text_risk` says so, and when Burned In Annotation is absent
    for a modality whose images often carry text (projection radiography,
    angiography, fluoroscopy, mammography, endoscopy, "other"). Images that say
    Burned In Annotation NO are trusted: that is what the attribute is for, and
    OCR on every CT slice would cost a second per file.
    """
    if not has_pixels(ds):
        return False
    if text_risk(ds) is not None:
        return True
    return "BurnedInAnnotation" not in ds and _text(ds, "Modality") in TEXT_PRONE_MODALITIES


def strict_text_search(ds: Dataset) -> bool:
    """Ultrasound, secondary capture, screen captures: text may be anywhere, in any colour."""
    risk = text_risk(ds)
    return risk is not None and risk != REASON_BURNED_IN


def truncation(ds: Dataset, size: int | None = None) -> str | None:
    """Reason if the file was cut short, or None.

    pydicom reads a file cut short without complaint: the last value is just
    shorter, or a partial element header at the end is dropped. So check, before
    any element is converted, that every top-level value has its declared
    length and that the last element ends where the file (of ``size`` bytes) ends.
    """
    elements = getattr(ds, "_dict", None)  # pydicom 3.0's element mapping: no per-tag lookups
    if not isinstance(elements, dict):
        elements = {raw.tag: raw for raw in ds.elements()}
    for raw in elements.values():
        length = getattr(raw, "length", None)
        if not isinstance(length, int) or length == 0xFFFFFFFF:
            continue
        value = raw.value
        if isinstance(value, bytes) and len(value) < length:
            return REASON_PIXELS_TRUNCATED if int(raw.tag) in PIXEL_TAGS else REASON_TRUNCATED
    if size is None or not elements:
        return None
    last = elements[max(elements, key=int)]  # the element that ends the file
    length = getattr(last, "length", None)
    value_tell = getattr(last, "value_tell", None)
    if (isinstance(length, int) and length != 0xFFFFFFFF and isinstance(value_tell, int)
            and value_tell + length < size):
        return REASON_TRUNCATED
    return None


def _expected_length(ds: Dataset) -> int:
    """Bytes of native pixel data the header promises (pydicom's rule, read without conversions)."""
    values = [peek_int(ds, k) for k in ("Rows", "Columns", "BitsAllocated")]
    samples = peek_int(ds, "SamplesPerPixel")
    frames = peek_int(ds, "NumberOfFrames")
    photometric = (_peek(ds, "PhotometricInterpretation") or "").strip()
    unreadable = (samples is None and "SamplesPerPixel" in ds) or (frames is None and "NumberOfFrames" in ds)
    samples, frames = samples or 1, frames or 1
    if None in values or unreadable or photometric == "YBR_FULL_422":  # pydicom's rule (raises if bad)
        from pydicom.pixels.utils import get_expected_length

        return int(get_expected_length(ds))
    rows, cols, bits = (int(v) for v in values)  # type: ignore[arg-type]
    pixels = rows * cols * samples * frames
    return (pixels + 7) // 8 if bits == 1 else pixels * (bits // 8)


@functools.lru_cache(maxsize=256)
def is_image_class(sop_class: str) -> bool:
    """True for SOP classes whose instances must carry pixel data (``... Image Storage``)."""
    name = UID(sop_class).name
    return "Image Storage" in name and "Presentation State" not in name


def has_pixels(ds: Dataset) -> bool:
    """True for images (integer or float pixel data)."""
    return any(tag in ds for tag in PIXEL_TAGS)


def pixel_problem(ds: Dataset) -> str | None:
    """Check pixel data is complete (native) or that its first frame decodes (compressed)."""
    if 0x7FE00010 not in ds:
        return None
    try:
        ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "") or ""))
        if ts and ts.is_compressed:
            from pydicom.pixels import pixel_array

            pixel_array(ds, index=0)
            return None
        expected = _expected_length(ds)
        raw = ds.get_item(0x7FE00010)  # its length, without converting the element
        value = getattr(raw, "value", None)
        if len(value if isinstance(value, (bytes, bytearray)) else ds.PixelData or b"") < expected:
            return REASON_PIXELS_TRUNCATED
    except Exception:  # noqa: BLE001 - any decoder failure means we cannot vouch for it
        return REASON_PIXELS_UNDECODABLE
    return None
