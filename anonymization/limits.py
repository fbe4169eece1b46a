"""Decompression bombs: sizes a file declares, checked before anything is decoded or inflated.

A few hundred bytes of RLE can declare a 16384 x 16384 image and a few kilobytes of
deflate can inflate to gigabytes; pydicom allocates what the file declares. So the
worker reads the header first and quarantines a file whose declared pixel data or
inflated data set exceeds the site policy's ``[limits]``, keeping a run's peak
memory bounded whatever the input. Reasons are fixed strings (no value from the file).
"""

from __future__ import annotations

import io
import zlib

from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

from anonymization.screening import PIXEL_TAGS, peek_int

_INFLATE_CHUNK = 1 << 20  # inflated bytes held at a time while a deflated file is measured
# PS3.5 G.3.1: a PackBits replicate run turns 2 bytes into at most 128, so RLE data can
# never decode to more than 64 times its own size.
RLE_MAX_RATIO = 64

REASON_PIXEL_LIMIT = (
    "pixel data declares more bytes (rows x columns x frames x samples x bytes per sample) than the "
    "site policy allows (limits.max_pixel_bytes): not decoded; raise the limit if such images are expected"
)
REASON_RLE_SHORT = (
    "RLE pixel data is too short to decode to the size its header declares "
    "(RLE expands at most 64 times): a decompression bomb or a damaged file, not decoded"
)
REASON_INFLATE_LIMIT = (
    "deflated data set inflates to more bytes than the site policy allows (limits.max_inflated_bytes): "
    "not inflated further; raise the limit if such files are expected"
)


def declared_pixel_bytes(ds: Dataset) -> int | None:
    """Bytes the decoded pixel data would take, from the header alone; None without pixel data."""
    if not any(tag in ds for tag in PIXEL_TAGS):
        return None
    rows, cols = peek_int(ds, "Rows") or 0, peek_int(ds, "Columns") or 0
    bits = peek_int(ds, "BitsAllocated") or 8
    samples = max(peek_int(ds, "SamplesPerPixel") or 1, 1)
    frames = max(peek_int(ds, "NumberOfFrames") or 1, 1)
    pixels = max(rows, 0) * max(cols, 0) * samples * frames
    return (pixels * max(bits, 1) + 7) // 8


def pixel_refusal(ds: Dataset, max_pixel_bytes: int) -> str | None:
    """Reason to quarantine a file whose pixel data declares more than ``max_pixel_bytes``,
    or RLE data too short to ever decode to what it declares (whatever the limit)."""
    declared = declared_pixel_bytes(ds)
    if declared is None:
        return None
    if declared > max_pixel_bytes:
        return REASON_PIXEL_LIMIT
    syntax = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "") or "")
    raw = ds.get_item(0x7FE00010)
    encoded = getattr(raw, "value", None)
    if syntax == RLELossless and isinstance(encoded, (bytes, bytearray)) and declared > RLE_MAX_RATIO * len(encoded):
        return REASON_RLE_SHORT
    return None


def inflated_refusal(data: bytes, max_inflated_bytes: int) -> str | None:
    """Reason to quarantine a deflated-syntax file that inflates past ``max_inflated_bytes``.

    Inflates with a bounded ``zlib.decompressobj`` (``max_length``), a chunk at a time,
    discarding the output: only its size is kept. Files of other transfer syntaxes,
    and files whose meta or stream cannot be read, are left to the reader to judge.
    """
    fp = io.BytesIO(data)
    try:
        read_preamble(fp, True)
        meta = _read_file_meta_info(fp)
    except Exception:  # noqa: BLE001 - not ours to judge: the reader quarantines it
        return None
    if str(meta.get("TransferSyntaxUID", "") or "").strip("\x00 ") != DeflatedExplicitVRLittleEndian:
        return None
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending = memoryview(data)[fp.tell():]
    total = 0
    try:
        while True:
            out = inflater.decompress(pending, _INFLATE_CHUNK)
            total += len(out)
            if total > max_inflated_bytes:
                return REASON_INFLATE_LIMIT
            pending = inflater.unconsumed_tail
            if inflater.eof or (not out and not pending):
                return None
    except zlib.error:
        return None  # a corrupt stream: pydicom fails on it and the file is quarantined
