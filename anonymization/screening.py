"""Which files the engine refuses: header rules cannot make them safe (for now).

Header de-identification cannot remove text burned into pixels, faces, or the
content of encapsulated documents, and a file whose pixel data is damaged
cannot be checked or trained on. Such files are quarantined with a reason; the
reasons are fixed strings (never values from the file: invariant 4).
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import UID

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
SECONDARY_CAPTURE_ROOT = "1.2.840.10008.5.1.4.1.1.7"
ULTRASOUND_ROOTS = ("1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.3")
ENCAPSULATED_DOCUMENT_ROOT = "1.2.840.10008.5.1.4.1.1.104"
VISIBLE_LIGHT_ROOT = "1.2.840.10008.5.1.4.1.1.77.1"
SCREEN_CAPTURE_TYPES = frozenset({"SCREEN SAVE", "SCREENSHOT", "SCREEN CAPTURE"})
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)

REASON_NOT_DICOM = "not a DICOM file (no DICM prefix and no readable data set)"
REASON_UNREADABLE = "unreadable or truncated DICOM file"
REASON_NOT_INSTANCE = "not a composite DICOM instance (no SOP Class UID or SOP Instance UID)"
REASON_DICOMDIR = "DICOMDIR media directory: holds file paths and patient records; rebuild it from the de-identified files"
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
REASON_RESIDUAL = "an identifier of the patient survived de-identification (free text the table does not cover)"
REASON_WRITE = "the de-identified data set could not be written"
REASON_FAILED = "the file could not be de-identified safely (an element could not be decoded or rewritten)"
REASON_CRASH = "the de-identification process crashed on this file"
REASON_DUPLICATE = "another file in this run has the same SOP Instance UID but different content"


def _under(uid: str, root: str) -> bool:
    return uid == root or uid.startswith(root + ".")


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip().upper() if value is not None else ""


def refusal(ds: Dataset) -> str | None:
    """Reason to quarantine a parsed data set, or None if the engine may de-identify it."""
    sop_class = str(ds.get("SOPClassUID", "") or "").strip()
    sop_instance = str(ds.get("SOPInstanceUID", "") or "").strip()
    if not sop_class or not sop_instance:
        if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
            return REASON_DICOMDIR
        return REASON_NOT_INSTANCE
    if sop_class == MEDIA_STORAGE_DIRECTORY:
        return REASON_DICOMDIR
    if _under(sop_class, ENCAPSULATED_DOCUMENT_ROOT) or "EncapsulatedDocument" in ds:
        return REASON_ENCAPSULATED
    if _text(ds, "BurnedInAnnotation") == "YES":
        return REASON_BURNED_IN
    if _text(ds, "RecognizableVisualFeatures") == "YES":
        return REASON_VISUAL
    if _under(sop_class, SECONDARY_CAPTURE_ROOT):
        return REASON_SECONDARY_CAPTURE
    if any(_under(sop_class, root) for root in ULTRASOUND_ROOTS) or _text(ds, "Modality") == "US":
        return REASON_ULTRASOUND
    if _under(sop_class, VISIBLE_LIGHT_ROOT):
        return REASON_VISIBLE_LIGHT
    image_type = ds.get("ImageType")
    if image_type is not None:
        values = [image_type] if isinstance(image_type, str) else list(image_type)
        # "SECONDARY" alone is normal for reformatted CT/MR: only screen captures count.
        if any(str(v).strip().upper() in SCREEN_CAPTURE_TYPES for v in values):
            return REASON_SCREEN_CAPTURE
    if is_image_class(sop_class) and not has_pixels(ds):
        return REASON_NO_PIXELS
    return pixel_problem(ds)


def truncation(ds: Dataset, size: int | None = None) -> str | None:
    """Reason if the file was cut short, or None.

    pydicom reads a file cut short without complaint: the last value is just
    shorter, or a partial element header at the end is dropped. So check, before
    any element is converted, that every top-level value has its declared
    length and that the last element ends where the file (of ``size`` bytes) ends.
    """
    last_end = -1
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        value_tell = getattr(raw, "value_tell", None)
        if not isinstance(length, int) or length == 0xFFFFFFFF:
            last_end = -1  # a parsed sequence or undefined length: its end is not known here
            continue
        if isinstance(value, bytes) and len(value) < length:
            return REASON_PIXELS_TRUNCATED if int(tag) in PIXEL_TAGS else REASON_TRUNCATED
        last_end = value_tell + length if isinstance(value_tell, int) else -1
    if size is not None and 0 <= last_end < size:
        return REASON_TRUNCATED
    return None


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
        from pydicom.pixels.utils import get_expected_length

        expected = get_expected_length(ds)
        if len(ds.PixelData or b"") < expected:
            return REASON_PIXELS_TRUNCATED
    except Exception:  # noqa: BLE001 - any decoder failure means we cannot vouch for it
        return REASON_PIXELS_UNDECODABLE
    return None
