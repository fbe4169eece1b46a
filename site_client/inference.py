"""`medfed predict`: a verified release applied to DICOM as it comes from PACS, at the site.

Files are read and preprocessed exactly as the study trains (models.preprocess) by reader
processes: on a CPU they take turns with the network, each using every core; on a GPU they read
ahead while it scores (docs/inference.md, "Speed"). The predictions, the results as DICOM and
the saliency maps stay in OUT, in the hospital's own identifiers (these are the hospital's images,
not a de-identified store); only `--send` stores the DICOM results in the PACS the site names
(site_client.send).
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import torch
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from medfed.files import write_file
from models.release import Release
from models.study import Study

if TYPE_CHECKING:
    from rich.progress import Progress

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.csv"
UNUSABLE = "unusable.csv"
SR_DIR = "sr"
EXPLAIN_DIR = "explain"
#: Header attributes kept per source image for the SR's evidence and references (no pixels).
_HEADER_ONLY = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class PredictError(Exception):
    """Prediction cannot run as asked; the message says what to do."""


def probabilities(logits: torch.Tensor, study: Study) -> np.ndarray:
    """Scores per class, one row per image (binary: one column): models.metrics' mapping of the logits."""
    from models.metrics import probabilities as mapped

    return mapped(logits.detach().float().cpu(), study.task).reshape(len(logits), -1)


def decide(scores: np.ndarray, study: Study, thresholds: tuple[float, ...]) -> tuple[str, tuple[bool, ...]]:
    """The decision as text (class name, or present findings) and which classes are called present.

    ``thresholds`` has one value per score column (binary: one; multilabel: one per finding); a
    multiclass study takes the arg-max.
    """
    if study.task == "binary":
        pos = bool(scores[0] >= thresholds[0])
        return study.classes[1 if pos else 0], (pos,)
    if study.task == "multiclass":
        k = int(np.argmax(scores))
        return study.classes[k], tuple(i == k for i in range(len(study.classes)))
    present = tuple(bool(s >= t) for s, t in zip(scores, thresholds, strict=True))
    names = [c for c, p in zip(study.classes, present, strict=True) if p]
    return ("|".join(names) if names else "none"), present


def check_device(device: str) -> None:
    """PredictError when ``device`` is not one this machine has."""
    if device == "cuda" and not torch.cuda.is_available():
        raise PredictError("--device cuda was asked but this machine has no CUDA device; use --device cpu")


def load_model(release: Release, device: str) -> torch.nn.Module:
    from models.registry import build_network

    check_device(device)
    # Built on the meta device (no memory, no random draws: most of building a ResNet or DenseNet, a
    # tenth of a second or more of every run), then every parameter and buffer taken from the release
    # as it is (strict, assign), in the dtype the network was built with.
    with torch.device("meta"):
        model = build_network(release.study)
    dtypes = {name: t.dtype for name, t in (*model.named_parameters(), *model.named_buffers())}
    state = {k: v.to(dtypes[k]) if k in dtypes else v for k, v in release.state_dict.items()}
    model.load_state_dict(state, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a buffer the state dict does not hold
        model = build_network(release.study)
        model.load_state_dict(release.state_dict)
    return model.to(device).eval()


@dataclass
class SourceHeader:
    """A scored file's identifiers, and its header for the SR and saliency maps, parsed only when written.

    ``raw`` is the file's bytes before its pixel data (a fortieth of a CT slice, cheap to hand from a
    reader process; parsing it again is what the CSV alone never pays), or the header itself where
    those bytes are not the file's own (a deflated or very large file).
    """

    sop: str
    study: str
    series: str
    raw: bytes | Dataset

    @cached_property
    def dataset(self) -> Dataset:
        return self.raw if isinstance(self.raw, Dataset) else pydicom.dcmread(io.BytesIO(self.raw))


@dataclass
class Scored:
    """One image's scores and decision, with what the SR and the CSV need to reference it."""

    path: str
    source: SourceHeader
    frame: int
    scores: np.ndarray
    decision: str
    positive: tuple[bool, ...]

    @property
    def header(self) -> Dataset:
        """The source file's header, without its pixels."""
        return self.source.dataset


@dataclass
class PredictSummary:
    """What `medfed predict` did."""

    out: Path
    images: int
    files: int
    unusable: list[tuple[str, str]]
    threshold: str
    seconds: float
    srs: list[Path] = field(default_factory=list)
    saliency: list[Path] = field(default_factory=list)
    timing: Timing | None = None

    def line(self) -> str:
        return (f"{self.images} image(s) from {self.files} file(s) scored, {len(self.unusable)} unusable; "
                f"threshold {self.threshold}")


def source_files(src: Path) -> list[Path]:
    """Every regular file under ``src`` (symbolic links are not followed), in a stable order."""
    if not src.is_dir():
        raise PredictError(f"{src} is not a folder; pass the folder of DICOM files to score")
    found = []
    for root, dirs, files in os.walk(src, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            if p.is_file() and not p.is_symlink():
                found.append(p)
    return found


@dataclass
class _Read:
    """One file as a reader hands it over: its header and preprocessed frames, or why it has none."""

    index: int
    source: SourceHeader | None
    frames: list[tuple[int, np.ndarray]]
    reason: str | None
    cpu_s: float


#: Top-level pixel data elements: where a file's header ends.
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


def _header_of(data: bytes | None, ds: Dataset) -> bytes | Dataset:
    """The bytes of ``data`` before its pixel data; the header itself where they are not the parsed bytes.

    Called before the pixels are decoded: only an unconverted element still knows where it was read.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if data is not None and syntax != DeflatedExplicitVRLittleEndian:  # deflated: offsets are the inflated stream's
        for tag in _PIXEL_TAGS:
            if tag in ds:
                raw = ds.get_item(tag)
                if isinstance(raw, RawDataElement) and raw.value_tell:
                    return data[:raw.value_tell - (8 if raw.is_implicit_VR else 12)]
                break
    header = ds.copy()
    for kw in _HEADER_ONLY:
        if kw in header:
            delattr(header, kw)
    return header


def _read_file(path: Path, index: int, study: Study) -> _Read:
    """Read and preprocess one file as the study trains; any failure becomes the reason it is unusable."""
    from models.preprocess import Unusable, preprocess, read_dicom_bytes

    cpu = time.thread_time()
    try:
        ds, data = read_dicom_bytes(path)
        header = _header_of(data, ds)
        done = preprocess(ds, study)
        if not done.usable:
            raise Unusable(done.reason or "no usable frame")
        source = SourceHeader(str(ds.get("SOPInstanceUID", "") or ""), str(ds.get("StudyInstanceUID", "") or ""),
                              str(ds.get("SeriesInstanceUID", "") or ""), header)
        return _Read(index, source, list(zip(done.frames, done.arrays, strict=True)), None, time.thread_time() - cpu)
    except Unusable as err:
        reason = err.reason
    except Exception as exc:  # noqa: BLE001 - one odd file must not stop the scan
        reason = f"cannot be preprocessed ({type(exc).__name__})"
    return _Read(index, None, [], reason, time.thread_time() - cpu)


#: What a reader process reads from: the scan's files and the study (set once per process, at fork).
_READER: tuple[list[Path], Study] | None = None


def _start_reader(files: list[Path], study: Study) -> None:
    global _READER
    _READER = (files, study)
    torch.set_num_threads(1)  # a reader enlarges small images with torch: one thread, not the parent's pool


def _read_range(start: int, stop: int) -> list[_Read]:
    assert _READER is not None
    files, study = _READER
    return [_read_file(files[i], i, study) for i in range(start, stop)]


#: Why a file was not scored when the process reading it died (a decoder crash, or out of memory).
READER_DIED = "the process reading it died (a decoder crashed on it, or memory ran out)"


class _Readers:
    """Files read and preprocessed by worker processes, a group at a time, in the scan's order.

    Separate processes, not threads: pydicom parses in Python, and a thread parsing beside the network
    holds the GIL the network needs between operations (a ResNet-18 at 64 px ran at a third of its
    speed). A decoder that crashes on a hostile file takes down only its reader: the group is read
    again one file per process, and the file that kills its reader is listed as unusable.
    ``workers=0`` reads in this process (tests, one core). The readers are forked once and live for
    the scan: forking and ending them each turn cost some 60 ms a turn, more than idle readers cost
    the network beside them (up to 4 %, measured at 224 px); they end once the last turn is read.
    """

    def __init__(self, files: list[Path], study: Study, workers: int) -> None:
        self.files, self.study, self.workers = files, study, workers
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> _Readers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            # fork: a reader starts in milliseconds with the parent's modules (a spawned one imports torch
            # and pydicom again, seconds); what it inherits of torch's thread pool it does not use.
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                            initializer=_start_reader, initargs=(self.files, self.study))
        return self.pool

    def submit(self, start: int, stop: int) -> list[Future[list[_Read]]] | list[_Read]:
        """Start reading files ``start:stop``, split evenly over the readers (or read them now, in-process)."""
        if not self.workers:
            return [_read_file(self.files[i], i, self.study) for i in range(start, stop)]
        bounds = np.linspace(start, stop, min(self.workers, stop - start) + 1).round().astype(int)
        pool = self._pool()
        return [pool.submit(_read_range, int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]

    def collect(self, start: int, stop: int, pending: list[Future[list[_Read]]] | list[_Read]) -> list[_Read]:
        """What :meth:`submit` started, in order; a group whose reader died is read again a file at a time."""
        if not self.workers:
            return pending  # type: ignore[return-value]
        try:
            out = [r for f in pending for r in f.result()]  # type: ignore[union-attr]
        except BrokenProcessPool:
            self.stop()
            out = []
            for i in range(start, stop):
                try:
                    out.extend(self._pool().submit(_read_range, i, i + 1).result())
                except BrokenProcessPool:
                    self.stop()
                    out.append(_Read(i, None, [], READER_DIED, 0.0))
        return out


def default_workers(device: str) -> int:
    """Reader processes, at most 8: every core on a CPU (reading and scoring take turns), else all but one.

    Eight read some 10,000 files/s, more than a network scores; more would cost forks each turn.
    One core reads in this process, without the cost of handing results between processes.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpus == 1:
        return 0
    return min(8, cpus if device == "cpu" else cpus - 1)


#: Bytes of preprocessed examples one turn of the readers produces, at most (above one batch).
TURN_BYTES = 64 << 20


def files_per_turn(study: Study, batch_size: int) -> int:
    """Files the readers take per turn: up to eight batches, within ``TURN_BYTES`` of examples.

    Fewer, longer turns: each switch between reading and scoring costs the network its warm caches
    and sleeping threads (a ResNet-18 at 64 px scored a third slower in turns of one batch than of eight).
    """
    per_example = 4 * study.in_channels * study.image_size**2
    return max(batch_size, min(8 * batch_size, TURN_BYTES // per_example))


@dataclass
class Timing:
    """Where scoring's time went: what reading and the network each cost per image, for tuning."""

    images: int = 0
    read: int = 0  # files read
    read_cpu_s: float = 0.0  # CPU time of reading and preprocessing, summed over the readers
    model_s: float = 0.0  # wall time of the forward passes
    threads: int = 0  # the network's CPU threads (0 on a GPU)


def score_batches(load: Callable[[], torch.nn.Module], files: list[Path], study: Study, *, device: str,
                  batch_size: int, workers: int, timing: Timing | None = None) -> Iterator[
                      tuple[list[tuple[int, SourceHeader, int, np.ndarray]], list[tuple[int, str]], np.ndarray]]:
    """Yield ``(examples (file index, header, frame, array), unusable (index, reason), scores)`` per batch.

    Files are read in groups (:func:`files_per_turn`) by ``workers`` processes. On a CPU, reading and the
    network take turns, each with every core: the cores are the limit, and a reader running beside the
    network's threads makes them wait for each other (measured: slower than taking turns). On a GPU,
    the readers work two groups ahead while the device scores. The network is built (``load``) once the
    readers have started: building it overlaps the first group's reading, and they fork the smaller parent.
    """
    timing = timing if timing is not None else Timing()
    ahead = 0 if device == "cpu" else 2
    group = files_per_turn(study, batch_size)
    groups = [(s, min(s + group, len(files))) for s in range(0, len(files), group)]
    pending: list[tuple[int, SourceHeader, int, np.ndarray]] = []
    bad: list[tuple[int, str]] = []

    def run(batch: list[tuple[int, SourceHeader, int, np.ndarray]]) -> np.ndarray:
        x = torch.from_numpy(np.stack([a for *_, a in batch])).to(device)
        t = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cuda", enabled=device == "cuda"):
            scores = probabilities(model(x), study)
        timing.model_s += time.perf_counter() - t
        timing.images += len(batch)
        return scores

    with _Readers(files, study, workers) as readers:
        started = {g: readers.submit(*groups[g]) for g in range(min(1 + ahead, len(groups)))}
        model = load()
        for g, bounds in enumerate(groups):
            reads = readers.collect(*bounds, started.pop(g))
            if g == len(groups) - 1:
                readers.stop()  # nothing left to read: the last batches score without idle readers beside them
            if ahead and g + 1 + ahead < len(groups):
                started[g + 1 + ahead] = readers.submit(*groups[g + 1 + ahead])
            for r in reads:
                timing.read += 1
                timing.read_cpu_s += r.cpu_s
                if r.reason is not None:
                    bad.append((r.index, r.reason))
                else:
                    assert r.source is not None
                    pending.extend((r.index, r.source, frame, array) for frame, array in r.frames)
            while len(pending) >= batch_size:
                batch, pending = pending[:batch_size], pending[batch_size:]
                yield batch, bad, run(batch)
                bad = []
            if ahead == 0 and g + 1 < len(groups):  # taking turns: the next group once this one is scored
                started[g + 1] = readers.submit(*groups[g + 1])
    if pending or bad:
        yield pending, bad, run(pending) if pending else np.zeros((0, study.num_outputs))
    timing.threads = torch.get_num_threads() if device == "cpu" else 0


def scoring_progress(enabled: bool) -> Progress:
    """The bar `medfed predict` shows while scoring: counts only, never a file name, within 80 columns."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("scoring"), BarColumn(bar_width=30), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, disable=not enabled, transient=True)


def predict_folder(release: Release, src: Path, out: Path, *, thresholds: tuple[float, ...], threshold_label: str,
                   sr: bool = False, explain: bool = False, device: str = "cpu", batch_size: int = 32,
                   workers: int | None = None, progress: bool = True) -> PredictSummary:
    """Score every usable image under ``src``; write predictions.csv, unusable.csv, and SRs / saliency maps."""
    t0 = time.monotonic()
    study = release.study
    files = source_files(src)
    if not files:
        raise PredictError(f"{src} holds no files; pass the folder PACS exported the studies to")
    out.mkdir(parents=True, exist_ok=True)
    check_device(device)
    model = cache(lambda: load_model(release, device))  # built while the readers start on the first files
    workers = default_workers(device) if workers is None else workers
    timing = Timing()
    scored: list[Scored] = []
    unusable: list[tuple[str, str]] = []
    with scoring_progress(progress) as bar:
        task = bar.add_task("scoring", total=len(files))
        seen: set[int] = set()
        for batch, bad, scores in score_batches(model, files, study, device=device, batch_size=batch_size,
                                                workers=workers, timing=timing):
            unusable.extend((str(files[i].relative_to(src)), reason) for i, reason in bad)
            for (i, source, frame, _), s in zip(batch, scores, strict=True):
                decision, positive = decide(s, study, thresholds)
                scored.append(Scored(str(files[i].relative_to(src)), source, frame, s, decision, positive))
            new = {i for i, *_ in batch} | {i for i, _ in bad}
            bar.advance(task, len(new - seen))
            seen |= new
    _write_predictions(out, scored, study, threshold_label)
    _write_unusable(out, unusable)
    summary = PredictSummary(out=out, images=len(scored), files=len(files), unusable=unusable,
                             threshold=threshold_label, seconds=0.0, timing=timing)
    if sr:
        from site_client.results_dicom import write_srs

        summary.srs = write_srs(out / SR_DIR, scored, release, thresholds, threshold_label)
    if explain:
        from site_client.results_dicom import write_saliency

        summary.saliency = write_saliency(out / EXPLAIN_DIR, model(), files, src, scored, release, device)
    summary.seconds = time.monotonic() - t0
    return summary


def _write_predictions(out: Path, scored: list[Scored], study: Study, threshold_label: str) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["sop_instance_uid", "study_instance_uid", "series_instance_uid", "frame", "path",
                *(f"score_{c}" for c in (study.classes[1:] if study.task == "binary" else study.classes)),
                "decision", "threshold"])
    for s in scored:
        w.writerow([s.source.sop, s.source.study, s.source.series, s.frame, s.path,
                    *(f"{v:.6f}" for v in s.scores), s.decision, threshold_label])
    write_file(out / PREDICTIONS, buf.getvalue().encode())


def _write_unusable(out: Path, unusable: list[tuple[str, str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "reason"])
    w.writerows(unusable)
    write_file(out / UNUSABLE, buf.getvalue().encode())
