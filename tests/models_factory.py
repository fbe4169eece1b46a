"""Builders of tiny de-identified stores for the ``models`` tests.

Writes real DICOM CT files with pydicom (16-bit MONOCHROME2, rescale slope and
intercept, PatientIdentityRemoved=YES) plus ``manifest.csv``, in the format the
anonymization package produces. Label 1 images carry a bright soft-tissue blob
at a random place, so a small CNN can learn the task in a few epochs.
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from models.dataset import MANIFEST_COLUMNS, MANIFEST_NAME
from models.study import Study

HU_INTERCEPT = -1024.0


def ct_slice(rng: np.random.Generator, size: int, positive: bool, blob_hu: float = 180.0) -> np.ndarray:
    """A CT-like slice in HU: air, a soft-tissue disc with noise, and for positives a bright blob."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    c = size / 2
    body = (yy - c) ** 2 + (xx - c) ** 2 < (0.42 * size) ** 2
    hu = np.where(body, 40.0, -1000.0).astype(np.float32)
    hu += rng.normal(0.0, 25.0, hu.shape).astype(np.float32)
    if positive:
        r = rng.uniform(0.06, 0.1) * size
        cy, cx = rng.uniform(0.3 * size, 0.7 * size, 2)
        hu += blob_hu * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)).astype(np.float32)
    return hu


def write_ct(path: Path, hu: np.ndarray, *, identity_removed: str | None = "YES", slope: float = 1.0) -> None:
    """Write ``hu`` as a 16-bit unsigned CT slice with RescaleSlope/RescaleIntercept."""
    stored = np.clip(np.round((hu - HU_INTERCEPT) / slope), 0, 65535).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "pseudo"
    if identity_removed is not None:
        ds.PatientIdentityRemoved = identity_removed
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = HU_INTERCEPT
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@dataclass
class Store:
    """A written store and the manifest rows that describe it."""

    root: Path
    rows: list[dict[str, str]] = field(default_factory=list)

    def write_manifest(self) -> None:
        """(Re)write ``manifest.csv`` from ``rows``, e.g. after a test tampered with them."""
        with (self.root / MANIFEST_NAME).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(MANIFEST_COLUMNS))
            writer.writeheader()
            writer.writerows(self.rows)


def signal_logits(study: Study, n: int, seed: int, shift: tuple[float, float, float] = (1.2, 1.5, 1.2),
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Logits with some signal about random targets of ``study``'s task: noise N(0, 1.5) plus ``shift``
    (binary, multiclass, multilabel) where the target is present."""
    rng = np.random.default_rng(seed)
    k = len(study.classes)
    if study.task == "binary":
        y = rng.integers(0, 2, n)
        return rng.normal(0, 1.5, n) + shift[0] * y, y
    if study.task == "multiclass":
        y = rng.integers(0, k, n)
        logits = rng.normal(0, 1.5, (n, k))
        logits[np.arange(n), y] += shift[1]
        return logits, y
    y = rng.integers(0, 2, (n, k))
    return rng.normal(0, 1.5, (n, k)) + shift[2] * y, y


def make_store(
    root: Path,
    *,
    n_patients: int = 12,
    images_per_patient: int = 3,
    size: int = 128,
    seed: int = 0,
    prevalence: float = 0.5,
    unlabelled_every: int = 0,
    blob_hu: float = 180.0,
) -> Store:
    """Write a store of ``n_patients * images_per_patient`` slices under ``root``.

    With ``unlabelled_every = k > 0`` every k-th row gets an empty label.
    """
    rng = np.random.default_rng(seed)
    store = Store(root=root)
    k = 0
    for p in range(n_patients):
        patient = f"pt-{seed:02d}-{p:04d}"
        for i in range(images_per_patient):
            positive = bool(rng.random() < prevalence)
            rel = f"{patient}/img{i:03d}.dcm"
            write_ct(root / rel, ct_slice(rng, size, positive, blob_hu))
            k += 1
            label = "" if unlabelled_every and k % unlabelled_every == 0 else str(int(positive))
            store.rows.append(
                {
                    "patient": patient,
                    "study_uid": generate_uid(),
                    "series_uid": generate_uid(),
                    "sop_uid": generate_uid(),
                    "accession": f"acc-{k:05d}",
                    "path": rel,
                    "label": label,
                }
            )
    store.write_manifest()
    return store


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore the previous setting.

    The test models are tiny; on a shared 2-core box two spinning intra-op
    threads stall each other for hundreds of ms per step, one thread does not.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
