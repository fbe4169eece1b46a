"""De-identification of one file: read, screen, clean, write to a temporary name.

Runs in the parent or in a pool worker; it never writes records (manifest,
audit, quarantine) - it returns a :class:`FileResult` and the parent, the only
writer, renames the temporary output into place or quarantines the file.
Nothing raised here escapes: any failure becomes a quarantine reason.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import secrets
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

from anonymization import screening
from anonymization.engine import (
    ACCESSION_NUMBER,
    PATIENT_ID,
    PATIENT_NAME,
    Deidentifier,
)
from anonymization.pseudonyms import Pseudonymizer
from anonymization.table import Profile

IMPLEMENTATION_VERSION_NAME = "MEDFED_010"
# Our own implementation class UID: a fixed 2.25 UID derived from the product name.
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'urn:medfed:implementation:0.1').int}"

IMAGES_DIR = "images"
OBJECTS_DIR = "objects"  # de-identified non-image objects (SR, RT plans): not in the manifest
TMP_SUFFIX = ".tmp"

KIND_DEIDENTIFIED = "deidentified"
KIND_QUARANTINED = "quarantined"
KIND_SKIPPED = "skipped"

# Marks written by the engine itself: not scanned for surviving identifiers.
_OWN_TAGS = frozenset({PATIENT_ID, PATIENT_NAME, ACCESSION_NUMBER, 0x00120062, 0x00120063, 0x00120064, 0x00280303})
_SCANNED_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"})
_MIN_TOKEN = 4
_WORD_SPLIT = re.compile(r"[^0-9A-Z]+")
# Code Value, Coding Scheme Designator/Version, Code Meaning, Mapping Resource, Context ID,
# Long/URN Code Value: controlled vocabulary ("Recording Observer's Name"), not free text.
_CODE_TAGS = frozenset(
    {0x00080100, 0x00080102, 0x00080103, 0x00080104, 0x00080105, 0x0008010F, 0x00080119, 0x00080120}
)

log = logging.getLogger(__name__)


@dataclass
class FileResult:
    """What happened to one input file (no identifier in clear)."""

    kind: str
    input_digest: str
    reason: str = ""
    tmp_path: str | None = None
    rel_path: str | None = None  # final path relative to DST, posix separators
    row: dict[str, str] | None = None  # manifest row without its label (images only)
    sop_uid: str = ""
    actions: dict[str, int] = field(default_factory=dict)
    output_digest: str = ""


@dataclass(frozen=True)
class Job:
    """What every worker needs; pickled once per worker process."""

    secret: bytes
    dst: str
    options: tuple[str, ...]


_state: dict[str, Any] = {}


def init_worker(job: Job) -> None:
    """Pool initializer (and in-process setup): build the engine once per process."""
    pseudo = Pseudonymizer(job.secret)
    _state["job"] = job
    _state["pseudo"] = pseudo
    _state["engine"] = Deidentifier(pseudo, Profile(job.options))
    # pydicom may log offending values; none of that may reach our logs.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def process_path(path: str) -> FileResult:
    """Entry point for the pool: de-identify one file, never raise."""
    pseudo: Pseudonymizer = _state["pseudo"]
    try:
        data = Path(path).read_bytes()
    except OSError:
        return FileResult(KIND_QUARANTINED, "", reason="the file could not be read")
    digest = pseudo.digest(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _process(data, digest)
        except Exception as exc:  # noqa: BLE001 - bad input must never crash the batch
            log.debug("file %s: %s", digest[:16], type(exc).__name__)
            return FileResult(KIND_QUARANTINED, digest, reason=f"{screening.REASON_FAILED} ({type(exc).__name__})")


def _read(data: bytes) -> tuple[Dataset | None, str | None]:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data))
        if any("end of file" in str(w.message).lower() for w in caught):
            return None, screening.REASON_TRUNCATED
        return ds, None
    except InvalidDicomError:
        pass
    except Exception as exc:  # noqa: BLE001
        return None, f"{screening.REASON_UNREADABLE} ({type(exc).__name__})"
    # No DICM prefix: a raw data set is acceptable if it really is a composite instance.
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            return None, screening.REASON_NOT_DICOM
        return ds, None
    except Exception:  # noqa: BLE001
        return None, screening.REASON_NOT_DICOM


def _process(data: bytes, digest: str) -> FileResult:
    job: Job = _state["job"]
    engine: Deidentifier = _state["engine"]
    ds, reason = _read(data)
    if ds is None:
        return FileResult(KIND_QUARANTINED, digest, reason=reason or screening.REASON_NOT_DICOM)
    reason = screening.truncation(ds, len(data)) or screening.refusal(ds)
    if reason is not None:
        return FileResult(KIND_QUARANTINED, digest, reason=reason)

    had_meta_ts = bool(ds.file_meta.get("TransferSyntaxUID")) if hasattr(ds, "file_meta") else False
    transfer_syntax = ds.file_meta.TransferSyntaxUID if had_meta_ts else _syntax_for(ds)
    identifiers = _identifiers(ds)
    is_image = screening.has_pixels(ds)

    counts = engine.deidentify(ds)
    leak = _residual(ds, identifiers)
    if leak:
        return FileResult(KIND_QUARANTINED, digest, reason=screening.REASON_RESIDUAL)

    sop_uid = str(ds.SOPInstanceUID)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    buffer = io.BytesIO()
    try:
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        out = buffer.getvalue()
        pydicom.dcmread(io.BytesIO(out))  # what we write must read back
    except Exception as exc:  # noqa: BLE001
        return FileResult(KIND_QUARANTINED, digest, reason=f"{screening.REASON_WRITE} ({type(exc).__name__})")

    patient = str(ds.PatientID)
    study = str(ds.get("StudyInstanceUID", "") or "") or "no-study"
    series = str(ds.get("SeriesInstanceUID", "") or "")
    for part in (patient, study, sop_uid):
        if not re.fullmatch(r"[A-Za-z0-9.\-]+", part):  # path built only from pseudonyms
            return FileResult(KIND_QUARANTINED, digest, reason=screening.REASON_NOT_INSTANCE)
    top = IMAGES_DIR if is_image else OBJECTS_DIR
    rel = f"{top}/{patient}/{study}/{sop_uid}.dcm"
    final = Path(job.dst) / rel
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{sop_uid}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    with open(tmp, "wb") as fh:
        fh.write(out)
        fh.flush()
        os.fsync(fh.fileno())
    row = None
    if is_image:
        row = {
            "patient": patient,
            "study_uid": study,
            "series_uid": series,
            "sop_uid": sop_uid,
            "accession": str(ds.get("AccessionNumber", "") or ""),
            "path": rel,
        }
    return FileResult(
        KIND_DEIDENTIFIED,
        digest,
        tmp_path=str(tmp),
        rel_path=rel,
        row=row,
        sop_uid=sop_uid,
        actions=dict(sorted(counts.items())),
        output_digest=hashlib.sha256(out).hexdigest(),
    )


def _syntax_for(ds: Dataset) -> str:
    """No file meta: Explicit VR Little Endian, unless big-endian pixels force big endian."""
    encoding = getattr(ds, "original_encoding", (False, True))
    little = encoding[1] if encoding and encoding[1] is not None else True
    if not little and screening.has_pixels(ds) and int(ds.get("BitsAllocated", 8) or 8) > 8:
        return ExplicitVRBigEndian
    return ExplicitVRLittleEndian


def _identifiers(ds: Dataset) -> list[str]:
    """The patient's direct identifiers (whole values and name parts of >= 4 characters)."""
    found: set[str] = set()
    for keyword in ("PatientName", "PatientID", "AccessionNumber", "OtherPatientIDs", "MedicalRecordLocator"):
        value = ds.get(keyword)
        if value is None:
            continue
        values = list(value) if isinstance(value, (list, MultiValue)) else [value]
        for v in values:
            text = str(v).strip().upper()
            tokens = [text]
            if keyword == "PatientName":
                tokens += [t for t in _WORD_SPLIT.split(text) if t]
            found.update(t for t in tokens if len(t) >= _MIN_TOKEN)
    return sorted(found)


def _residual(ds: Dataset, identifiers: list[str]) -> bool:
    """True if an identifier survives in a text value of the cleaned data set.

    Single words must match a whole word of the value; multi-word values (a full
    name) match as substrings. Coded values (designators, code values) are not
    scanned: a name that happens to equal a code is not a leak.
    """
    if not identifiers:
        return False
    words = {t for t in identifiers if not _WORD_SPLIT.search(t)}
    phrases = [t for t in identifiers if t not in words]

    def leaks(text: str) -> bool:
        text = text.upper()
        if any(p in text for p in phrases):
            return True
        return not words.isdisjoint(_WORD_SPLIT.split(text))

    def walk(item: Dataset, top: bool) -> bool:
        for elem in item:
            tag = int(elem.tag)
            if (top and tag in _OWN_TAGS) or tag in _CODE_TAGS:
                continue
            if elem.VR == "SQ":
                if any(walk(child, False) for child in elem.value or []):
                    return True
            elif elem.VR in _SCANNED_VRS and elem.value not in (None, ""):
                if leaks(str(elem.value)):
                    return True
        return False

    return walk(ds, True)
