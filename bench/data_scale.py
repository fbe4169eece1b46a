"""Data at scale: images/s from DICOM (building the image cache) and from the cache, and peak memory.

Writes ``--images`` (default 20,000) single-frame 16-bit CT slices of ``--size``
(default 256) pixels into a de-identified store layout (``images/<patient>/<study>/<sop>.dcm``
plus ``manifest.csv``, four images per patient, half labelled positive), from one
pydicom template whose pixel data change per file. Then, each in a fresh process:

1. ``StudyDataset(store, study, "all")`` with an empty cache: every file is read,
   preprocessed (modality LUT, soft-tissue window, resize to ``--size``) and written
   to the memory-mapped cache - images/s from DICOM;
2. the same dataset again (the cache is complete) and one full epoch through a
   ``DataLoader`` (shuffled, batch 64, ``--workers`` workers) - images/s from the cache;
3. with ``--train NETWORK``, one epoch of DP-SGD (``train_local`` as a site runs it: Poisson
   batches of ``--batch`` expected examples split by Opacus' BatchMemoryManager into
   physical batches of at most ``--physical``, the network's default per-sample-gradient
   mode) on the whole store, training the ``--trainable`` part - images/s of training.
   ``--train-images N`` stops the epoch once N images were drawn (the sampling rate and every
   step are still those of the whole store), so a slow CPU can measure memory in bounded time;
   ``--train-only`` reuses the store and cache a ``--keep`` run left in ``--work``.

Peak memory: each phase's own peak resident set (``resource.getrusage``), its
workers' largest, and the largest total of the phase and its workers sampled every
0.2 s (psutil). The goal: under 4 GB for 20,000 images of 256 x 256.

    .venv/bin/python bench/data_scale.py [--work DIR] [--images 20000] [--size 256] [--workers 2] [--keep]
                                         [--train resnet18 --trainable last-block --batch 256 --physical 64]
                                         [--train-images N] [--train-only]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GOAL_BYTES = 4 * 1024**3
PER_PATIENT = 4


def make_store(root: Path, n: int, size: int) -> float:
    """Write ``n`` CT slices and the manifest; return seconds taken."""
    import numpy as np
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    from models.dataset import MANIFEST_COLUMNS, MANIFEST_NAME

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.42 * size) ** 2)
    base = np.where(body, 1064, 24).astype(np.uint16)  # 40 HU inside, -1000 HU outside (intercept -1024)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.PatientIdentityRemoved = "YES"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    noise = rng.integers(0, 50, size=(64, size, size), dtype=np.uint16)  # reused, shifted: cheap variety
    rows = []
    for i in range(n):
        patient = f"P{i // PER_PATIENT:06d}"
        study = f"2.25.{1000 + i // PER_PATIENT}"
        sop = f"2.25.{10_000_000 + i}"
        pixels = base + np.roll(noise[i % 64], i % size, axis=1)
        if i % 2:
            cy, cx = 64 + (i * 7) % (size - 128), 64 + (i * 13) % (size - 128)
            pixels[cy - 8:cy + 8, cx - 8:cx + 8] += 150
        ds.PatientID = patient
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = study + ".1"
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID = sop
        ds.PixelData = pixels.tobytes()
        rel = f"images/{patient}/{study}/{sop}.dcm"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(root / rel, enforce_file_format=True)
        rows.append({"patient": patient, "study_uid": study, "series_uid": study + ".1", "sop_uid": sop,
                     "accession": "", "path": rel, "label": str(i % 2)})
    with open(root / MANIFEST_NAME, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["path"]))
    return time.perf_counter() - start


def _phase(store: str, size: int, workers: int, phase: str, train: dict | None = None) -> dict:
    """Run in a child process: build the cache, read one epoch from it, or train one DP-SGD epoch on it."""
    import resource
    import threading

    import psutil
    import torch
    from torch.utils.data import DataLoader

    from models.dataset import StudyDataset
    from models.study import DEFAULT_STUDY

    torch.set_num_threads(1)
    me = psutil.Process()
    peak_total = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_total
        while not stop.is_set():
            try:
                total = me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True))
            except psutil.Error:
                total = 0
            peak_total = max(peak_total, total)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    study = DEFAULT_STUDY.model_copy(update={"image_size": size})
    start = time.perf_counter()
    ds = StudyDataset(Path(store), study, "all")
    built = time.perf_counter() - start
    out = {"phase": phase, "examples": len(ds), "cache_built": ds.cache.stats.built, "open_s": built}
    if phase == "epoch":
        start = time.perf_counter()
        seen = 0
        checksum = 0.0
        loader = DataLoader(ds, batch_size=64, shuffle=True, num_workers=workers, persistent_workers=False)
        for x, _y in loader:
            seen += x.shape[0]
            checksum += float(x[:, 0, 0, 0].sum())
        out["epoch_s"] = time.perf_counter() - start
        out["seen"] = seen
    if phase == "train":
        out.update(_train_epoch(ds, study, train or {}))
    stop.set()
    sampler.join()
    out["peak_rss_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["peak_rss_children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    out["peak_total_sampled"] = peak_total
    out["cache_bytes"] = sum(p.stat().st_size for p in ds.cache.root.iterdir() if p.is_file())
    return out


class _Enough(Exception):
    """Raised by the counting dataset once the bounded epoch has drawn its images."""


def _counting(ds: object, limit: int | None) -> object:
    """``ds`` as the same dataset that counts the images drawn and ends the epoch after ``limit``."""
    from torch.utils.data import Dataset

    class Counting(Dataset):
        drawn = 0

        def __len__(self) -> int:
            return len(ds)  # type: ignore[arg-type]

        def __getitem__(self, i: int) -> object:
            if limit is not None and self.drawn >= limit:
                raise _Enough
            self.drawn += 1
            return ds[i]  # type: ignore[index]

    return Counting()


def _train_epoch(ds: object, study: object, train: dict) -> dict:
    """One DP-SGD epoch over ``ds`` as a site trains (seconds, images, steps); its memory is the phase's."""
    import torch

    from models.accounting import make_accountant
    from models.registry import grad_sample_mode
    from models.training import DPSettings, train_local
    from site_client.task import site_network

    torch.set_num_threads(train.get("threads", 2))
    study = study.model_copy(update={"network": study.network.model_copy(
        update={"name": train["network"], "trainable": train["trainable"]})})
    model = site_network(study)
    data = _counting(ds, train.get("images"))
    start = time.perf_counter()
    try:
        steps = train_local(model, data, epochs=1, batch_size=train["batch"], lr=1e-3, optimizer="adam",
                            dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0), accountant=make_accountant("rdp"),
                            grad_sample_mode=grad_sample_mode(train["network"], "auto"),
                            max_physical_batch_size=train["physical"], task=study.task).steps
    except _Enough:
        steps = None
    return {"train_s": time.perf_counter() - start, "steps": steps, "drawn": data.drawn}


def run_phase(store: Path, size: int, workers: int, phase: str, train: dict | None = None) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from bench.data_scale import _phase; "
            f"print('RESULT ' + json.dumps(_phase({str(store)!r}, {size}, {workers}, {phase!r}, {train!r})))")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"phase {phase} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def _print_train(train: dict, args: argparse.Namespace) -> int:
    """Print the DP-SGD phase's line; return its peak bytes."""
    gib = 1024**3
    done = (f"{train['steps']} steps (the whole epoch)" if train["steps"] is not None
            else f"stopped after {train['drawn']} images")
    peak = max(train["peak_rss_self"], train["peak_total_sampled"])
    print(f"DP-SGD on {train['examples']} images: {args.train} ({args.trainable}), expected batch {args.batch}, "
          f"physical <= {args.physical}: {done}, {train['drawn'] / train['train_s']:.1f} images/s "
          f"({train['train_s']:.0f} s); peak RSS {train['peak_rss_self'] / gib:.2f} GiB, largest sampled total "
          f"{train['peak_total_sampled'] / gib:.2f} GiB")
    verdict = "met" if peak < GOAL_BYTES else "NOT met"
    print(f"goal: peak memory of DP training under 4 GiB at {train['examples']} images of {args.size}x{args.size}: "
          f"{peak / gib:.2f} GiB -> {verdict}")
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="folder for the store (default: a temporary one)")
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the store and its cache")
    ap.add_argument("--train", default=None, help="also train one DP-SGD epoch of this registry network")
    ap.add_argument("--trainable", default="last-block", help="all | last-block | head | norm-and-bias")
    ap.add_argument("--batch", type=int, default=256, help="expected (Poisson) batch of the DP-SGD epoch")
    ap.add_argument("--physical", type=int, default=64, help="largest physical batch (BatchMemoryManager)")
    ap.add_argument("--train-images", type=int, default=None, help="end the DP-SGD epoch after this many images")
    ap.add_argument("--train-only", action="store_true", help="reuse the store and cache in --work; train only")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="medfed-data-scale-"))
    store = work / "deid"
    gib = 1024**3
    spec = {"network": args.train, "trainable": args.trainable, "batch": args.batch, "physical": args.physical,
            "images": args.train_images}
    if args.train_only:
        if not args.train or not (store / "manifest.csv").exists():
            raise SystemExit(f"--train-only needs --train NETWORK and the store a --keep run left in {store}")
        _print_train(run_phase(store, args.size, args.workers, "train", spec), args)
        return
    if store.exists():
        shutil.rmtree(store)
    store.mkdir(parents=True)
    try:
        made = make_store(store, args.images, args.size)
        print(f"wrote {args.images} DICOM files of {args.size}x{args.size} in {made:.0f} s "
              f"({args.images / made:.0f} files/s)")
        build = run_phase(store, args.size, args.workers, "build")
        epoch = run_phase(store, args.size, args.workers, "epoch")
        train = run_phase(store, args.size, args.workers, "train", spec) if args.train else None
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    assert build["cache_built"] == args.images and epoch["cache_built"] == 0 and epoch["seen"] == args.images
    assert train is None or train["cache_built"] == 0
    print(f"from DICOM (building the cache): {args.images / build['open_s']:.0f} images/s "
          f"({build['open_s']:.0f} s; cache {build['cache_bytes'] / gib:.2f} GiB on disk)")
    print(f"from the cache: open {epoch['open_s']:.1f} s, one epoch through a DataLoader "
          f"({args.workers} workers, batch 64, shuffled) {args.images / epoch['epoch_s']:.0f} images/s "
          f"({epoch['epoch_s']:.0f} s)")
    peak = max(build["peak_total_sampled"], epoch["peak_total_sampled"], build["peak_rss_self"],
               epoch["peak_rss_self"] + epoch["peak_rss_children"])
    if train is not None:
        peak = max(peak, _print_train(train, args))
    print(f"peak RSS: build {build['peak_rss_self'] / gib:.2f} GiB; epoch main {epoch['peak_rss_self'] / gib:.2f} GiB, "
          f"largest worker {epoch['peak_rss_children'] / gib:.2f} GiB, largest sampled total "
          f"{epoch['peak_total_sampled'] / gib:.2f} GiB")
    verdict = "met" if peak < GOAL_BYTES else "NOT met"
    print(f"goal: peak memory under 4 GiB at {args.images} images of {args.size}x{args.size}: "
          f"{peak / gib:.2f} GiB -> {verdict}")


if __name__ == "__main__":
    main()
