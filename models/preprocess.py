"""How one de-identified DICOM object becomes the network's input, per modality.

Pixel values are interpreted with pydicom's own LUT functions (modality LUT, VOI LUT
or window, colour palette, colour space) so that every site reads a file the way a
viewer does, whatever its transfer syntax; the resize gives MONAI's Resize numbers (area
interpolation when shrinking: anti-aliased). The result of every example is a float32 array
``(study.in_channels, S, S)``. A file the study cannot use is never an exception for
the caller: :func:`preprocess_file` returns the reason (no header value in it).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space, pixel_array

from models.study import COLOUR, RADIOGRAPHY, Study

#: Radiograph and MR "percentile" defaults: robust to a few saturated or dead pixels.
DEFAULT_PERCENTILES = (0.5, 99.5)
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
#: Photometric interpretations a colour study reads (greyscale ones are replicated to RGB).
COLOUR_PHOTOMETRIC = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR") + MONOCHROME
#: YCbCr that pydicom's decoders hand back as such (raw); converted with convert_color_space.
_YBR = ("YBR_FULL", "YBR_FULL_422")
#: Secondary Capture Image Storage SOP classes (their Modality is often "OT"): usable by an SC study.
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
#: Largest object a site decodes (frames x rows x columns x samples); beyond it the file is refused.
MAX_PIXELS_PER_FRAME = 16384 * 16384
#: Files up to this size are read whole and parsed from memory (read_dicom_bytes).
IN_MEMORY_BYTES = 64 << 20
#: Attributes that decide how a frame's stored values become intensities (top level, then functional groups).
_PIXEL_KEYWORDS = (
    "PhotometricInterpretation", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
)


class Unusable(Exception):
    """This object cannot become an example of the study; ``reason`` says why, with no header value."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Source:
    """Geometry of a DICOM object, for reports (no identifiers)."""

    rows: int
    columns: int
    frames: int
    photometric: str

    @property
    def size(self) -> str:
        return f"{self.rows}x{self.columns}" + (f"x{self.frames}f" if self.frames > 1 else "")


@dataclass(frozen=True)
class Preprocessed:
    """The examples one object yields (``frames[i]`` produced ``arrays[i]``), or the reason it yields none."""

    frames: tuple[int, ...] = ()
    arrays: tuple[np.ndarray, ...] = ()
    source: Source | None = None
    reason: str | None = None

    @property
    def usable(self) -> bool:
        return self.reason is None and bool(self.arrays)


def output_shape(study: Study) -> tuple[int, int, int]:
    """``(channels, S, S)`` of every example of ``study``."""
    return (study.in_channels, study.image_size, study.image_size)


def chosen_frames(n_frames: int, frames: str | Sequence[int]) -> list[int]:
    """The 0-based frames of an ``n_frames`` object that become examples; Unusable if out of range."""
    if frames == "first":
        return [0]
    if frames == "middle":
        return [n_frames // 2]
    if frames == "all":
        return list(range(n_frames))
    wanted = sorted(set(int(i) for i in frames))
    missing = [i for i in wanted if i >= n_frames]
    if missing:
        raise Unusable(f"frame(s) {', '.join(map(str, missing))} out of range: the object has {n_frames} frame(s)")
    return wanted


def modality_matches(ds: Dataset, study: Study) -> bool:
    """True if ``ds`` is an image of the study's modality (an SC study also takes Secondary Capture objects)."""
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality == study.modality:
        return True
    sop_class = str(ds.get("SOPClassUID", "") or "")
    return study.modality == "SC" and sop_class.startswith(SECONDARY_CAPTURE_PREFIX)


def describe(ds: Dataset) -> Source:
    """The object's geometry; Unusable when it has no pixel data or nonsensical dimensions."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise Unusable("no pixel data")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise Unusable("rows, columns, frames or samples per pixel missing or not a number") from None
    if rows < 1 or columns < 1 or frames < 1 or samples not in (1, 3):
        raise Unusable(f"impossible geometry ({rows}x{columns}, {frames} frame(s), {samples} sample(s) per pixel)")
    if rows * columns * samples > MAX_PIXELS_PER_FRAME:
        raise Unusable(f"frame of {rows}x{columns} pixels is larger than medfed decodes")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    return Source(rows, columns, frames, photometric)


def _frame_dataset(ds: Dataset, index: int) -> Dataset:
    """The attributes that interpret frame ``index``: top level, then shared, then per-frame functional groups.

    Enhanced (multi-frame) objects keep rescale and window in functional groups, where
    pydicom's LUT functions do not look; copying them up lets those functions apply them.
    """
    if "SharedFunctionalGroupsSequence" not in ds and "PerFrameFunctionalGroupsSequence" not in ds:
        return ds  # nothing to copy up: the LUT functions read the same attributes from the object itself
    out = Dataset()
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            setattr(out, keyword, ds[keyword].value)
    groups = []
    for seq_name, pick in (("SharedFunctionalGroupsSequence", 0), ("PerFrameFunctionalGroupsSequence", index)):
        seq = ds.get(seq_name)
        if seq is not None and len(seq) > pick:
            groups.append(seq[pick])
    for group in groups:
        for macro in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            items = group.get(macro)
            if items:
                for elem in items[0]:
                    if elem.keyword in _PIXEL_KEYWORDS:
                        setattr(out, elem.keyword, elem.value)
    return out


def _decode(ds: Dataset, index: int, n_frames: int, raw: bool = False) -> np.ndarray:
    """One frame's stored values (rows, columns[, samples]); Unusable if the pixel data do not decode."""
    try:
        arr = pixel_array(ds, index=index if n_frames > 1 else None, raw=raw)
    except Exception as exc:  # noqa: BLE001 - decoders raise many types; the reason names only the type
        raise Unusable(f"pixel data do not decode ({type(exc).__name__}; transfer syntax "
                       f"{_syntax_name(ds)})") from None
    if n_frames > 1 and arr.ndim == (4 if int(ds.get("SamplesPerPixel", 1) or 1) == 3 else 3):
        arr = arr[0]
    return arr


def _syntax_name(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return getattr(uid, "name", None) or str(uid or "unknown")


def _to_unit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map of [lo, hi] onto [0, 1], clipped: MONAI's ScaleIntensityRange, written out in numpy.

    Our own three lines because this per-pixel map runs on every full-size frame, and MONAI's goes
    through torch's thread pool, which `medfed predict` shares with the network (10x slower there).
    """
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        raise Unusable("flat image: no intensity range to scale")
    out = np.asarray(values, dtype=np.float32) - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def _percentile_unit(values: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    lo, hi = np.percentile(values, percentiles)
    if hi <= lo:  # mostly one value: fall back to the full range before calling the image flat
        lo, hi = float(values.min()), float(values.max())
    return _to_unit(values, float(lo), float(hi))


def _has_voi(fds: Dataset) -> bool:
    return bool(fds.get("VOILUTSequence")) or ("WindowCenter" in fds and "WindowWidth" in fds)


def _file_voi_unit(values: np.ndarray, fds: Dataset) -> np.ndarray:
    """The file's VOI LUT or window (pydicom's apply_voi_lut), mapped onto [0, 1] by its output range.

    A VOI LUT Sequence maps integer stored values (pydicom warns, and mis-maps, on floats), so it is
    applied to the rounded values and its output range is that of the whole LUT; a window maps floats.
    """
    try:
        lut = fds.get("VOILUTSequence")
        if lut:
            entries, first = int(lut[0].LUTDescriptor[0]) or 65536, int(lut[0].LUTDescriptor[1])
            out = np.asarray(apply_voi_lut(np.rint(values).astype(np.int64), fds, index=0), dtype=np.float64)
            table = np.asarray(apply_voi_lut(np.arange(first, first + entries, dtype=np.int64), fds, index=0))
            lo, hi = float(table.min()), float(table.max())
        else:
            out = np.asarray(apply_voi_lut(values, fds, index=0), dtype=np.float64)
            ends = np.asarray(apply_voi_lut(np.array([-1e12, 1e12], dtype=np.float64), fds, index=0))
            lo, hi = float(ends.min()), float(ends.max())
    except Exception as exc:  # noqa: BLE001 - a malformed VOI module
        raise Unusable(f"the file's VOI LUT or window cannot be applied ({type(exc).__name__}); "
                       'use voi = "percentile"') from None
    return _to_unit(out, lo, hi)


def _greyscale(ds: Dataset, source: Source, study: Study) -> None:
    if source.photometric not in MONOCHROME:
        raise Unusable(f"photometric interpretation {source.photometric or 'missing'} is not greyscale, "
                       f"as a {study.modality} study needs")


def _ct(ds: Dataset, index: int, source: Source, study: Study) -> np.ndarray:
    fds = _frame_dataset(ds, index)
    hu = np.asarray(apply_modality_lut(_decode(ds, index, source.frames), fds), dtype=np.float32)
    return np.stack([_to_unit(hu, c - w / 2, c + w / 2) for c, w in study.windows])


def _radiograph(ds: Dataset, index: int, source: Source, study: Study) -> np.ndarray:
    fds = _frame_dataset(ds, index)
    values = np.asarray(apply_modality_lut(_decode(ds, index, source.frames), fds), dtype=np.float64)
    p = study.preprocessing
    if (p.voi or "file") == "file" and _has_voi(fds):
        unit = _file_voi_unit(values, fds)
    else:
        unit = _percentile_unit(values, p.percentiles or DEFAULT_PERCENTILES)
    if source.photometric == "MONOCHROME1":
        unit = 1.0 - unit  # bright = dense, as in MONOCHROME2, whatever the detector wrote
    return unit[None].astype(np.float32)


def _mr(ds: Dataset, index: int, source: Source, study: Study) -> np.ndarray:
    fds = _frame_dataset(ds, index)
    values = np.asarray(apply_modality_lut(_decode(ds, index, source.frames), fds), dtype=np.float64)
    p = study.preprocessing
    if (p.normalise or "zscore") == "percentile":
        return _percentile_unit(values, p.percentiles or DEFAULT_PERCENTILES)[None]
    std = float(values.std())
    if not std > 0.0:
        raise Unusable("flat image: no intensity range to scale")
    return ((values - values.mean()) / std)[None].astype(np.float32)


def _colour(ds: Dataset, index: int, source: Source, study: Study) -> np.ndarray:
    pi = source.photometric
    if pi not in COLOUR_PHOTOMETRIC:
        raise Unusable(f"photometric interpretation {pi or 'missing'} is neither colour nor greyscale")
    if pi in _YBR:
        arr = _decode(ds, index, source.frames, raw=True)
        try:
            arr = convert_color_space(arr, pi, "RGB")
        except Exception as exc:  # noqa: BLE001
            raise Unusable(f"{pi} pixels cannot be converted to RGB ({type(exc).__name__})") from None
    else:
        arr = _decode(ds, index, source.frames)
    if pi == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as exc:  # noqa: BLE001
            raise Unusable(f"the colour palette cannot be applied ({type(exc).__name__})") from None
        top = float(np.iinfo(arr.dtype).max) if np.issubdtype(arr.dtype, np.integer) else float(arr.max())
    else:
        bits = int(ds.get("BitsStored", 8) or 8)
        top = float(2**bits - 1)
    if arr.ndim == 2:  # greyscale object of a colour modality
        unit = _to_unit(np.asarray(arr, dtype=np.float64), 0.0, top)
        if pi == "MONOCHROME1":
            unit = 1.0 - unit
        rgb = np.stack([unit] * 3)
    else:
        rgb = _to_unit(np.moveaxis(np.asarray(arr, dtype=np.float64), -1, 0), 0.0, top)
    if (study.preprocessing.colour or "rgb") == "grey":
        return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[None].astype(np.float32)
    return rgb.astype(np.float32)


def _block_mean(image: np.ndarray, k: int) -> np.ndarray:
    """Mean of each ``k x k`` block of ``(C, H, W)`` (512 -> 64: k = 8), as a strided sum of views."""
    c, h, w = image.shape
    blocks = image.reshape(c, h // k, k, w // k, k)
    out = blocks[:, :, 0, :, 0].copy()
    for i in range(k):
        for j in range(k):
            if i or j:
                out += blocks[:, :, i, :, j]
    out /= np.float32(k)
    out /= np.float32(k)
    return out


def _windows(n: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """First source index and length of each output's window, as torch's adaptive average pooling has them."""
    i = np.arange(out)
    start = (i * n) // out
    return start, -((-(i + 1) * n) // out) - start


def _area(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Area shrink of ``(C, H, W)`` to ``(C, out_h, out_w)``: each output is the mean of the pixels it covers.

    Bit for bit torch's ``interpolate(mode="area")`` (what MONAI's Resize calls): the same windows,
    summed in the same order (row by row, a window's missing cells adding an exact 0) and divided by
    the window's height, then width. numpy keeps it off the thread pool the network uses (a reader
    thread of `medfed predict` runs it beside the forward pass); an integral factor takes block means.
    """
    c, h, w = image.shape
    if h % out_h == 0 and w % out_w == 0 and h // out_h == w // out_w:
        return _block_mean(image, h // out_h)
    row_start, row_len = _windows(h, out_h)
    col_start, col_len = _windows(w, out_w)
    padded = np.zeros((c, h + 1, w + 1), dtype=np.float32)  # row h and column w: the 0 of a missing cell
    padded[:, :h, :w] = image
    out = np.zeros((c, out_h, out_w), dtype=np.float32)
    for dh in range(int(row_len.max())):
        rows = padded[:, np.where(dh < row_len, row_start + dh, h)]
        for dw in range(int(col_len.max())):
            out += rows[:, :, np.where(dw < col_len, col_start + dw, w)]
    out /= row_len.astype(np.float32)[:, None]
    out /= col_len.astype(np.float32)[None, :]
    return out


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Fit ``(C, H, W)`` into ``(C, size, size)``, keeping the aspect ratio, padding with the image's minimum.

    Shrinking averages source pixels (area interpolation: anti-aliased); enlarging interpolates
    bilinearly. The numbers are bit for bit those of MONAI's ``Resize(size, size_mode="longest")``
    that the first releases were trained with (tests/models/test_models_preprocess.py).
    """
    _c, h, w = image.shape
    image = np.asarray(image, dtype=np.float32)
    scale = size / max(h, w)
    out = (int(round(h * scale)), int(round(w * scale)))  # as MONAI's size_mode="longest"
    if out != (h, w):
        if max(h, w) >= size:
            image = _area(image, *out)
        else:
            image = F.interpolate(torch.from_numpy(np.ascontiguousarray(image))[None], size=out,
                                  mode="bilinear")[0].numpy()
    _c, h, w = image.shape
    if (h, w) != (size, size):
        top, left = (size - h) // 2, (size - w) // 2
        image = np.pad(image, ((0, 0), (top, size - h - top), (left, size - w - left)),
                       constant_values=float(image.min()))
    return np.ascontiguousarray(image, dtype=np.float32)


def preprocess(ds: Dataset, study: Study) -> Preprocessed:
    """Every example ``ds`` yields for ``study``: chosen frames, modality rules, resize, normalisation.

    Unit-range intensities become [-1, 1] (as the scattering head was trained on);
    MR z-scores stay z-scores. Raises :class:`Unusable` with the reason.
    """
    if not modality_matches(ds, study):
        found = str(ds.get("Modality", "") or "").strip() or "missing"
        raise Unusable(f"modality {found}, not the study's {study.modality}")
    source = describe(ds)
    frames = chosen_frames(source.frames, study.preprocessing.frames)
    if study.modality in COLOUR:
        reader = _colour
    else:
        _greyscale(ds, source, study)
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise Unusable("greyscale image with more than one sample per pixel")
        reader = {"CT": _ct, "MR": _mr}.get(study.modality, _radiograph if study.modality in RADIOGRAPHY else None)
        if reader is None:  # a modality the schema admits but no reader handles: say so, do not guess
            raise Unusable(f"no preprocessing for modality {study.modality}")
    zscore = study.modality == "MR" and (study.preprocessing.normalise or "zscore") == "zscore"
    arrays = []
    for index in frames:
        image = resize(reader(ds, index, source, study), study.image_size)
        if not zscore:
            image = image * 2.0 - 1.0  # [0, 1] -> [-1, 1]
        if not np.isfinite(image).all():
            raise Unusable("pixel values are not finite after preprocessing")
        arrays.append(image.astype(np.float32, copy=False))
    return Preprocessed(tuple(frames), tuple(arrays), source)


def read_dicom(path: Path) -> Dataset:
    """``pydicom.dcmread``, Unusable when the file is not readable DICOM."""
    return read_dicom_bytes(path)[0]


def read_dicom_bytes(path: Path) -> tuple[Dataset, bytes | None]:
    """The parsed file, and its bytes when it is small enough to be parsed from memory (else None).

    Parsing from memory spares pydicom a buffered-file call per element (a fifth of a CT slice's
    parse); a file over ``IN_MEMORY_BYTES`` is streamed, so a huge multi-frame object is not held twice.
    """
    try:
        path = Path(path)
        data = path.read_bytes() if path.stat().st_size <= IN_MEMORY_BYTES else None
        return pydicom.dcmread(io.BytesIO(data) if data is not None else path), data
    except FileNotFoundError:
        raise Unusable("file is missing") from None
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise Unusable(f"not readable DICOM ({type(exc).__name__})") from None


def preprocess_file(path: Path, study: Study) -> Preprocessed:
    """:func:`preprocess` of a file, never raising: an unusable file comes back with its reason."""
    try:
        return preprocess(read_dicom(Path(path)), study)
    except Unusable as err:
        return Preprocessed(reason=err.reason)
    except Exception as exc:  # noqa: BLE001 - hostile or odd files must not stop a whole store's scan
        return Preprocessed(reason=f"cannot be preprocessed ({type(exc).__name__})")
