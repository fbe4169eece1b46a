"""`medfed predict`: a verified release applied to DICOM as it comes from PACS, at the site.

Files are read and preprocessed exactly as the study trains (models.preprocess) by a reader
thread (CPU) or DataLoader workers (GPU) while the model scores the batch before, so decoding
overlaps inference (docs/inference.md, "Speed"). The
predictions, the results as DICOM and the saliency maps stay in OUT, in the hospital's own
identifiers (these are the hospital's images, not a de-identified store); only `--send` stores
the DICOM results in the PACS the site names (site_client.send).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydicom.dataset import Dataset
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

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


@dataclass
class Example:
    """One preprocessed frame of one source file."""

    index: int  # the file's position in the scan
    frame: int
    array: np.ndarray


@dataclass
class Scored:
    """One image's scores and decision, with what the SR and the CSV need to reference it."""

    path: str
    header: Dataset
    frame: int
    scores: np.ndarray
    decision: str
    positive: tuple[bool, ...]


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


class _Files(TorchDataset):
    """One item per file: its header (no pixels), its preprocessed frames, or the reason it has none."""

    def __init__(self, files: list[Path], study: Study) -> None:
        self.files, self.study = files, study

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, Dataset | None, list[Example], str | None]:
        from models.preprocess import Unusable, preprocess, read_dicom

        try:
            ds = read_dicom(self.files[i])
            done = preprocess(ds, self.study)
        except Unusable as err:
            return i, None, [], err.reason
        except Exception as exc:  # noqa: BLE001 - one odd file must not stop the scan
            return i, None, [], f"cannot be preprocessed ({type(exc).__name__})"
        if not done.usable:
            return i, None, [], done.reason or "no usable frame"
        header = ds.copy()
        for kw in _HEADER_ONLY:
            if kw in header:
                delattr(header, kw)
        return i, header, [Example(i, f, a) for f, a in zip(done.frames, done.arrays, strict=True)], None


def _collate(items: list[Any]) -> list[Any]:
    return items


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


def load_model(release: Release, device: str) -> torch.nn.Module:
    from models.registry import build_network

    if device == "cuda" and not torch.cuda.is_available():
        raise PredictError("--device cuda was asked but this machine has no CUDA device; use --device cpu")
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
class Timing:
    """Where scoring's time went: what the reader and the network each cost per image, for tuning."""

    images: int = 0
    read: int = 0  # files read by the reader thread
    read_cpu_s: float = 0.0  # CPU time of reading and preprocessing (the reader thread; 0 with worker processes)
    model_s: float = 0.0  # wall time of the forward passes
    threads: int = 0  # the network's CPU threads after tuning (0 on a GPU)


#: Seconds the reader may hold the GIL while the network waits for it between two operations (Python's
#: default, 5 ms, made a ResNet-18's forward pass 25-45 % slower beside a reader parsing DICOM).
_SWITCH_INTERVAL = 0.0002


def _read_in_thread(dataset: _Files, ahead: int, timing: Timing) -> Iterator[Any]:
    """``dataset``'s items in order, read by one thread of this process while the caller runs the network.

    The network releases the GIL inside each operation, so on few cores a thread overlaps as well as
    a worker process without its start-up, its own torch thread pool and the pickling of every header
    and array (which costs the parent a third of the decoding again). The network takes the GIL back
    between operations; while the reader runs, Python's switch interval is cut to
    ``_SWITCH_INTERVAL`` so that it does not wait long for it.
    """
    ready: queue.Queue[Any] = queue.Queue(maxsize=ahead)
    stop = threading.Event()
    done = object()

    def offer(item: object) -> bool:
        """Queue ``item``; False once the caller has stopped reading (then nothing more is read)."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for i in range(len(dataset)):
                cpu = time.thread_time()
                item = dataset[i]
                timing.read_cpu_s += time.thread_time() - cpu
                timing.read += 1
                if not offer(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it
            offer(exc)
            return
        offer(done)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, _SWITCH_INTERVAL))
    reader = threading.Thread(target=read, name="medfed-predict-reader", daemon=True)
    reader.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join()
        sys.setswitchinterval(interval)


def _read_in_workers(dataset: _Files, workers: int) -> Iterator[Any]:
    """``dataset``'s items in order, read by ``workers`` DataLoader processes (many cores, a fast device)."""
    loader = DataLoader(dataset, batch_size=8, num_workers=workers, collate_fn=_collate,
                        persistent_workers=False, prefetch_factor=4)
    for items in loader:
        yield from items


def default_workers(device: str) -> int:
    """Reader processes: none on a CPU (one reader thread), else all cores but one, at most 8.

    On a CPU the network and the reading share the same cores whatever does the reading, so a
    process buys nothing and costs pickling; a GPU leaves the cores to reading, which then limits.
    """
    cpus = os.cpu_count() or 1
    return 0 if device == "cpu" else max(0, min(8, cpus - 1))


class _ThreadTuner:
    """The network's CPU threads, chosen by measurement: all cores, or all but the one the reader needs.

    Which wins depends on what an image costs to read against what the network costs: a small network
    at 64 px can be faster on one core beside the reader than on two that the reader keeps
    interrupting; a DenseNet at 224 px is not, unless other work holds cores of the machine (threads
    then wait for each other). After a warm-up batch, ``trial`` batches run on all cores; one core
    fewer is tried (``trial`` batches) only if reading takes a fifth or more of the time per image or
    the process got half a core less than it asked for (seen already in the warm-up batch, which
    then ends the all-cores trial), so a heavy network on a quiet machine never pays for the trial.
    The faster measured rate is kept.
    """

    def __init__(self, cpus: int, enabled: bool, trial: int = 1) -> None:
        self.cpus, self.trial = cpus, trial
        self.plan = [cpus] * (1 + trial) if enabled and cpus > 1 else []
        self.rates: dict[int, list[float]] = {}
        self.batches = 0
        self.chosen = cpus

    def threads(self) -> int:
        """Threads for the next batch (the caller sets them)."""
        return self.plan[self.batches] if self.batches < len(self.plan) else self.chosen

    def record(self, threads: int, images: int, seconds: float, cpu_seconds: float, read_per_image: float) -> None:
        """One batch: ``seconds`` (and the process's ``cpu_seconds``) from asking for its files to its
        scores; the reader's CPU time per file so far."""
        measured = seconds > 0 and images > 0 and self.batches < len(self.plan)
        crowded = measured and threads == self.cpus and cpu_seconds / seconds < self.cpus - 0.5
        if measured and (self.batches > 0 or crowded):  # a first batch warms up; it counts only to say "crowded"
            self.rates.setdefault(threads, []).append(images / seconds)
        self.batches += 1
        if self.batches == 1 and crowded:  # other work holds cores: no more batches on all of them
            self.plan = [self.cpus] + [self.cpus - 1] * self.trial
            return
        if self.batches != len(self.plan) or not self.rates:
            return
        if self.plan[-1] == self.cpus and self.cpus in self.rates:
            per_image = sum(1 / r for r in self.rates[self.cpus]) / len(self.rates[self.cpus])
            if read_per_image >= per_image / 5 or crowded:  # a core for the reader, or fewer waits, may pay
                self.plan += [self.cpus - 1] * self.trial
                return
        self.chosen = max(self.rates, key=lambda t: sum(self.rates[t]) / len(self.rates[t]))
        log.debug("network threads: %s img/s per thread count -> %d", self.rates, self.chosen)


def score_batches(model: torch.nn.Module, files: list[Path], study: Study, *, device: str, batch_size: int,
                  workers: int, timing: Timing | None = None) -> Iterator[
                      tuple[list[tuple[int, Dataset, int, np.ndarray]], list[tuple[int, str]], np.ndarray]]:
    """Yield ``(examples (file index, header, frame, array), unusable (index, reason), scores)`` per batch.

    Files are read in order by a thread (``workers=0``) or by worker processes while the network
    scores the batch before; each batch is scored as soon as it is full. On a CPU with a reader
    thread, the network's threads are tuned on the first batches (:class:`_ThreadTuner`).
    """
    timing = timing if timing is not None else Timing()
    dataset = _Files(files, study)
    items = _read_in_workers(dataset, workers) if workers else _read_in_thread(dataset, 2 * batch_size, timing)
    cpu = device == "cpu"
    batches = len(files) // batch_size
    tuner = _ThreadTuner(torch.get_num_threads(), cpu and not workers and batches >= 3)
    pending: list[tuple[int, Dataset, int, np.ndarray]] = []
    bad: list[tuple[int, str]] = []

    def run(batch: list[tuple[int, Dataset, int, np.ndarray]]) -> np.ndarray:
        x = torch.from_numpy(np.stack([a for *_, a in batch])).to(device)
        t = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cuda", enabled=device == "cuda"):
            scores = probabilities(model(x), study)
        timing.model_s += time.perf_counter() - t
        timing.images += len(batch)
        return scores

    threads = tuner.threads()
    if cpu:
        torch.set_num_threads(threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    for i, header, examples, reason in items:
        if reason is not None:
            bad.append((i, reason))
        pending.extend((i, header, e.frame, e.array) for e in examples)
        while len(pending) >= batch_size:
            batch, pending = pending[:batch_size], pending[batch_size:]
            scores = run(batch)
            tuner.record(threads, len(batch), time.perf_counter() - started, time.process_time() - cpu_started,
                         timing.read_cpu_s / max(1, timing.read))
            if cpu and (threads := tuner.threads()) != torch.get_num_threads():
                torch.set_num_threads(threads)
            yield batch, bad, scores
            bad = []
            started, cpu_started = time.perf_counter(), time.process_time()
    if pending or bad:
        yield pending, bad, run(pending) if pending else np.zeros((0, study.num_outputs))
    timing.threads = torch.get_num_threads() if cpu else 0


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
    model = load_model(release, device)
    workers = default_workers(device) if workers is None else workers
    threads = torch.get_num_threads()
    if device == "cpu" and workers:  # worker processes on the same cores: the network takes what they leave
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - workers)))
    timing = Timing()
    scored: list[Scored] = []
    unusable: list[tuple[str, str]] = []
    try:
        with scoring_progress(progress) as bar:
            task = bar.add_task("scoring", total=len(files))
            seen: set[int] = set()
            for batch, bad, scores in score_batches(model, files, study, device=device, batch_size=batch_size,
                                                    workers=workers, timing=timing):
                unusable.extend((str(files[i].relative_to(src)), reason) for i, reason in bad)
                for (i, header, frame, _), s in zip(batch, scores, strict=True):
                    decision, positive = decide(s, study, thresholds)
                    scored.append(Scored(str(files[i].relative_to(src)), header, frame, s, decision, positive))
                new = {i for i, *_ in batch} | {i for i, _ in bad}
                bar.advance(task, len(new - seen))
                seen |= new
    finally:
        torch.set_num_threads(threads)  # the tuning's choice was for this run only
    _write_predictions(out, scored, study, threshold_label)
    _write_unusable(out, unusable)
    summary = PredictSummary(out=out, images=len(scored), files=len(files), unusable=unusable,
                             threshold=threshold_label, seconds=0.0, timing=timing)
    if sr:
        from site_client.results_dicom import write_srs

        summary.srs = write_srs(out / SR_DIR, scored, release, thresholds, threshold_label)
    if explain:
        from site_client.results_dicom import write_saliency

        summary.saliency = write_saliency(out / EXPLAIN_DIR, model, files, src, scored, release, device)
    summary.seconds = time.monotonic() - t0
    return summary


def _write_predictions(out: Path, scored: list[Scored], study: Study, threshold_label: str) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["sop_instance_uid", "study_instance_uid", "series_instance_uid", "frame", "path",
                *(f"score_{c}" for c in (study.classes[1:] if study.task == "binary" else study.classes)),
                "decision", "threshold"])
    for s in scored:
        h = s.header
        w.writerow([h.get("SOPInstanceUID", ""), h.get("StudyInstanceUID", ""), h.get("SeriesInstanceUID", ""),
                    s.frame, s.path, *(f"{v:.6f}" for v in s.scores), s.decision, threshold_label])
    write_file(out / PREDICTIONS, buf.getvalue().encode())


def _write_unusable(out: Path, unusable: list[tuple[str, str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "reason"])
    w.writerows(unusable)
    write_file(out / UNUSABLE, buf.getvalue().encode())
