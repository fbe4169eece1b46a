"""Per-modality preprocessing on real files (pydicom's and pydicom-data's), and the on-disk image cache."""

from __future__ import annotations

import multiprocessing
import pickle
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from torch.utils.data import DataLoader

from models import cache as cache_mod
from models.cache import ImageCache
from models.dataset import DatasetError, StudyDataset
from models.preprocess import Unusable, chosen_frames, preprocess, preprocess_file, resize
from models.study import DEFAULT_STUDY, Study
from tests.models_factory import make_store, write_ct


def _study(**kw: object) -> Study:
    table = {"image-size": 32} | kw
    if table.get("modality") in ("US", "SC", "XC"):
        table.setdefault("network", {"name": "resnet18"})
    return Study.model_validate(table)


def _file(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not available")
    return str(path)


def _read(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(_file(name))


# ---- the resize: MONAI's numbers, exact block means for an integral factor ----------------------
@pytest.mark.parametrize(("shape", "size"), [
    ((1, 256, 256), 64), ((3, 512, 512), 64), ((1, 512, 512), 224), ((1, 300, 600), 100), ((2, 96, 96), 32),
    ((1, 512, 256), 64), ((1, 600, 300), 64), ((1, 40, 40), 64), ((3, 50, 20), 64), ((1, 64, 30), 64),
    ((1, 64, 64), 64), ((1, 256, 256), 224), ((3, 333, 517), 100), ((1, 517, 333), 224), ((1, 100, 7), 64),
])
def test_resize_gives_monai_resize_numbers_bit_for_bit(shape: tuple[int, int, int], size: int) -> None:
    """Training and prediction share resize(); it must keep giving the numbers the released models saw."""
    from monai.transforms import Resize

    image = (np.random.default_rng(sum(shape) + size).standard_normal(shape) * 1000).astype(np.float32)
    got = resize(image, size)
    assert got.shape == (shape[0], size, size) and got.dtype == np.float32 and got.flags.c_contiguous
    h, w = shape[1:]
    mode = "area" if max(h, w) >= size else "bilinear"
    ref = np.asarray(Resize(spatial_size=size, size_mode="longest", mode=mode)(image), dtype=np.float32)
    rh, rw = ref.shape[1:]
    top, left = (size - rh) // 2, (size - rw) // 2
    np.testing.assert_array_equal(got[:, top:top + rh, left:left + rw], ref)
    if (rh, rw) != (size, size):  # padded with the image's minimum
        assert (got[:, :top] == ref.min()).all() and (got[:, :, :left] == ref.min()).all()


@pytest.mark.parametrize("size", [64, 224])
def test_shrinking_averages_every_pixel_in_numpy_not_on_torch_threads(size: int) -> None:
    """512 -> 64 is the mean of each 8 x 8 block (anti-aliased: no pixel dropped); no shrink calls torch,
    whose thread pool the network uses while `medfed predict` reads the next files."""
    image = np.arange(512 * 512, dtype=np.float32).reshape(1, 512, 512) % 1009
    calls: list[object] = []
    original = torch.nn.functional.interpolate
    try:
        torch.nn.functional.interpolate = lambda *a, **k: calls.append(a) or original(*a, **k)
        got = resize(image, size)
    finally:
        torch.nn.functional.interpolate = original
    assert not calls
    if size == 64:
        np.testing.assert_allclose(got, image.reshape(1, 64, 8, 64, 8).astype(np.float64).mean(axis=(2, 4)),
                                   rtol=1e-6)
    np.testing.assert_allclose(got.mean(), image.mean(), rtol=1e-3)


# ---- every transfer syntax of one image gives the same input -------------------------------
@pytest.mark.parametrize(("modality", "files"), [
    ("MR", ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
            "MR_small_bigendian.dcm", "MR_small_implicit.dcm"]),
    ("CT", ["693_UNCR.dcm", "693_J2KR.dcm"]),
    ("SC", ["SC_rgb.dcm", "SC_rgb_rle.dcm", "SC_rgb_expb.dcm", "SC_rgb_jpeg_gdcm.dcm"]),
])
def test_lossless_transfer_syntaxes_give_the_same_input(modality: str, files: list[str]) -> None:
    study = _study(modality=modality)
    results = [preprocess_file(Path(_file(f)), study) for f in files]
    for f, r in zip(files, results, strict=True):
        assert r.usable, (f, r.reason)
        assert r.arrays[0].shape == (study.in_channels, 32, 32) and r.arrays[0].dtype == np.float32
    for r in results[1:]:
        np.testing.assert_allclose(r.arrays[0], results[0].arrays[0], atol=1e-5)


def test_ct_is_hounsfield_windowed_one_channel_per_window() -> None:
    ds = _read("CT_small.dcm")
    hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    windows = [[40.0, 400.0], [-600.0, 1500.0], [400.0, 1800.0]]
    study = _study(modality="CT", preprocessing={"windows": windows}, network={"name": "densenet121"},
                   **{"image-size": 128})  # CT_small is 128 x 128: no resize, so values are exact
    (x,) = preprocess(ds, study).arrays
    assert x.shape == (3, 128, 128)
    for channel, (c, w) in zip(x, windows, strict=True):
        expected = np.clip((hu - (c - w / 2)) / w, 0.0, 1.0) * 2 - 1
        np.testing.assert_allclose(channel, expected, atol=1e-5)
    assert not np.allclose(x[0], x[1])  # different windows, different channels


def test_monochrome1_is_inverted_so_that_dense_is_bright() -> None:
    """The same radiograph stored as MONOCHROME1 and as MONOCHROME2 gives the same input."""
    ds1 = _read("RG1_UNCR.dcm")  # CR, MONOCHROME1, with a window
    assert ds1.PhotometricInterpretation == "MONOCHROME1"
    ds2 = _read("RG1_UNCR.dcm")
    top = 2 ** int(ds2.BitsStored) - 1
    inverted = (top - ds2.pixel_array.astype(np.int64)).astype(ds2.pixel_array.dtype)
    ds2.PixelData = inverted.tobytes()
    ds2.PhotometricInterpretation = "MONOCHROME2"
    for voi in ("percentile", "file"):
        pre = {"voi": voi}
        if voi == "file":  # the window in MONOCHROME2 terms: mirrored
            ds2.WindowCenter = top - float(ds1.WindowCenter)
        study = _study(modality="CR", preprocessing=pre)
        (x1,) = preprocess(ds1, study).arrays
        (x2,) = preprocess(ds2, study).arrays
        np.testing.assert_allclose(x1, x2, atol=2e-3)
    # and numerically: without inversion the image would be the negative
    study = _study(modality="CR", preprocessing={"voi": "percentile", "percentiles": [0.0, 100.0]})
    (x,) = preprocess(ds1, study).arrays
    raw = ds1.pixel_array.astype(np.float64)
    lo, hi = raw.min(), raw.max()
    unit = 1 - (raw - lo) / (hi - lo)
    expected = resize(unit[None].astype(np.float32), 32) * 2 - 1
    np.testing.assert_allclose(x, expected, atol=1e-4)


def test_radiograph_file_window_differs_from_percentiles_and_falls_back_without_one() -> None:
    ds = _read("RG3_UNCR.dcm")
    by_file = preprocess(ds, _study(modality="CR", preprocessing={"voi": "file"})).arrays[0]
    by_pct = preprocess(ds, _study(modality="CR", preprocessing={"voi": "percentile"})).arrays[0]
    assert not np.allclose(by_file, by_pct, atol=1e-2)
    del ds.WindowCenter, ds.WindowWidth
    no_window = preprocess(ds, _study(modality="CR", preprocessing={"voi": "file"})).arrays[0]
    np.testing.assert_allclose(no_window, by_pct)


def test_a_voi_lut_sequence_maps_stored_values_as_its_table_says() -> None:
    """A VOI LUT Sequence (the synthetic DX sites b, c and e write one) is applied to the integer values and
    scaled by the table's own range: a linear table gives the same input as the equivalent window."""
    from pydicom.dataset import Dataset

    ds = _read("RG3_UNCR.dcm")
    bits = int(ds.BitsStored)
    lo, hi = np.percentile(ds.pixel_array, [5, 95]).astype(int)
    first, entries = int(lo), int(hi - lo + 1)
    item = Dataset()
    item.LUTDescriptor = [entries, first, 12]
    item.LUTData = [int(round(v)) for v in np.linspace(0, 4095, entries)]
    ds.VOILUTSequence = [item]
    del ds.WindowCenter, ds.WindowWidth
    study = _study(modality="CR", preprocessing={"voi": "file"})
    (by_lut,) = preprocess(ds, study).arrays
    assert by_lut.max() - by_lut.min() > 1.0  # never the flat image a float input gave
    del ds.VOILUTSequence
    ds.WindowCenter, ds.WindowWidth = (lo + hi) / 2 + 0.5, entries  # the same linear ramp as a window
    ds.VOILUTFunction = "LINEAR_EXACT"
    (by_window,) = preprocess(ds, study).arrays
    np.testing.assert_allclose(by_lut, by_window, atol=0.02)
    assert bits >= 10


def test_mr_zscore_and_percentile() -> None:
    ds = _read("MR_small.dcm")  # 64 x 64
    (z,) = preprocess(ds, _study(modality="MR", **{"image-size": 64})).arrays
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1.0) < 1e-3
    (p,) = preprocess(ds, _study(modality="MR", preprocessing={"normalise": "percentile"}, **{"image-size": 64})).arrays
    assert float(p.min()) == -1.0 and float(p.max()) == 1.0


def test_colour_ybr_and_palette_become_rgb_or_grey() -> None:
    rgb = preprocess(_read("SC_rgb.dcm"), _study(modality="SC")).arrays[0]
    ybr = preprocess(_read("SC_ybr_full_uncompressed.dcm"), _study(modality="SC")).arrays[0]
    np.testing.assert_allclose(rgb, ybr, atol=0.03)  # YBR_FULL converted to RGB (rounding of the 8-bit YCbCr)
    assert rgb.shape == (3, 32, 32)
    assert rgb[0, 0, 0] > 0.9 and rgb[1, 0, 0] < -0.9  # the top band of SC_rgb is red
    grey = preprocess(_read("SC_rgb.dcm"), _study(modality="SC", preprocessing={"colour": "grey"})).arrays[0]
    assert grey.shape == (1, 32, 32)
    np.testing.assert_allclose(grey[0], ((0.299 * (rgb[0] + 1) + 0.587 * (rgb[1] + 1) + 0.114 * (rgb[2] + 1)) - 1),
                               atol=1e-4)
    palette = preprocess(_read("OBXXXX1A.dcm"), _study(modality="US")).arrays[0]
    assert palette.shape == (3, 32, 32) and float(palette.max()) > -1.0
    us_grey = preprocess(_read("JPGLosslessP14SV1_1s_1f_8b.dcm"), _study(modality="US")).arrays[0]
    np.testing.assert_array_equal(us_grey[0], us_grey[1])  # a greyscale US replicated into RGB


def test_multi_frame_first_middle_all_and_chosen() -> None:
    ds = _read("emri_small.dcm")  # MR, 10 frames
    stack = ds.pixel_array
    assert stack.shape[0] == 10
    for frames, expected in (("first", [0]), ("middle", [5]), ("all", list(range(10))), ([2, 7], [2, 7])):
        out = preprocess(ds, _study(modality="MR", preprocessing={"frames": frames}, **{"image-size": 64}))
        assert list(out.frames) == expected and len(out.arrays) == len(expected)
        for f, x in zip(out.frames, out.arrays, strict=True):
            v = stack[f].astype(np.float64)
            np.testing.assert_allclose(x[0], (v - v.mean()) / v.std(), atol=1e-4)
    with pytest.raises(Unusable, match="out of range"):
        preprocess(ds, _study(modality="MR", preprocessing={"frames": [3, 12]}))
    assert chosen_frames(1, "middle") == [0] and chosen_frames(4, "middle") == [2]
    enhanced = preprocess(_read("eCT_Supplemental.dcm"), _study(modality="CT", preprocessing={"frames": "all"}))
    assert enhanced.frames == (0, 1) and float(enhanced.arrays[0].max()) > -1.0  # rescale found in functional groups


@pytest.mark.parametrize(("name", "modality", "reason"), [
    ("MR_small.dcm", "CT", "modality MR"),
    ("CT_small.dcm", "MR", "modality CT"),
    ("MR_truncated.dcm", "MR", "do not decode"),
    ("rtdose.dcm", "CT", "modality RTDOSE"),
])
def test_unusable_files_get_a_reason_not_an_exception(name: str, modality: str, reason: str) -> None:
    out = preprocess_file(Path(_file(name)), _study(modality=modality))
    assert not out.usable and reason in (out.reason or "")


def test_wrong_photometric_and_garbage_are_reasons(tmp_path: Path) -> None:
    ds = _read("SC_rgb.dcm")
    ds.Modality = "CT"
    assert "not greyscale" in (preprocess_file(_save(ds, tmp_path / "rgb-ct.dcm"), _study()).reason or "")
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 200)
    assert "not readable DICOM" in (preprocess_file(tmp_path / "junk.dcm", _study()).reason or "")
    ds = _read("CT_small.dcm")
    ds.Rows = 4096  # pixel data far shorter than the header says
    assert preprocess_file(_save(ds, tmp_path / "short.dcm"), _study()).reason


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path)
    return path


# ---- the cache --------------------------------------------------------------------------------
def _shard_times(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in root.glob("shard-*.npy")}


def test_cache_is_built_once_and_rebuilt_when_preprocessing_changes(tmp_path: Path) -> None:
    store = make_store(tmp_path / "deid", n_patients=4, images_per_patient=2, size=64, seed=3)
    study = DEFAULT_STUDY.model_copy(update={"image_size": 32})
    first = StudyDataset(store.root, study, "all")
    root = first.cache.root
    assert root == store.root.resolve() / ".cache" / study.preprocessing_digest()
    assert first.cache.stats.built == len(store.rows) and first.cache.stats.reused == 0
    times = _shard_times(root)
    again = StudyDataset(store.root, study, "all")
    assert again.cache.stats.built == 0 and again.cache.stats.reused == len(store.rows)
    assert _shard_times(root) == times  # nothing rewritten
    torch.testing.assert_close(again[3][0], first[3][0])
    # a different augmentation or test fraction is the same preprocessing: same cache
    other = study.model_copy(update={"test_fraction": 0.5})
    assert StudyDataset(store.root, other, "all").cache.stats.built == 0
    # a change of preprocessing is a new digest: a new cache
    windows = Study.model_validate({"image-size": 32, "preprocessing": {"windows": [[50.0, 350.0]]}})
    changed = StudyDataset(store.root, windows, "all")
    assert changed.cache.root != root and changed.cache.stats.built == len(store.rows)
    # a rewritten source file is rebuilt alone
    write_ct(store.root / store.rows[0]["path"], np.full((64, 64), 40.0, np.float32))
    third = StudyDataset(store.root, study, "all")
    assert third.cache.stats.built == 1
    i = third.paths.index(store.rows[0]["path"])
    assert torch.allclose(third[i][0], torch.zeros(1, 32, 32), atol=1e-5)


@pytest.mark.parametrize("damage", ["truncate", "delete", "garbage", "index"])
def test_damaged_cache_is_rebuilt(tmp_path: Path, damage: str) -> None:
    store = make_store(tmp_path / "deid", n_patients=3, images_per_patient=2, size=64, seed=5)
    study = DEFAULT_STUDY.model_copy(update={"image_size": 32})
    good = StudyDataset(store.root, study, "all")
    expected = [good[i][0] for i in range(len(good))]
    root = good.cache.root
    (shard,) = root.glob("shard-*.npy")
    if damage == "truncate":
        with open(shard, "r+b") as fh:
            fh.truncate(shard.stat().st_size // 2)
    elif damage == "delete":
        shard.unlink()
    elif damage == "garbage":
        shard.write_bytes(b"not a numpy file")
    else:
        (root / "index.json").write_text("{ half an ind", encoding="utf-8")
    rebuilt = StudyDataset(store.root, study, "all")
    assert rebuilt.cache.stats.built == len(store.rows)
    for i, x in enumerate(expected):
        torch.testing.assert_close(rebuilt[i][0], x)
    assert len(list(root.glob("shard-*.npy"))) == 1  # the damaged shard is gone


def test_cache_builds_in_shards_and_keeps_finished_ones_after_a_failure(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    store = make_store(tmp_path / "deid", n_patients=4, images_per_patient=2, size=64, seed=9)
    study = DEFAULT_STUDY.model_copy(update={"image_size": 32})
    monkeypatch.setattr(cache_mod, "SHARD_BYTES", 3 * 32 * 32 * 4)  # three examples per shard
    write_ct(store.root / store.rows[-1]["path"], np.zeros((64, 64), np.float32), identity_removed="NO")
    with pytest.raises(DatasetError, match="PatientIdentityRemoved"):
        StudyDataset(store.root, study, "all")
    write_ct(store.root / store.rows[-1]["path"], np.zeros((64, 64), np.float32))
    ds = StudyDataset(store.root, study, "all")
    assert ds.cache.stats.built == 1  # everything before the refused file was kept
    assert len(list(ds.cache.root.glob("shard-*.npy"))) == 4  # 3 + 3 + 1 before the failure, then 1


def _build_in_child(root: str, study_json: str, queue: multiprocessing.Queue) -> None:
    study = Study.model_validate_json(study_json)
    ds = StudyDataset(Path(root), study, "all")
    queue.put(ds.cache.stats.built)


def test_concurrent_builders_share_one_cache(tmp_path: Path) -> None:
    store = make_store(tmp_path / "deid", n_patients=6, images_per_patient=3, size=96, seed=2)
    study = DEFAULT_STUDY.model_copy(update={"image_size": 32})
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(store.root), study.model_dump_json(), queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    built = sorted(queue.get(timeout=10) for _ in procs)
    assert built[1] == len(store.rows) and built[0] in (0, len(store.rows))
    cache = ImageCache.for_store(store.root, study)
    index_entries = cache._load_index()[0]
    assert len(index_entries) == len(store.rows)
    assert StudyDataset(store.root, study, "all").cache.stats.built == 0


# ---- targets, augmentation, workers ---------------------------------------------------------
def _relabel(store, labels: list[str]) -> None:  # noqa: ANN001
    for row, label in zip(store.rows, labels, strict=True):
        row["label"] = label
    store.write_manifest()


def test_targets_per_task(tmp_path: Path) -> None:
    store = make_store(tmp_path / "deid", n_patients=3, images_per_patient=2, size=64, seed=4)
    _relabel(store, ["a", "b", "c", "a", "2", "b"])
    multi = Study.model_validate({"task": "multiclass", "classes": ["a", "b", "c"], "image-size": 32})
    ds = StudyDataset(store.root, multi, "all")
    ys = [ds[i][1] for i in range(len(ds))]
    assert all(y.dtype == torch.int64 and y.shape == () for y in ys)
    assert sorted(int(y) for y in ys) == [0, 0, 1, 1, 2, 2]
    _relabel(store, ["x", "y|x", "none", "y", "x", "none"])
    ml = Study.model_validate({"task": "multilabel", "classes": ["x", "y"], "image-size": 32})
    ds = StudyDataset(store.root, ml, "all")
    assert ds[0][1].dtype == torch.float32 and ds[0][1].shape == (2,)
    assert sorted(tuple(ds[i][1].tolist()) for i in range(len(ds))) == sorted(
        [(1.0, 0.0), (1.0, 1.0), (0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (0.0, 0.0)])
    _relabel(store, ["x", "y|z", "none", "y", "x", "none"])
    with pytest.raises(DatasetError, match="row 3"):
        StudyDataset(store.root, ml, "all")


def test_augmentation_only_on_train_seeded_and_varied(tmp_path: Path) -> None:
    store = make_store(tmp_path / "deid", n_patients=8, images_per_patient=2, size=64, seed=6)
    study = Study.model_validate({"image-size": 32, "augmentation": {"flip": True, "rotate-degrees": 20,
                                                                      "intensity-jitter": 0.2}})
    plain = StudyDataset(store.root, DEFAULT_STUDY.model_copy(update={"image_size": 32}), "train")
    a = StudyDataset(store.root, study, "train", seed=1)
    b = StudyDataset(store.root, study, "train", seed=1)
    assert a.augments and not plain.augments
    xa = [a[i][0] for i in range(len(a))]
    xb = [b[i][0] for i in range(len(b))]
    for x, y in zip(xa, xb, strict=True):
        torch.testing.assert_close(x, y)  # same seed, same augmentation
    assert any(not torch.allclose(x, plain[i][0]) for i, x in enumerate(xa))
    assert not torch.allclose(a[0][0], xa[0])  # the next epoch draws anew
    test = StudyDataset(store.root, study, "test", seed=1)
    ref = StudyDataset(store.root, DEFAULT_STUDY.model_copy(update={"image_size": 32}), "test")
    assert not test.augments
    torch.testing.assert_close(test[0][0], ref[0][0])


def test_dataloader_workers_read_the_cache(tmp_path: Path) -> None:
    store = make_store(tmp_path / "deid", n_patients=6, images_per_patient=2, size=64, seed=8)
    study = DEFAULT_STUDY.model_copy(update={"image_size": 32})
    ds = StudyDataset(store.root, study, "all")
    serial = torch.cat([x for x, _ in DataLoader(ds, batch_size=4)])
    parallel = torch.cat([x for x, _ in DataLoader(ds, batch_size=4, num_workers=2)])
    torch.testing.assert_close(serial, parallel)
    assert serial.shape == (len(store.rows), 1, 32, 32)
    # a spawned worker gets the dataset pickled: the index travels, never the images or the open maps
    blob = pickle.dumps(ds)
    assert len(blob) < 64 * 1024
    torch.testing.assert_close(pickle.loads(blob)[5][0], serial[5])
