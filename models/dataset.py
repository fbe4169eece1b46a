"""A PyTorch dataset over the site's de-identified DICOM store, read through its manifest.

Training must never see the raw PACS export (docs/design.md invariant 2), so this
dataset only opens files listed in ``DEID_DIR/manifest.csv``, refuses paths that
leave the store, and refuses any file not marked ``PatientIdentityRemoved=YES``.
Error messages name manifest rows and store-relative paths only, never header
values, so that no identifier can leak through them (docs/design.md invariant 4).
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import pydicom
import torch
from monai.transforms import Compose, NormalizeIntensity, Resize, ScaleIntensityRange
from monai.utils import convert_to_tensor
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS: tuple[str, ...] = (
    "patient",
    "study_uid",
    "series_uid",
    "sop_uid",
    "accession",
    "path",
    "label",
)
#: Soft-tissue CT window (HU); findings of interest are soft-tissue densities.
WINDOW_CENTER = 40.0
WINDOW_WIDTH = 400.0

Split = Literal["train", "test", "all"]


class DatasetError(Exception):
    """The de-identified store cannot be used for training; the message says why and what to do."""


def patient_fraction(patient: str) -> float:
    """Map a patient pseudonym to a stable number in [0, 1) via SHA-256.

    A hash, not an RNG, so that every run on every machine puts a patient in
    the same split and no random state needs to be stored or shared.
    """
    digest = hashlib.sha256(patient.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(patient: str, test_fraction: float) -> Literal["train", "test"]:
    """Return which split a patient belongs to; all images of a patient go together."""
    return "test" if patient_fraction(patient) < test_fraction else "train"


def assign_splits(patients: Iterable[str], test_fraction: float) -> dict[str, Literal["train", "test"]]:
    """Assign each patient a split by `split_of`, keeping both splits non-empty when there are two or more.

    Pseudonyms come from each site's own secret, so a small site can by chance
    hash all its patients to one side; it would then have nothing to evaluate
    (or to train on). The patient nearest the boundary moves over instead —
    still a pure function of the pseudonyms, so every run agrees.
    """
    unique = sorted(set(patients), key=patient_fraction)
    splits: dict[str, Literal["train", "test"]] = {p: split_of(p, test_fraction) for p in unique}
    if len(unique) >= 2:
        values = set(splits.values())
        if test_fraction > 0.0 and values == {"train"}:
            splits[unique[0]] = "test"
        elif test_fraction < 1.0 and values == {"test"}:
            splits[unique[-1]] = "train"
    return splits


def _safe_relative(deid_root: Path, rel: str, row: int) -> Path:
    """Resolve a manifest path, refusing anything that could point outside the store."""
    if not rel:
        raise DatasetError(f"{MANIFEST_NAME} row {row}: empty path. Re-run `medfed deid run` to rebuild the store.")
    if "\\" in rel or ":" in rel:
        raise DatasetError(
            f"{MANIFEST_NAME} row {row}: path {rel!r} is not a relative POSIX path inside the "
            "de-identified store; training reads only the store. Re-run `medfed deid run`."
        )
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts:
        raise DatasetError(
            f"{MANIFEST_NAME} row {row}: path {rel!r} escapes the de-identified store "
            "(absolute or '..'); training reads only the store. Re-run `medfed deid run`."
        )
    full = (deid_root / Path(*pure.parts)).resolve()
    if not full.is_relative_to(deid_root):
        raise DatasetError(
            f"{MANIFEST_NAME} row {row}: path {rel!r} resolves outside the de-identified store "
            "(symbolic link?); training reads only the store."
        )
    return full


def _read_manifest(deid_root: Path) -> list[dict[str, str]]:
    """Read and check the manifest's header; return its rows."""
    manifest = deid_root / MANIFEST_NAME
    if not deid_root.is_dir():
        raise DatasetError(f"de-identified store {deid_root} does not exist. Run `medfed deid run` first.")
    if not manifest.is_file():
        raise DatasetError(
            f"{deid_root} has no {MANIFEST_NAME}, so it is not a de-identified store "
            "(training never reads raw DICOM). Run `medfed deid run` first and point training at its output."
        )
    with manifest.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in MANIFEST_COLUMNS if c not in header]
        if missing:
            raise DatasetError(
                f"{manifest} lacks column(s) {', '.join(missing)} (expected header "
                f"{','.join(MANIFEST_COLUMNS)}). Re-run `medfed deid run` with this version of medfed."
            )
        return list(reader)


def _load_hu(path: Path, rel: str, row: int) -> np.ndarray:
    """Read one de-identified DICOM file and return its pixels in Hounsfield units."""
    try:
        ds = pydicom.dcmread(path)
    except FileNotFoundError:
        raise DatasetError(
            f"{MANIFEST_NAME} row {row}: file {rel!r} is missing from the store. Re-run `medfed deid run`."
        ) from None
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise DatasetError(
            f"{MANIFEST_NAME} row {row}: file {rel!r} is not readable DICOM ({type(exc).__name__}). "
            "Re-run `medfed deid run`."
        ) from None
    if str(ds.get("PatientIdentityRemoved", "")).strip().upper() != "YES":
        raise DatasetError(
            f"{MANIFEST_NAME} row {row}: file {rel!r} is not marked PatientIdentityRemoved=YES, so it was "
            "not produced by de-identification; refusing to train on it. Re-run `medfed deid run`."
        )
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for absent/undecodable pixel data
        raise DatasetError(
            f"{MANIFEST_NAME} row {row}: pixel data of {rel!r} cannot be decoded ({type(exc).__name__}). "
            "Check that the pylibjpeg decoders are installed, or re-run `medfed deid run`."
        ) from None
    if pixels.ndim != 2:
        raise DatasetError(
            f"{MANIFEST_NAME} row {row}: {rel!r} has pixel shape {pixels.shape}; only single-frame "
            "greyscale CT slices are supported."
        )
    # Modality LUT = RescaleSlope/RescaleIntercept (or a LUT) -> Hounsfield units.
    return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)


class ManifestDataset(Dataset):
    """Labelled CT slices of one split of the de-identified store, preloaded as tensors.

    Datasets are small (hundreds of slices), so everything is decoded and
    preprocessed once here; training epochs then only index memory.
    """

    def __init__(
        self,
        deid_dir: Path,
        split: Split = "train",
        image_size: int = 64,
        test_fraction: float = 0.25,
    ) -> None:
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all' (got {split!r})")
        if not 0.0 <= test_fraction <= 1.0:
            raise ValueError(f"test_fraction must lie in [0, 1] (got {test_fraction})")
        self.deid_dir = Path(deid_dir)
        self.split: Split = split
        self.image_size = image_size
        self.test_fraction = test_fraction

        root = self.deid_dir.resolve()
        rows = _read_manifest(root)
        labelled: list[tuple[int, dict[str, str]]] = []
        for row_no, row in enumerate(rows, start=2):  # row 1 is the header
            label = (row.get("label") or "").strip()
            if label == "":
                continue  # unlabelled: usable for nothing here
            if label not in ("0", "1"):
                raise DatasetError(
                    f"{MANIFEST_NAME} row {row_no}: label {label!r} is not 0, 1 or empty. Fix the label table "
                    "and re-run `medfed deid run`."
                )
            if not (row.get("patient") or "").strip():
                raise DatasetError(f"{MANIFEST_NAME} row {row_no}: empty patient pseudonym. Re-run `medfed deid run`.")
            labelled.append((row_no, row))
        if not labelled:
            raise DatasetError(
                f"{root / MANIFEST_NAME} has {len(rows)} row(s) but none has a label (0/1). "
                "Provide the label table to `medfed deid run` so that the manifest carries labels."
            )

        splits = assign_splits((row["patient"].strip() for _, row in labelled), test_fraction)
        selected = [
            (row_no, row) for row_no, row in labelled if split == "all" or splits[row["patient"].strip()] == split
        ]
        if not selected:
            n_patients = len({row["patient"].strip() for _, row in labelled})
            raise DatasetError(
                f"split {split!r} is empty: {len(labelled)} labelled image(s) from {n_patients} patient(s), "
                f"test_fraction={test_fraction}. Add patients or change test_fraction."
            )

        self._transform = Compose(
            [
                ScaleIntensityRange(
                    a_min=WINDOW_CENTER - WINDOW_WIDTH / 2,
                    a_max=WINDOW_CENTER + WINDOW_WIDTH / 2,
                    b_min=0.0,
                    b_max=1.0,
                    clip=True,
                ),
                # "area" averages source pixels, i.e. anti-aliased downsampling.
                Resize(spatial_size=(image_size, image_size), mode="area"),
                NormalizeIntensity(subtrahend=0.5, divisor=0.5),  # [0, 1] -> [-1, 1]
            ]
        )
        images: list[torch.Tensor] = []
        self.patients: list[str] = []
        self.paths: list[str] = []
        labels: list[float] = []
        for row_no, row in selected:
            rel = row["path"].strip()
            hu = _load_hu(_safe_relative(root, rel, row_no), rel, row_no)
            # Plain tensor (no MONAI metadata) so batching and Opacus see ordinary tensors.
            image = convert_to_tensor(self._transform(hu[None]), dtype=torch.float32, track_meta=False)
            images.append(image)
            self.patients.append(row["patient"].strip())
            self.paths.append(rel)
            labels.append(float(row["label"].strip()))

        self.images = torch.stack(images).contiguous()
        self.labels: np.ndarray = np.asarray(labels, dtype=np.float32)
        self._label_tensor = torch.from_numpy(self.labels)
        logger.info(
            "loaded %d %s image(s) from %d patient(s) (%d positive) out of %d manifest row(s)",
            len(self.labels),
            split,
            len(set(self.patients)),
            int(self.labels.sum()),
            len(rows),
        )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self._label_tensor[index]
