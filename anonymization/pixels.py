"""Clean Pixel Data (PS3.15 E.3.1): find text burned into the pixels with OCR and blank it.

Header rules cannot remove a name that a scanner console or an ultrasound
machine painted into the image, so under the Clean Pixel Data option every
frame is decoded and read with Tesseract (Debian ``tesseract-ocr``, through
``pytesseract``), the text regions are blanked in every frame, the result is
read again to check nothing legible is left, and the cleaned pixels are
written back with a transfer syntax that matches them.

Why it is built this way:

* CT is 12-16 bit; OCR wants 8-bit, dark text on white, with letters at least
  ~20 px high. Each frame is therefore windowed several ways (full range,
  robust percentiles, the file's own display window), inverted and upscaled
  before OCR, and the words of all windows are pooled.
* OCR boxes are tight and miss single letters (a middle initial) and
  punctuation, so boxes are padded, merged along a text line, and grown over
  bright connected components next to them (the missed letters).
* The check after cleaning is what makes it safe: if OCR still reads a word,
  or anything resembling the patient's own identifiers, that region is blanked
  too; if text remains after a few rounds, or so much would be blanked that
  the image is mostly text, the file is refused (quarantined) with a reason,
  never written half-clean.
* OCR scratch images are written by pytesseract to a private 0700 folder that
  is removed after each call: a temporary PNG of a raw image holds PHI.

Nothing here logs or raises with a value from the file (docs/design.md invariant 4): the
reasons are fixed strings.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

# ---- fixed reasons (quarantine log, audit trail) ---------------------------------------
REASON_NO_OCR = (
    "Clean Pixel Data needs the OCR engine: install Debian's tesseract-ocr and tesseract-ocr-eng "
    "(and the pytesseract package) or turn the option off"
)
REASON_UNDECODABLE = "pixel data cannot be decoded, so burned-in text cannot be found or removed"
REASON_UNRELIABLE = "burned-in text could not be found and removed reliably (OCR still reads text after cleaning)"
REASON_TOO_MUCH_TEXT = "burned-in text could not be removed reliably (text covers too much of the image)"
REASON_UNSUPPORTED = "pixel data of this kind cannot be cleaned (float, or an unsupported layout)"

# ---- tuning --------------------------------------------------------------------------------
# When a word Tesseract reports counts as text (confidence 0-100, alphanumeric characters):
# short "words" read into anatomy (bone edges, bowel gas) come with low confidence.
SURE_CONF = 60.0  # any word of >= 1 alphanumeric character at this confidence
MIN_WORD_CONF = 30.0  # words of >= 3 alphanumeric characters at this confidence
STRICT_WORD_CONF = 15.0  # ultrasound / secondary capture / screen saves: >= 2 characters at this
VERIFY_CONF = 40.0  # after cleaning: >= 3 characters read this confidently means text is left
MAX_ROUNDS = 3  # blank, re-read, blank what is still read... then give up (quarantine)
MAX_BLANK_FRACTION = 0.35  # more than this of a frame blanked: it is a document, not an image
TARGET_SIDE = 900  # upscale so the longer side is about this many pixels ...
MAX_SCALE = 4  # ... but never more than this (small matrices: 10 px text becomes 40 px)
BORDER = 12  # white margin around the OCR image: Tesseract misses text touching the edge
SAMPLED_FRAMES = 8  # multi-frame: OCR the max projection plus up to this many frames
OCR_TIMEOUT_S = 120
TESSERACT_CONFIG = "--oem 1 --psm 11"  # LSTM engine; sparse text in no particular order

_WORD = re.compile(r"[A-Z0-9]+")
_LOSSY_METHOD = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",
    "1.2.840.10008.1.2.4.93": "ISO_15444_1",
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",
    "1.2.840.10008.1.2.4.100": "ISO_13818_2",
    "1.2.840.10008.1.2.4.101": "ISO_13818_2",
    "1.2.840.10008.1.2.4.102": "ISO_14496_10",
    "1.2.840.10008.1.2.4.103": "ISO_14496_10",
    "1.2.840.10008.1.2.4.104": "ISO_14496_10",
    "1.2.840.10008.1.2.4.105": "ISO_14496_10",
    "1.2.840.10008.1.2.4.106": "ISO_14496_10",
    "1.2.840.10008.1.2.4.107": "ISO_23008_2",
    "1.2.840.10008.1.2.4.108": "ISO_23008_2",
}  # the lossy transfer syntaxes and the Lossy Image Compression Method they imply
# Lossless encapsulated syntaxes pydicom can encode itself: cleaned pixels keep them.
_REENCODABLE = (RLELossless, JPEG2000Lossless)


class PixelCleaningError(Exception):
    """The pixels cannot be cleaned safely; ``reason`` is a fixed quarantine reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Box:
    """A rectangle in frame pixels: ``left <= x < right``, ``top <= y < bottom``."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left

    def padded(self, dx: int, dy: int, shape: tuple[int, int]) -> Box:
        rows, cols = shape
        return Box(
            max(0, self.left - dx), max(0, self.top - dy), min(cols, self.right + dx), min(rows, self.bottom + dy)
        )

    def union(self, other: Box) -> Box:
        return Box(
            min(self.left, other.left),
            min(self.top, other.top),
            max(self.right, other.right),
            max(self.bottom, other.bottom),
        )

    def intersects(self, other: Box) -> bool:
        return (
            self.left < other.right and other.left < self.right and self.top < other.bottom and other.top < self.bottom
        )


@dataclass(frozen=True)
class Word:
    """One word Tesseract read, in frame coordinates."""

    text: str
    conf: float
    box: Box


@dataclass(frozen=True)
class PixelCleaning:
    """What cleaning did; goes into the per-file result and the audit trail (counts only)."""

    regions: int  # text regions blanked (the same regions in every frame)
    frames: int
    rounds: int  # OCR passes until nothing legible was left
    transfer_syntax: str  # of the cleaned pixel data
    overlays_removed: int

    def audit(self) -> dict[str, object]:
        """The fields the audit trail records for this file."""
        return {
            "pixel_cleaning": "done",
            "regions": self.regions,
            "frames": self.frames,
            "ocr_rounds": self.rounds,
            "transfer_syntax": self.transfer_syntax,
            "overlays_removed": self.overlays_removed,
        }


# ---- the OCR engine ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def tesseract_available() -> bool:
    """True if pytesseract is installed and the ``tesseract`` binary answers."""
    try:
        import pytesseract

        if shutil.which(pytesseract.pytesseract.tesseract_cmd) is None:
            return False
        pytesseract.get_tesseract_version()
        return True
    except Exception:  # noqa: BLE001 - any failure means: no OCR here
        return False


@contextlib.contextmanager
def _private_tempdir() -> Iterator[None]:
    """Point :mod:`tempfile` (used by pytesseract) at a fresh 0700 folder, then remove it."""
    folder = tempfile.mkdtemp(prefix="medfed-ocr-")  # mkdtemp creates it 0700
    previous = tempfile.tempdir
    tempfile.tempdir = folder
    try:
        yield
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(folder, ignore_errors=True)


def _ocr(img8: np.ndarray, scale: int) -> list[Word]:
    """Words in an 8-bit image whose text is bright; boxes mapped back to ``img8`` pixels."""
    import pytesseract
    from PIL import Image as PILImage

    inverted = PILImage.fromarray(np.ascontiguousarray(255 - img8))
    if scale > 1:
        inverted = inverted.resize((inverted.width * scale, inverted.height * scale), PILImage.Resampling.BICUBIC)
    canvas = PILImage.new("L", (inverted.width + 2 * BORDER, inverted.height + 2 * BORDER), 255)
    canvas.paste(inverted, (BORDER, BORDER))
    data = pytesseract.image_to_data(
        canvas, lang="eng", config=TESSERACT_CONFIG, output_type=pytesseract.Output.DICT, timeout=OCR_TIMEOUT_S
    )
    words: list[Word] = []
    rows, cols = img8.shape
    for text, conf, left, top, width, height in zip(
        data["text"], data["conf"], data["left"], data["top"], data["width"], data["height"], strict=True
    ):
        text = str(text).strip()
        if not text:
            continue
        x0 = (int(left) - BORDER) / scale
        y0 = (int(top) - BORDER) / scale
        x1 = (int(left) + int(width) - BORDER) / scale
        y1 = (int(top) + int(height) - BORDER) / scale
        box = Box(
            max(0, int(np.floor(x0))), max(0, int(np.floor(y0))),
            min(cols, int(np.ceil(x1))), min(rows, int(np.ceil(y1))),
        )
        if box.width > 0 and box.height > 0:
            words.append(Word(text, float(conf), box))
    return words


def _scale_for(shape: tuple[int, int]) -> int:
    return int(min(MAX_SCALE, max(1, round(TARGET_SIDE / max(shape)))))


def _to8(gray: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        hi = lo + 1.0
    scaled = (gray - lo) * (255.0 / (hi - lo))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def windows(gray: np.ndarray, voi: tuple[float, float] | None = None) -> list[np.ndarray]:
    """8-bit renderings of one frame in which burned-in text shows, text bright.

    Full range (text drawn at the maximum value), robust percentiles (a few
    outliers - metal, padding - squeeze everything else to one grey), and the
    file's own display window (what the technologist saw, text included).
    Near-duplicates are dropped: each rendering costs one OCR call.
    """
    lo, hi = float(gray.min()), float(gray.max())
    span = max(hi - lo, 1.0)
    candidates = [(lo, hi)]
    p_lo, p_hi = (float(v) for v in np.percentile(gray, (1.0, 99.5)))
    candidates.append((p_lo, p_hi))
    if voi is not None:
        center, width = voi
        candidates.append((center - width / 2.0, center + width / 2.0))
    chosen: list[tuple[float, float]] = []
    for a, b in candidates:
        if b - a < span / 64:
            continue
        if any(abs(a - c) < span * 0.04 and abs(b - d) < span * 0.04 for c, d in chosen):
            continue
        chosen.append((a, b))
    return [_to8(gray, a, b) for a, b in chosen]


def _characters(text: str) -> int:
    return sum(map(len, _WORD.findall(text.upper())))


def is_text(word: Word, *, strict: bool = False) -> bool:
    """Whether a word OCR read counts as burned-in text (see the confidence constants)."""
    chars = _characters(word.text)
    if chars == 0:
        return False
    if word.conf >= SURE_CONF or (word.conf >= MIN_WORD_CONF and chars >= 3):
        return True
    return strict and word.conf >= STRICT_WORD_CONF and chars >= 2


def find_words(gray: np.ndarray, voi: tuple[float, float] | None = None) -> list[Word]:
    """Every word OCR reads in any window of one frame, with its confidence (unfiltered)."""
    scale = _scale_for(gray.shape)
    tallest = max(8, gray.shape[0] // 4)  # a "word" taller than a quarter of the image is a misread shape
    images = windows(gray, voi)
    # One Tesseract process per window, side by side; each single-threaded (its OpenMP
    # threads fight each other on a small machine: OMP_THREAD_LIMIT=1 halves the time).
    os.environ.setdefault("OMP_THREAD_LIMIT", "1")
    with _private_tempdir():
        if len(images) == 1 or (os.cpu_count() or 1) == 1:
            results = [_ocr(img8, scale) for img8 in images]
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(len(images), os.cpu_count() or 1)) as pool:
                results = list(pool.map(lambda img8: _ocr(img8, scale), images))
    return [word for found in results for word in found if word.box.height <= tallest]


# ---- from words to regions --------------------------------------------------------------------
def _lines(boxes: Sequence[Box]) -> list[Box]:
    """Merge boxes that sit on one text line (a missed initial between two words included)."""
    merged = sorted(boxes, key=lambda b: (b.top, b.left))
    changed = True
    while changed:
        changed = False
        out: list[Box] = []
        for box in merged:
            for i, line in enumerate(out):
                overlap = min(line.bottom, box.bottom) - max(line.top, box.top)
                gap = max(line.left, box.left) - min(line.right, box.right)
                height = max(line.height, box.height)
                if overlap >= 0.5 * min(line.height, box.height) and gap <= 1.5 * height:
                    out[i] = line.union(box)
                    changed = True
                    break
            else:
                out.append(box)
        merged = out
    return merged


def _grow(gray: np.ndarray, line: Box) -> Box:
    """Grow a text line over bright, letter-sized connected components next to it."""
    from scipy import ndimage

    h = max(line.height, 4)
    search = line.padded(2 * h, h // 2 + 1, gray.shape)
    patch = gray[search.top:search.bottom, search.left:search.right]
    inner = gray[line.top:line.bottom, line.left:line.right]
    if patch.size == 0 or inner.size == 0:
        return line
    threshold = (float(np.median(patch)) + float(inner.max())) / 2.0
    if threshold >= float(inner.max()):
        return line
    labels, _count = ndimage.label(patch > threshold, structure=np.ones((3, 3), dtype=bool))
    grown = line
    middle = (line.top + line.bottom) / 2.0
    for slices in ndimage.find_objects(labels):
        if slices is None:
            continue
        ys, xs = slices
        comp = Box(search.left + xs.start, search.top + ys.start, search.left + xs.stop, search.top + ys.stop)
        if comp.height > 1.3 * h or comp.width > 3 * h:
            continue  # anatomy or a frame line, not a letter
        if not comp.top <= middle <= comp.bottom and not line.top <= (comp.top + comp.bottom) / 2.0 <= line.bottom:
            continue  # not on this text line
        if comp.padded(h // 2 + 1, 0, gray.shape).intersects(line):
            grown = grown.union(comp)
    return grown


def regions_for(gray: np.ndarray, words: Iterable[Word]) -> list[Box]:
    """Padded, line-merged, component-grown regions to blank for these words."""
    boxes = []
    for word in words:
        pad = max(2, int(round(0.3 * word.box.height)))
        boxes.append(word.box.padded(pad, pad, gray.shape))
    if not boxes:
        return []
    regions = []
    for line in _lines(boxes):
        grown = _grow(gray, line)
        pad = max(1, grown.height // 8)
        regions.append(grown.padded(pad, pad, gray.shape))
    return _lines(regions) if len(regions) > 1 else regions


# ---- identifiers the verification looks for -----------------------------------------------------
def identifier_tokens(ds: Dataset) -> list[str]:
    """Words of the patient's identifiers as OCR would print them (upper case, >= 3 chars).

    Names, IDs, accession number and birth date (as stored and as DD-MON-YYYY,
    DD.MM.YYYY, MM/DD/YYYY): the check after cleaning looks for these at any
    confidence, so a blurred name that OCR half-reads still counts as text.
    """
    tokens: set[str] = set()
    for keyword in ("PatientName", "PatientID", "OtherPatientIDs", "AccessionNumber", "PatientBirthName",
                    "PatientMotherBirthName"):
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        values = list(value) if isinstance(value, (list, MultiValue)) else [value]
        for v in values:
            tokens.update(t for t in _WORD.findall(str(v).upper()) if len(t) >= 3)
    birth = str(ds.get("PatientBirthDate", "") or "")
    if re.fullmatch(r"\d{8}", birth):
        tokens.add(birth)
    return sorted(tokens)


def _matches(word: str, tokens: Sequence[str]) -> bool:
    """True if an OCR word contains an identifier token, allowing one misread character."""
    for part in _WORD.findall(word.upper()):
        for token in tokens:
            if token in part or (len(token) >= 5 and _near(part, token)):
                return True
    return False


def _near(text: str, token: str) -> bool:
    """``token`` occurs in ``text`` with at most one substituted character."""
    n = len(token)
    for start in range(0, max(1, len(text) - n + 1)):
        window = text[start:start + n]
        if len(window) == n and sum(a != b for a, b in zip(window, token, strict=True)) <= 1:
            return True
    return False


# ---- frames -------------------------------------------------------------------------------------
def _frames(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Decoded pixels as (frames, rows, cols[, samples])."""
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 or (samples == 1 and arr.ndim == 3) or (samples > 1 and arr.ndim == 4):
        return arr
    return arr[np.newaxis, ...]


def _gray(frame: np.ndarray, photometric: str) -> np.ndarray:
    """One frame as float32 with text bright: luminance for colour; MONOCHROME1 inverted."""
    if frame.ndim == 3:
        return (frame[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    gray = frame.astype(np.float32)
    return -gray if photometric == "MONOCHROME1" else gray


def _grays(frame: np.ndarray, photometric: str) -> list[np.ndarray]:
    """Grey renderings of one frame: for colour, luminance (white text on a coloured bar)
    and the brightest channel (yellow or green text on grey)."""
    if frame.ndim == 3:
        return [_gray(frame, photometric), frame.max(axis=2).astype(np.float32)]
    return [_gray(frame, photometric)]


def _voi(ds: Dataset, photometric: str) -> tuple[float, float] | None:
    """The file's display window in stored values (and in the MONOCHROME1-inverted space)."""
    try:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is None or width is None:
            return None
        center = float(center[0] if isinstance(center, (list, MultiValue)) else center)
        width = float(width[0] if isinstance(width, (list, MultiValue)) else width)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if slope == 0 or width <= 0:
            return None
        stored_center, stored_width = (center - intercept) / slope, abs(width / slope)
        return (-stored_center if photometric == "MONOCHROME1" else stored_center), stored_width
    except (TypeError, ValueError):
        return None


def _sample(count: int) -> list[int]:
    if count <= SAMPLED_FRAMES:
        return list(range(count))
    return sorted({int(round(i * (count - 1) / (SAMPLED_FRAMES - 1))) for i in range(SAMPLED_FRAMES)})


def _views(frames: np.ndarray, photometric: str) -> list[np.ndarray]:
    """What OCR looks at: every frame, or for long clips the max projection plus sampled frames.

    Static burned-in text (the usual case) is in every frame, so it is in the
    max projection and the samples; regions found are blanked in all frames.
    """
    grays = [g for i in _sample(frames.shape[0]) for g in _grays(frames[i], photometric)]
    if frames.shape[0] > SAMPLED_FRAMES:
        projection = np.max(np.stack([_gray(f, photometric) for f in frames]), axis=0)
        grays.insert(0, projection)
    return grays


def read_words(ds: Dataset, *, min_conf: float = 0.0) -> list[str]:
    """Every word OCR reads in the pixels of ``ds`` (all views, all windows), upper case."""
    frames = _frames(ds.pixel_array, ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    voi = _voi(ds, photometric)
    return [w.text.upper() for view in _views(frames, photometric) for w in find_words(view, voi) if w.conf >= min_conf]


def burned_in_names_read(ds: Dataset, original: Dataset) -> list[str]:
    """Which identifiers of ``original``'s patient OCR reads in the pixels of ``ds`` (for tests, bench)."""
    tokens = identifier_tokens(original)
    return sorted({t for t in tokens for w in read_words(ds) if _matches(w, [t])})


# ---- cleaning -----------------------------------------------------------------------------------
def remove_overlays(ds: Dataset) -> int:
    """Delete every overlay group (60xx): Overlay Data is graphics we cannot inspect."""
    groups = set()
    for tag in list(ds.keys()):
        group = tag >> 16
        if 0x6000 <= group <= 0x601E and group % 2 == 0:
            del ds[tag]
            groups.add(group)
    return len(groups)


def clean_pixel_data(
    ds: Dataset,
    transfer_syntax: str,
    *,
    strict: bool = False,
    identifiers: Sequence[str] = (),
) -> PixelCleaning:
    """Blank burned-in text in every frame of ``ds`` in place; return what was done.

    ``transfer_syntax`` is the one the pixels are encoded in now; the returned
    :attr:`PixelCleaning.transfer_syntax` is the one the caller must write the
    file with. ``strict`` (ultrasound, secondary capture, screen saves) takes
    low-confidence words as text too. ``identifiers`` (see
    :func:`identifier_tokens`) are looked for at any confidence after cleaning.
    Raises :class:`PixelCleaningError` if it cannot be done safely; ``ds`` may
    then be half-changed and must not be written.
    """
    if not tesseract_available():
        raise PixelCleaningError(REASON_NO_OCR)
    if 0x7FE00010 not in ds:
        raise PixelCleaningError(REASON_UNSUPPORTED)
    try:
        decoded = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure: cannot clean
        raise PixelCleaningError(REASON_UNDECODABLE) from exc
    if decoded.dtype.kind not in "ui":
        raise PixelCleaningError(REASON_UNSUPPORTED)
    frames = np.array(_frames(decoded, ds), copy=True)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    # pydicom's decoders converted YCbCr to RGB
    photometric_out = "RGB" if photometric.startswith("YBR") and frames.ndim == 4 else photometric
    voi = _voi(ds, photometric)
    blank = _blank_value(frames, photometric_out, ds)
    if photometric == "PALETTE COLOR":
        photometric = "RGB"  # OCR looks at the colours the indices stand for
        voi = None

        def views() -> list[np.ndarray]:
            from pydicom.pixels import apply_color_lut

            return _views(apply_color_lut(frames, ds), photometric)
    else:

        def views() -> list[np.ndarray]:
            return _views(frames, photometric)

    regions: list[Box] = []
    rows, cols = frames.shape[1], frames.shape[2]
    rounds = 0
    words = [
        w for view in views() for w in find_words(view, voi)
        if is_text(w, strict=strict) or _matches(w.text, identifiers)
    ]
    while True:
        rounds += 1
        if not words:
            break
        if rounds > MAX_ROUNDS:
            raise PixelCleaningError(REASON_UNRELIABLE)
        new = regions_for(views()[0], words)
        regions.extend(new)
        for box in new:
            frames[:, box.top:box.bottom, box.left:box.right, ...] = blank
        covered = np.zeros((rows, cols), dtype=bool)
        for box in regions:
            covered[box.top:box.bottom, box.left:box.right] = True
        if covered.mean() > MAX_BLANK_FRACTION:
            raise PixelCleaningError(REASON_TOO_MUCH_TEXT)
        words = [
            w for view in views() for w in find_words(view, voi)
            if _left_over(w, strict=strict) or _matches(w.text, identifiers)
        ]

    overlays = remove_overlays(ds)
    out_syntax = _store(ds, frames, decoded.ndim, photometric, photometric_out, UID(transfer_syntax))
    ds.BurnedInAnnotation = "NO"
    return PixelCleaning(
        regions=len(regions), frames=int(frames.shape[0]), rounds=rounds,
        transfer_syntax=str(out_syntax), overlays_removed=overlays,
    )


def _left_over(word: Word, *, strict: bool) -> bool:
    """After cleaning: does this word mean legible text is still there?"""
    if is_text(word, strict=strict):
        return True
    return word.conf >= VERIFY_CONF and _characters(word.text) >= 3


def _blank_value(frames: np.ndarray, photometric: str, ds: Dataset) -> np.ndarray | int:
    """What displays as black: the minimum (MONOCHROME2), the maximum (MONOCHROME1), zero
    (colour), the darkest palette entry in use (PALETTE COLOR)."""
    if frames.ndim == 4:
        return 0
    if photometric == "MONOCHROME1":
        return frames.max()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        used = np.unique(frames)
        colours = apply_color_lut(used, ds).reshape(len(used), -1).astype(np.float64)
        return used[int(np.argmin(colours.sum(axis=1)))]
    return frames.min()


def _store(
    ds: Dataset, frames: np.ndarray, ndim: int, photometric_in: str, photometric_out: str, syntax: UID
) -> UID:
    """Put the cleaned pixels back into ``ds``; return the transfer syntax to write with."""
    arr = frames if frames.shape[0] > 1 or ndim == frames.ndim else frames[0]
    if photometric_out != photometric_in:
        ds.PhotometricInterpretation = photometric_out
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        ds.PlanarConfiguration = 0  # decoded pixels are interleaved
    for tag in (0x7FE00001, 0x7FE00002):  # extended offset table: only for encapsulated data
        if tag in ds:
            del ds[tag]
    lossy = str(syntax) in _LOSSY_METHOD
    if syntax in _REENCODABLE and _reencode(ds, arr, syntax):
        return syntax
    if lossy:
        # Once lossy, always flagged lossy (PS3.3 C.7.6.1.1.5), even when stored uncompressed.
        ds.LossyImageCompression = "01"
        if "LossyImageCompressionMethod" not in ds and str(syntax) in _LOSSY_METHOD:
            ds.LossyImageCompressionMethod = _LOSSY_METHOD[str(syntax)]
    bits = int(ds.BitsAllocated)
    if bits == 1:
        from pydicom.pixels import pack_bits

        data = pack_bits(arr.astype(np.uint8))
    else:
        kind = "i" if int(ds.get("PixelRepresentation", 0) or 0) == 1 else "u"
        data = arr.astype(np.dtype(f"<{kind}{bits // 8}"), copy=False).tobytes()
    if len(data) % 2:
        data += b"\x00"
    ds.PixelData = data
    ds["PixelData"].VR = "OW" if bits > 8 else "OB"
    ds["PixelData"].is_undefined_length = False
    if syntax == ImplicitVRLittleEndian:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian  # decompressed, deflated or big endian: plain explicit little endian


def _reencode(ds: Dataset, arr: np.ndarray, syntax: UID) -> bool:
    """Re-encode losslessly in the original syntax if pydicom has an encoder; verify it decodes back."""
    try:
        from pydicom.pixels import get_encoder

        if not get_encoder(syntax).is_available:
            return False
        trial = Dataset()
        trial.file_meta = FileMetaDataset()
        trial.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        for keyword in ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration",
                        "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "NumberOfFrames"):
            if keyword in ds:
                setattr(trial, keyword, ds.data_element(keyword).value)
        trial.compress(syntax, arr, generate_instance_uid=False)
        if not np.array_equal(trial.pixel_array, arr):
            return False
    except Exception:  # noqa: BLE001 - no encoder, or it failed: store uncompressed instead
        return False
    ds.PixelData = trial.PixelData
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if trial.get("PhotometricInterpretation") != ds.get("PhotometricInterpretation"):
        ds.PhotometricInterpretation = trial.PhotometricInterpretation
    return True
