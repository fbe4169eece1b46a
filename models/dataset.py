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
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import pydicom
import torch
from monai.transforms import Compose, RandFlip, RandRotate, RandScaleIntensity
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset, get_worker_info

from models.cache import CacheError, Entry, ImageCache, ShardReader, fingerprint
from models.preprocess import Preprocessed, Unusable, preprocess, read_dicom
from models.study import DEFAULT_STUDY, Study

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


def safe_relative(deid_root: Path, rel: str, row: int) -> Path:
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


def _target_tensor(study: Study, target: int | tuple[float, ...]) -> torch.Tensor:
    """The loss's target: float 0/1 scalar (binary), int64 scalar (multiclass), float vector (multilabel)."""
    if study.task == "binary":
        return torch.tensor(float(target), dtype=torch.float32)  # type: ignore[arg-type]
    if study.task == "multiclass":
        return torch.tensor(int(target), dtype=torch.int64)  # type: ignore[arg-type]
    return torch.tensor(target, dtype=torch.float32)


@dataclass(frozen=True)
class LabelledRow:
    """A manifest row with a valid label for the study (``row`` is its line number in the manifest)."""

    row: int
    path: str
    patient: str
    label: str
    target: int | tuple[float, ...]


@dataclass
class StoreRows:
    """The manifest of a store, sorted out for one study: labelled rows, unlabelled count, bad labels."""

    total: int
    labelled: list[LabelledRow]
    unlabelled: int
    bad: list[tuple[int, str, str]]  # (row, path, reason): labels the study cannot read, empty pseudonyms


def read_store_rows(deid_root: Path, study: Study) -> StoreRows:
    """Read the manifest and each row's target under ``study`` (bad rows collected, not raised)."""
    rows = _read_manifest(deid_root)
    labelled: list[LabelledRow] = []
    bad: list[tuple[int, str, str]] = []
    unlabelled = 0
    for row_no, row in enumerate(rows, start=2):  # row 1 is the header
        label = (row.get("label") or "").strip()
        rel = (row.get("path") or "").strip()
        if label == "":
            unlabelled += 1  # usable for nothing here
            continue
        try:
            target = study.target(label)
        except ValueError as err:
            bad.append((row_no, rel, f"label {label!r}: {err}"))
            continue
        patient = (row.get("patient") or "").strip()
        if not patient:
            bad.append((row_no, rel, "empty patient pseudonym"))
            continue
        labelled.append(LabelledRow(row_no, rel, patient, label, target))
    return StoreRows(len(rows), labelled, unlabelled, bad)


class StoreProblem(Exception):
    """A file of the store that must stop training on the store (not de-identified, missing, not DICOM)."""


def read_deidentified(path: Path, rel: str, row: int) -> pydicom.Dataset:
    """Read one store file, refusing any not marked ``PatientIdentityRemoved=YES`` (a StoreProblem)."""
    try:
        ds = read_dicom(path)
    except Unusable as err:
        if err.reason == "file is missing":
            raise StoreProblem(f"{MANIFEST_NAME} row {row}: file {rel!r} is missing from the store. "
                               "Re-run `medfed deid run`.") from None
        raise StoreProblem(f"{MANIFEST_NAME} row {row}: file {rel!r} is {err.reason}. "
                           "Re-run `medfed deid run`.") from None
    if str(ds.get("PatientIdentityRemoved", "")).strip().upper() != "YES":
        raise StoreProblem(
            f"{MANIFEST_NAME} row {row}: file {rel!r} is not marked PatientIdentityRemoved=YES, so it was "
            "not produced by de-identification; refusing to train on it. Re-run `medfed deid run`."
        )
    return ds


def store_items(root: Path, rows: Sequence[LabelledRow]) -> list[tuple[str, str, Path]]:
    """``(path, fingerprint, full path)`` of each row for :meth:`ImageCache.ensure`; path checks raise."""
    items = []
    for r in rows:
        full = safe_relative(root, r.path, r.row)
        try:
            fp = fingerprint(full)
        except FileNotFoundError:
            raise DatasetError(f"{MANIFEST_NAME} row {r.row}: file {r.path!r} is missing from the store. "
                               "Re-run `medfed deid run`.") from None
        except OSError as err:
            raise DatasetError(f"{MANIFEST_NAME} row {r.row}: file {r.path!r} cannot be read ({err.strerror}).") \
                from None
        items.append((r.path, fp, full))
    return items


def producer(study: Study, rows: Sequence[LabelledRow]) -> Callable[[str, Path], Preprocessed]:
    """What the cache calls on a file it lacks: read (de-identified only), then :func:`preprocess`."""
    row_of = {r.path: r.row for r in rows}

    def produce(rel: str, path: Path) -> Preprocessed:
        ds = read_deidentified(path, rel, row_of.get(rel, 0))
        try:
            return preprocess(ds, study)
        except Unusable as err:
            return Preprocessed(reason=err.reason)
        except Exception as exc:  # noqa: BLE001 - one odd file must not stop the store's build
            return Preprocessed(reason=f"cannot be preprocessed ({type(exc).__name__})")

    return produce


def augmentation_transform(study: Study) -> Compose | None:
    """MONAI random flip / rotation / intensity scaling as the study asks; None when it asks for none."""
    aug = study.augmentation
    steps = []
    if aug.flip:
        steps.append(RandFlip(prob=0.5, spatial_axis=1))  # left-right
    if aug.rotate_degrees > 0:
        steps.append(RandRotate(range_x=math.radians(aug.rotate_degrees), prob=1.0, keep_size=True,
                                padding_mode="border"))
    if aug.intensity_jitter > 0:
        steps.append(RandScaleIntensity(factors=aug.intensity_jitter, prob=1.0))
    return Compose(steps) if steps else None


def _check_split(split: str, study: Study, test_fraction: float | None) -> float:
    """The test fraction to use (the study's unless given); refuse an unknown split or a fraction outside [0, 1]."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all' (got {split!r})")
    test_fraction = study.test_fraction if test_fraction is None else test_fraction
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1] (got {test_fraction})")
    return test_fraction


def _labelled_store(root: Path, study: Study) -> StoreRows:
    """The store's rows, refused when any row is bad (training never skips a label problem) or none is labelled."""
    store = read_store_rows(root, study)
    if store.bad:
        row, _rel, reason = store.bad[0]
        raise DatasetError(f"{MANIFEST_NAME} row {row}: {reason}. Fix the label table and re-run "
                           "`medfed deid run` (`medfed data check` lists every problem).")
    if not store.labelled:
        raise DatasetError(
            f"{root / MANIFEST_NAME} has {store.total} row(s) but none has a label. "
            "Provide the label table to `medfed deid run` so that the manifest carries labels."
        )
    return store


def _select_split(store: StoreRows, split: str, test_fraction: float) -> list[LabelledRow]:
    """The labelled rows of ``split`` (patients are split, never images); an empty split is refused."""
    splits = assign_splits((r.patient for r in store.labelled), test_fraction)
    selected = [r for r in store.labelled if split == "all" or splits[r.patient] == split]
    if not selected:
        n_patients = len({r.patient for r in store.labelled})
        raise DatasetError(
            f"split {split!r} is empty: {len(store.labelled)} labelled image(s) from {n_patients} patient(s), "
            f"test_fraction={test_fraction}. Add patients or change test_fraction."
        )
    return selected


def _cached_entries(cache: ImageCache, root: Path, study: Study, selected: list[LabelledRow]) -> dict[str, Entry]:
    """Each selected image's cache entry, preprocessing those not cached yet; a store or cache problem refuses."""
    items = store_items(root, selected)
    try:
        return cache.ensure(items, producer(study, selected))
    except StoreProblem as err:
        raise DatasetError(str(err)) from None
    except CacheError as err:
        raise DatasetError(str(err)) from None


class StudyDataset(Dataset):
    """One split of a de-identified store, preprocessed for a study; items ``(image (C, S, S), target)``.

    Images come from the site's image cache (built on first use, see models.cache), so
    memory holds only the index, whatever the store's size. Only the train split is
    augmented, with a random state derived from ``seed`` and the DataLoader worker's
    seed, so workers differ and a seeded run repeats.
    """

    def __init__(
        self,
        deid_dir: Path,
        study: Study,
        split: Split = "train",
        cache_dir: Path | None = None,
        *,
        test_fraction: float | None = None,
        seed: int | None = None,
    ) -> None:
        test_fraction = _check_split(split, study, test_fraction)
        self.deid_dir = Path(deid_dir)
        self.study = study
        self.split: Split = split
        self.image_size = study.image_size
        self.test_fraction = test_fraction
        self.seed = seed

        root = self.deid_dir.resolve()
        store = _labelled_store(root, study)
        selected = _select_split(store, split, test_fraction)
        self.cache = ImageCache.for_store(root, study, cache_dir)
        self._index(selected, _cached_entries(self.cache, root, study, selected))
        self._reader: ShardReader = self.cache.reader()
        self._augment = augmentation_transform(study) if split == "train" else None
        self._rng_key: object = _UNSEEDED
        self._log_loaded(store.total)

    def _index(self, selected: list[LabelledRow], entries: dict[str, Entry]) -> None:
        """Index every usable example (one per frame) by shard and offset, with its patient, path and target.

        Unusable images are kept in ``refused``; a split with no usable image at all is refused.
        """
        self.patients: list[str] = []
        self.paths: list[str] = []
        self.frames: list[int] = []
        self.refused: list[tuple[str, str]] = []
        shard_no: dict[str, int] = {}
        locations: list[tuple[int, int]] = []
        targets: list[int | tuple[float, ...]] = []
        for r in selected:
            entry = entries[r.path]
            if not entry.usable:
                self.refused.append((r.path, entry.reason or "no example"))
                continue
            for j, frame in enumerate(entry.frames):
                locations.append((shard_no.setdefault(entry.shard, len(shard_no)), entry.offset + j))  # type: ignore[arg-type]
                self.patients.append(r.patient)
                self.paths.append(r.path)
                self.frames.append(frame)
                targets.append(r.target)
        if not locations:
            reasons = Counter(reason for _p, reason in self.refused).most_common(3)
            raise DatasetError(
                f"split {self.split!r} has no usable image for the {self.study.modality} study: "
                f"{len(self.refused)} refused ("
                + "; ".join(f"{n} x {reason}" for reason, n in reasons)
                + "). Run `medfed data check DEID_DIR --study FILE` for the list."
            )
        self._shards = sorted(shard_no, key=shard_no.__getitem__)
        self._locations = np.asarray(locations, dtype=np.int64)
        dtype = {"binary": np.float32, "multiclass": np.int64, "multilabel": np.float32}[self.study.task]
        self.labels: np.ndarray = np.asarray(targets, dtype=dtype)

    def _log_loaded(self, manifest_rows: int) -> None:
        """Log what the split holds and what the cache did; warn (with one reason) when images were refused."""
        if self.refused:
            logger.warning("%d %s image(s) refused for the %s study (e.g. %s); `medfed data check` lists them",
                           len(self.refused), self.split, self.study.modality, self.refused[0][1])
        logger.info(
            "%d %s example(s) from %d patient(s) out of %d manifest row(s); cache %s (%d built, %d reused)",
            len(self.labels), self.split, len(set(self.patients)), manifest_rows, self.cache.root,
            self.cache.stats.built, self.cache.stats.reused,
        )

    @property
    def augments(self) -> bool:
        """True when items are randomly augmented (so their features must not be precomputed once)."""
        return self._augment is not None

    def __len__(self) -> int:
        return int(self._locations.shape[0])

    def _reseed(self) -> None:
        """Per process (and per DataLoader epoch in workers): a random state from ``seed`` and the worker's seed."""
        info = get_worker_info()
        key = info.seed if info is not None else None
        if key == self._rng_key:
            return
        base = self.seed if self.seed is not None else torch.initial_seed()
        digest = hashlib.sha256(f"{base}:{key}".encode()).digest()
        self._augment.set_random_state(seed=int.from_bytes(digest[:4], "big"))  # type: ignore[union-attr]
        self._rng_key = key

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        shard, offset = self._locations[index]
        image = torch.from_numpy(self._reader.read(self._shards[int(shard)], int(offset)))
        if self._augment is not None:
            self._reseed()
            image = convert_to_tensor(self._augment(image), dtype=torch.float32, track_meta=False)
        return image, _target_tensor(self.study, self.labels[index].tolist())


_UNSEEDED = object()


class ManifestDataset(StudyDataset):
    """The default study (binary, soft-tissue CT) at ``image_size``: what every run used before studies."""

    def __init__(
        self,
        deid_dir: Path,
        split: Split = "train",
        image_size: int = 64,
        test_fraction: float = 0.25,
        cache_dir: Path | None = None,
    ) -> None:
        study = DEFAULT_STUDY.model_copy(update={"image_size": int(image_size)})
        super().__init__(deid_dir, study, split, cache_dir, test_fraction=test_fraction)
