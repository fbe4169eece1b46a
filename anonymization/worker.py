"""De-identification of one file: read, screen, clean, write to a temporary name.

A :class:`FileWorker` holds what the per-file path needs (engine, keys, done-index),
built once per process from a :class:`Job`; it runs in the parent or in a pool
worker (:func:`init_worker` builds the process's own, :func:`process_path` uses
it). It never writes records (manifest, audit, quarantine) - it returns a
:class:`FileResult` and the parent, the only writer, renames the temporary
output into place or quarantines the file. Nothing raised here escapes: any
failure becomes a quarantine reason.

The hot path is tuned (see bench/deid_throughput.py): the input is read once
into memory and parsed lazily; pixel data is never decoded unless Clean Pixel
Data has to look at it; untouched elements, pixel data included, are copied
byte for byte into the output (:mod:`anonymization.writer`); nothing is
fsync'ed per file - the parent makes outputs durable in batches before it
records them as done (see :mod:`anonymization.batch`).
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import re
import secrets
import stat
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
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
from anonymization.errors import is_disk_full
from anonymization.limits import inflated_refusal, pixel_refusal
from anonymization.policy import Policy
from anonymization.pseudonyms import Pseudonymizer
from anonymization.reid import Sealer
from anonymization.reid import originals as reid_originals
from anonymization.writer import encode_file

IMPLEMENTATION_VERSION_NAME = "MEDFED_010"
# Our own implementation class UID: a fixed 2.25 UID derived from the product name.
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'urn:medfed:implementation:0.1').int}"

IMAGES_DIR = "images"
OBJECTS_DIR = "objects"  # de-identified non-image objects (SR, RT plans): not in the manifest
TMP_SUFFIX = ".tmp"

KIND_DEIDENTIFIED = "deidentified"
KIND_QUARANTINED = "quarantined"
KIND_SKIPPED = "skipped"
KIND_DONE = "done"  # already de-identified by an earlier run (the done-index has its digest)
KIND_DISK_FULL = "disk_full"  # ENOSPC/EDQUOT while writing: the run stops, no file is to blame
DONE_DIGEST_HEX = 32  # the done-index keeps 128 bits of each keyed input digest

# Marks written by the engine itself: not scanned for surviving identifiers.
REASON_LINK = "a symbolic link: never followed, read or copied"
REASON_SPECIAL = "not a regular file (device, FIFO or socket): never read or copied"
REASON_PATH_VALUE = "a value used in the output path (patient, study or SOP instance) is not a plain name"
# A name the output path may hold: starts with a letter or digit (never "." or ".."), no separator.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-]{0,127}")

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
    reid_row: tuple[str, str] | None = None  # (dedupe key, row sealed to the privacy officer)
    pixel_cleaning: dict[str, object] | None = None  # Clean Pixel Data: what was done (counts only)
    unread: bool = False  # never read (a link, a device): listed in the quarantine log, not copied


@dataclass(frozen=True)
class Job:
    """What every worker needs; pickled once per worker process."""

    secret: bytes
    dst: str
    options: tuple[str, ...]
    policy: Policy | None = None  # the site's policy; None: Policy.from_options(options)
    reid_public_key: bytes | None = None  # officer's public key (PEM): seal re-identification rows
    done_index: str | None = None  # file of keyed input digests already de-identified (resume)


class FileWorker:
    """One process's de-identification state, built once from a :class:`Job`.

    Everything the per-file path needs travels in this object (no module state), so
    the batch's pool workers, the parent and the DICOM intake each hold their own.
    """

    def __init__(self, job: Job) -> None:
        self.job = job
        self.dst = Path(job.dst)
        self.pseudo = Pseudonymizer(job.secret)
        self.policy = job.policy if job.policy is not None else Policy.from_options(job.options)
        self.engine = Deidentifier(self.pseudo, policy=self.policy)
        self.sealer = Sealer(job.reid_public_key, self.pseudo) if job.reid_public_key else None
        self.done = load_done_index(Path(job.done_index)) if job.done_index else None
        self._dirs: set[str] = set()  # output folders known to exist (bounded, see ensure_dir)

    def process_path(self, path: str) -> FileResult:
        """De-identify one file into a temporary output beside its final name; never raise."""
        try:
            data = read_regular(path)
        except NotRegularFile as err:
            return FileResult(KIND_QUARANTINED, "", reason=err.reason, unread=True)
        except OSError:
            return FileResult(KIND_QUARANTINED, "", reason="the file could not be read")
        digest = self.pseudo.digest(data)
        if is_done(self.done, digest):
            return FileResult(KIND_DONE, digest)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return _process(self, data, digest)
            except Exception as exc:  # noqa: BLE001 - bad input must never crash the batch
                if is_disk_full(exc):
                    return FileResult(KIND_DISK_FULL, digest, reason=str(exc.strerror))  # type: ignore[attr-defined]
                log.debug("file %s: %s", digest[:16], type(exc).__name__)
                return FileResult(KIND_QUARANTINED, digest,
                                  reason=f"{screening.REASON_FAILED} ({type(exc).__name__})")

    def ensure_dir(self, folder: Path) -> None:
        """mkdir -p, once per folder per process (a set bounded to 100k entries)."""
        known = self._dirs
        key = str(folder)
        if key in known:
            return
        parent = str(folder.parent)
        if parent not in known:  # a new patient: make its folder first (saves a failing mkdir)
            folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(folder)
        except FileExistsError:
            pass
        except FileNotFoundError:  # its parent went away since we cached it
            folder.mkdir(parents=True, exist_ok=True)
        if len(known) > 100_000:
            known.clear()
        known.update((key, parent))


_worker: FileWorker | None = None  # this process's worker, set by init_worker (the pool's initializer)


def init_worker(job: Job) -> FileWorker:
    """Pool initializer (and in-process setup): build this process's :class:`FileWorker` once."""
    global _worker
    _worker = FileWorker(job)
    # pydicom may log offending values; none of that may reach our logs.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    return _worker


def process_path(path: str) -> FileResult:
    """Entry point for the pool: de-identify one file with this process's worker, never raise."""
    if _worker is None:
        raise RuntimeError("init_worker(job) must run in this process first")
    return _worker.process_path(path)


class NotRegularFile(OSError):
    """The path is a symbolic link or a special file: refused without reading it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def refusal_for_mode(mode: int) -> str | None:
    """Why a file of this (``lstat``) mode is refused unread, or None for a regular file."""
    if stat.S_ISLNK(mode):
        return REASON_LINK
    if not stat.S_ISREG(mode):
        return REASON_SPECIAL
    return None


def open_regular(path: str | Path) -> int:
    """An fd on ``path`` if it is a regular file; never follows a final symbolic link.

    ``O_NOFOLLOW`` closes the gap between listing SRC and reading it (a file
    swapped for a link to the site key); ``O_NONBLOCK`` keeps a FIFO from
    hanging the run before ``fstat`` refuses it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise NotRegularFile(REASON_LINK) from None
        raise
    reason = refusal_for_mode(os.fstat(fd).st_mode)
    if reason is not None:
        os.close(fd)
        raise NotRegularFile(reason)
    return fd


def read_regular(path: str | Path) -> bytes:
    """The bytes of a regular file, read through :func:`open_regular`."""
    with os.fdopen(open_regular(path), "rb") as fh:
        return fh.read()


def plain_name(value: str) -> bool:
    """True if ``value`` can be one component of an output path (no "..", no separator)."""
    return _PLAIN_NAME.fullmatch(value) is not None


def load_done_index(path: Path) -> np.ndarray | None:
    """The done-index as a sorted array of 16-byte digests (16 MB per million files)."""
    digests = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:  # "<32 hex>[\t<manifest row>]"
                head = line[:DONE_DIGEST_HEX]
                if len(head) == DONE_DIGEST_HEX:
                    try:
                        digests.append(bytes.fromhex(head))
                    except ValueError:
                        continue  # a torn line from a crash: that input is simply done again
    except OSError:
        return None
    if not digests:
        return None
    return np.unique(np.array(digests, dtype="S16"))


def is_done(index: np.ndarray | None, digest: str) -> bool:
    """True if the keyed digest ``digest`` (hex) is in the done-index."""
    if index is None or len(digest) < DONE_DIGEST_HEX:
        return False
    key = np.array([bytes.fromhex(digest[:DONE_DIGEST_HEX])], dtype="S16")
    at = int(np.searchsorted(index, key)[0])
    return at < len(index) and index[at] == key[0]


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


class _Refused(Exception):
    """A step's reason to quarantine the file (control flow inside :func:`_process` only)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _process(worker: FileWorker, data: bytes, digest: str) -> FileResult:
    """Screen, clean, check and write one file read into memory; a refusal becomes a quarantine."""
    try:
        return _deidentify(worker, data, digest)
    except _Refused as refused:
        return FileResult(KIND_QUARANTINED, digest, reason=refused.reason)


def _deidentify(worker: FileWorker, data: bytes, digest: str) -> FileResult:
    """The steps of :func:`_process`, in the order the guarantees need them."""
    ds = _screened(worker.policy, data)
    identifiers = _identifiers(ds)  # before cleaning: what must not survive it
    is_image = screening.has_pixels(ds)
    transfer_syntax, pixel_cleaning = _clean_pixels(worker.policy, ds, _source_syntax(ds))
    counts, reid_row = _clean_header(worker, ds, data, identifiers)
    out = _encode(ds, transfer_syntax, data)
    rel, row = _destination(ds, is_image)
    tmp = _write_temporary(worker, rel, out)
    return FileResult(
        KIND_DEIDENTIFIED,
        digest,
        tmp_path=str(tmp),
        rel_path=rel,
        row=row,
        sop_uid=str(ds.SOPInstanceUID),
        actions=dict(sorted(counts.items())),
        output_digest=hashlib.sha256(out).hexdigest(),
        reid_row=reid_row,
        pixel_cleaning=pixel_cleaning,
    )


def _screened(policy: Policy, data: bytes) -> Dataset:
    """The parsed data set, once the size limits and the screening rules accept it."""
    reason = inflated_refusal(data, policy.limits.max_inflated_bytes)  # before pydicom inflates it
    if reason is not None:
        raise _Refused(reason)
    ds, reason = _read(data)
    if ds is None:
        raise _Refused(reason or screening.REASON_NOT_DICOM)
    reason = (screening.truncation(ds, len(data)) or pixel_refusal(ds, policy.limits.max_pixel_bytes)
              or screening.refusal(ds, clean_pixel_data=_cleans_pixels(policy)))  # the limit before decoding
    if reason is not None:
        raise _Refused(reason)
    return ds


def _cleans_pixels(policy: Policy) -> bool:
    return bool(getattr(policy, "clean_pixel_data", False))


def _source_syntax(ds: Dataset) -> str:
    """The transfer syntax the input is encoded in (its file meta, else inferred)."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return str(meta.TransferSyntaxUID)
    return str(_syntax_for(ds))


def _clean_pixels(policy: Policy, ds: Dataset, transfer_syntax: str) -> tuple[str, dict[str, object] | None]:
    """Clean Pixel Data where the policy asks and the image needs it: (output syntax, what was done)."""
    if not (_cleans_pixels(policy) and screening.needs_pixel_cleaning(ds)):
        return transfer_syntax, None
    from anonymization import pixels  # OCR stack: imported only when a file needs it

    try:
        cleaned = pixels.clean_pixel_data(
            ds, transfer_syntax, strict=screening.strict_text_search(ds), identifiers=pixels.identifier_tokens(ds),
        )
    except pixels.PixelCleaningError as err:
        raise _Refused(err.reason) from None
    return str(cleaned.transfer_syntax), cleaned.audit()


def _clean_header(
    worker: FileWorker, ds: Dataset, data: bytes, identifiers: list[str]
) -> tuple[dict[str, int], tuple[str, str] | None]:
    """Apply the profile; refuse a file where an identifier survives; seal its re-identification row."""
    sealer = worker.sealer
    before = reid_originals(ds) if sealer is not None else None
    counts = worker.engine.deidentify(ds, original=lambda: _read(data)[0])
    if _residual(ds, identifiers):
        raise _Refused(screening.REASON_RESIDUAL)
    reid_row = sealer.seal(before, ds) if sealer is not None and before is not None else None
    return counts, reid_row


def _encode(ds: Dataset, transfer_syntax: str, data: bytes) -> bytes:
    """The output file, with File Meta Information rebuilt from scratch (the source's may name its station)."""
    meta = {
        "MediaStorageSOPClassUID": str(ds.SOPClassUID),
        "MediaStorageSOPInstanceUID": str(ds.SOPInstanceUID),
        "TransferSyntaxUID": transfer_syntax,
        "ImplementationClassUID": IMPLEMENTATION_CLASS_UID,
        "ImplementationVersionName": IMPLEMENTATION_VERSION_NAME,
    }
    try:
        return encode_file(ds, meta, data)
    except Exception as exc:  # noqa: BLE001
        raise _Refused(f"{screening.REASON_WRITE} ({type(exc).__name__})") from None


def _destination(ds: Dataset, is_image: bool) -> tuple[str, dict[str, str] | None]:
    """The output's path under DST and, for an image, its manifest row (pseudonyms and the path only)."""
    patient = str(ds.PatientID)
    study = str(ds.get("StudyInstanceUID", "") or "") or "no-study"
    sop_uid = str(ds.SOPInstanceUID)
    if not all(plain_name(part) for part in (patient, study, sop_uid)):  # Retain UIDs keeps the source's
        raise _Refused(REASON_PATH_VALUE)
    rel = f"{IMAGES_DIR if is_image else OBJECTS_DIR}/{patient}/{study}/{sop_uid}.dcm"
    if not is_image:
        return rel, None
    return rel, {
        "patient": patient,
        "study_uid": study,
        "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "sop_uid": sop_uid,
        "accession": str(ds.get("AccessionNumber", "") or ""),
        "path": rel,
    }


def _write_temporary(worker: FileWorker, rel: str, out: bytes) -> Path:
    """Write ``out`` to a hidden temporary name beside ``rel``; the parent renames it into place.

    Not fsync'ed here: the parent makes outputs durable in batches before it records them as
    done. A full disk propagates (the run stops); any other write error refuses the file.
    """
    final = worker.dst / rel
    worker.ensure_dir(final.parent)
    tmp = final.parent / f".{final.stem}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(out)
    except OSError as err:
        tmp.unlink(missing_ok=True)  # never leave a half-written output behind
        if is_disk_full(err):
            raise
        raise _Refused(screening.REASON_WRITE) from None
    return tmp


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


# Character sets whose text can be decoded with a plain codec: the residual check reads
# raw elements directly instead of having pydicom convert them (ISO 2022 escapes need pydicom).
_RAW_CODECS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}


def _charset_key(ds: Dataset) -> str:
    raw = ds.get_item(0x00080005)
    if raw is None:
        return ""
    value = raw.value
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, (list, MultiValue)):
        value = "\\".join(str(v) for v in value)
    return str(value or "").strip(" \x00").upper()


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

    codec = _RAW_CODECS.get(_charset_key(ds))  # raw text decoded directly where the character set allows

    def walk(item: Dataset, top: bool) -> bool:
        elements = getattr(item, "_dict", None)
        for tag in list(elements) if isinstance(elements, dict) else list(item.keys()):
            tag = int(tag)
            if (top and tag in _OWN_TAGS) or tag in _CODE_TAGS:
                continue
            raw = elements.get(tag) if isinstance(elements, dict) else None
            raw_vr = getattr(raw, "VR", None)
            if raw_vr is not None and raw_vr != "SQ" and raw_vr != "UN" and raw_vr not in _SCANNED_VRS:
                continue  # numbers, dates, UIDs, bytes: not converted, nothing to scan
            if codec is not None and raw_vr in _SCANNED_VRS and type(raw) is RawDataElement:
                if isinstance(raw.value, bytes) and leaks(raw.value.decode(codec, "replace")):
                    return True
                continue  # kept exactly as read: scanned without converting it
            elem = item[tag]
            if elem.VR == "SQ":
                if any(walk(child, False) for child in elem.value or []):
                    return True
            elif elem.VR in _SCANNED_VRS and elem.value not in (None, "") and leaks(str(elem.value)):
                return True
        return False

    return walk(ds, True)
