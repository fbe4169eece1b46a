"""ManifestDataset: reads only the de-identified store, splits by patient, preprocesses CT."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from models.dataset import DatasetError, ManifestDataset, assign_splits, patient_fraction, split_of
from tests.models_factory import Store, make_store, write_ct


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return make_store(tmp_path_factory.mktemp("deid"), n_patients=16, images_per_patient=3, size=128, seed=7)


def _fresh(tmp_path: Path, **kw: object) -> Store:
    kw = {"n_patients": 4, "images_per_patient": 2, "size": 64, "seed": 1} | kw
    return make_store(tmp_path / "deid", **kw)  # type: ignore[arg-type]


def test_items_are_float_images_and_scalar_labels(store: Store) -> None:
    ds = ManifestDataset(store.root, "all", image_size=32)
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert y.shape == () and y.dtype == torch.float32
    assert ds.labels.dtype == np.float32 and set(np.unique(ds.labels)) <= {0.0, 1.0}
    assert len(ds) == len(store.rows) == len(ds.labels)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0


def test_split_is_patient_level_disjoint_and_complete(store: Store) -> None:
    train = ManifestDataset(store.root, "train", image_size=32)
    test = ManifestDataset(store.root, "test", image_size=32)
    everything = ManifestDataset(store.root, "all", image_size=32)
    assert len(train) > 0 and len(test) > 0
    assert not set(train.patients) & set(test.patients)
    assert sorted(train.paths + test.paths) == sorted(everything.paths)
    splits = assign_splits(everything.patients, 0.25)
    for p in train.patients:
        assert splits[p] == "train"
    for p in test.patients:
        assert splits[p] == "test"


def _patients_on(side: str, count: int, test_fraction: float) -> list[str]:
    """Pseudonyms that `split_of` alone puts on one side (found by search, so the test needs no key)."""
    found = [f"p{i}" for i in range(10_000) if split_of(f"p{i}", test_fraction) == side]
    return found[:count]


def test_a_small_site_whose_patients_all_hash_to_train_still_gets_a_test_patient() -> None:
    patients = _patients_on("train", 3, 0.25)
    splits = assign_splits(patients, 0.25)
    nearest = min(patients, key=patient_fraction)
    assert splits[nearest] == "test"
    assert [splits[p] for p in patients if p != nearest] == ["train", "train"]
    # a pure function of the pseudonyms: order and duplicates do not matter
    assert assign_splits(list(reversed(patients)) + patients, 0.25) == splits


def test_all_test_moves_the_patient_farthest_from_the_boundary_back_to_train() -> None:
    patients = _patients_on("test", 3, 0.5)
    splits = assign_splits(patients, 0.5)
    assert splits[max(patients, key=patient_fraction)] == "train"
    assert sorted(splits.values()) == ["test", "test", "train"]


def test_one_patient_or_a_degenerate_fraction_is_left_as_hashed() -> None:
    lone = _patients_on("train", 1, 0.25)
    assert assign_splits(lone, 0.25) == {lone[0]: "train"}
    many = _patients_on("train", 4, 0.25)
    assert set(assign_splits(many, 0.0).values()) == {"train"}  # test_fraction 0 asks for no test split
    assert set(assign_splits(many, 1.0).values()) == {"test"}


def test_split_is_deterministic_and_machine_independent(store: Store) -> None:
    a = ManifestDataset(store.root, "test", image_size=32)
    torch.manual_seed(123)
    np.random.seed(123)
    b = ManifestDataset(store.root, "test", image_size=32)
    assert a.paths == b.paths and np.array_equal(a.labels, b.labels)
    # SHA-256 of the pseudonym: the same number on every machine and Python run.
    assert patient_fraction("abc") == int("ba7816bf8f01cfea", 16) / 2.0**64
    assert split_of("abc", 0.75) == "test" and split_of("abc", 0.7) == "train"


def test_larger_test_fraction_only_moves_patients_into_test(store: Store) -> None:
    small = set(ManifestDataset(store.root, "test", image_size=32, test_fraction=0.2).patients)
    large = set(ManifestDataset(store.root, "test", image_size=32, test_fraction=0.6).patients)
    assert small <= large


def test_hu_windowing_and_normalisation(tmp_path: Path) -> None:
    """40 HU (window centre) -> 0, air -> -1, bone -> +1, whatever the rescale slope."""
    store = _fresh(tmp_path, n_patients=1, images_per_patient=1)
    img = np.full((64, 64), 40.0, dtype=np.float32)
    img[:, :16] = -1000.0
    img[:, 48:] = 1000.0
    write_ct(store.root / store.rows[0]["path"], img, slope=2.0)
    x, _ = ManifestDataset(store.root, "all", image_size=16)[0]
    assert torch.allclose(x[0, :, 6:10], torch.zeros(16, 4), atol=0.02)
    assert torch.allclose(x[0, :, :4], -torch.ones(16, 4))
    assert torch.allclose(x[0, :, 12:], torch.ones(16, 4))


def test_refuses_folder_without_manifest(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_ct(raw / "a.dcm", np.zeros((64, 64), np.float32))
    with pytest.raises(DatasetError, match="medfed deid run"):
        ManifestDataset(raw)
    with pytest.raises(DatasetError, match="medfed deid run"):
        ManifestDataset(tmp_path / "missing")


@pytest.mark.parametrize("marker", [None, "NO", ""])
def test_refuses_file_not_marked_de_identified(tmp_path: Path, marker: str | None) -> None:
    store = _fresh(tmp_path)
    write_ct(store.root / store.rows[1]["path"], np.zeros((64, 64), np.float32), identity_removed=marker)
    with pytest.raises(DatasetError, match="PatientIdentityRemoved") as err:
        ManifestDataset(store.root, "all")
    assert "row 3" in str(err.value)


@pytest.mark.parametrize("bad", ["../outside.dcm", "sub/../../outside.dcm", "/etc/outside.dcm", "C:\\x\\outside.dcm"])
def test_refuses_paths_escaping_the_store(tmp_path: Path, bad: str) -> None:
    store = _fresh(tmp_path)
    write_ct(tmp_path / "outside.dcm", np.zeros((64, 64), np.float32))
    store.rows[0]["path"] = bad
    store.write_manifest()
    with pytest.raises(DatasetError, match="store"):
        ManifestDataset(store.root, "all")


def test_refuses_symlink_out_of_the_store(tmp_path: Path) -> None:
    store = _fresh(tmp_path)
    write_ct(tmp_path / "outside.dcm", np.zeros((64, 64), np.float32))
    os.symlink(tmp_path / "outside.dcm", store.root / "link.dcm")
    store.rows[0]["path"] = "link.dcm"
    store.write_manifest()
    with pytest.raises(DatasetError, match="outside"):
        ManifestDataset(store.root, "all")


def test_unlabelled_rows_are_skipped(tmp_path: Path) -> None:
    store = _fresh(tmp_path, unlabelled_every=2)
    ds = ManifestDataset(store.root, "all")
    assert len(ds) == sum(1 for r in store.rows if r["label"] != "")
    assert len(ds) < len(store.rows)


def test_refuses_store_without_any_label(tmp_path: Path) -> None:
    store = _fresh(tmp_path)
    for r in store.rows:
        r["label"] = ""
    store.write_manifest()
    with pytest.raises(DatasetError, match="label"):
        ManifestDataset(store.root, "all")


def test_refuses_bad_label_and_missing_column(tmp_path: Path) -> None:
    store = _fresh(tmp_path)
    store.rows[0]["label"] = "yes"
    store.write_manifest()
    with pytest.raises(DatasetError, match="label"):
        ManifestDataset(store.root, "all")
    (store.root / "manifest.csv").write_text("patient,path\np1,a.dcm\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="lacks column"):
        ManifestDataset(store.root, "all")


def test_refuses_missing_or_corrupt_file(tmp_path: Path) -> None:
    store = _fresh(tmp_path)
    (store.root / store.rows[0]["path"]).unlink()
    with pytest.raises(DatasetError, match="missing"):
        ManifestDataset(store.root, "all")
    (store.root / store.rows[0]["path"]).write_bytes(b"not dicom at all")
    with pytest.raises(DatasetError, match="not readable DICOM"):
        ManifestDataset(store.root, "all")


def test_empty_split_is_a_clear_error(tmp_path: Path) -> None:
    store = _fresh(tmp_path)
    with pytest.raises(DatasetError, match="empty"):
        ManifestDataset(store.root, "test", test_fraction=0.0)
