"""Speed of `medfed predict`: images/s from DICOM on disk vs a bare torch forward loop, same run.

The baseline is the least a scorer can do: the same network over the same already-decoded tensors, in
batches, nothing else, at its best thread count. `medfed predict` also reads, decodes and preprocesses
every file (reader processes, taking turns with the network on a CPU), loads the release and writes its CSV.
The ratio says how much of the model's own speed the whole command keeps; goal >= 0.8x. Both are
measured ``--repeat`` times in pairs, one right after the other: the ratio is the median of the pairs'
ratios (a shared VM's speed drifts by more than the effects measured), the img/s columns the best
of each. Beside them:
what decoding alone costs per image (one core, in-process), and what predict's reader and network
each cost per image in the run (reading: CPU summed over the readers). On few cores decoding and
the network share the cores, so the ratio is bounded by model / (model + decode) for a cheap network.

    python bench/predict.py [--images 400] [--networks scatter-head,resnet18] [--image-size 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from medfed.signing import Signer as AuditSigner  # noqa: E402
from models.preprocess import preprocess, read_dicom  # noqa: E402
from models.registry import build_network  # noqa: E402
from models.release import model_card, verify_release, write_release  # noqa: E402
from models.study import DEFAULT_STUDY, Network  # noqa: E402
from site_client.inference import Timing, predict_folder, source_files  # noqa: E402


def _images(root: Path, n: int) -> Path:
    """``n`` raw synthetic CT slices (medfed synth), as PACS would export them."""
    from medfed.synth import generate_hospitals

    # A synthetic patient has one or two slices: ask for n patients, keep the first n files.
    info = generate_hospitals(root / "synth", sites=1, patients=max(2, n), seed=7, burned_in_fraction=0.0)[0]
    src = root / "incoming"
    files = sorted(p for p in info.dicom_dir.rglob("*") if p.is_file())[:n]
    if len(files) < n:
        raise SystemExit(f"medfed synth made {len(files)} files, fewer than --images {n}")
    src.mkdir()
    for i, p in enumerate(files):
        shutil.copy(p, src / f"{i:06d}.dcm")
    return src


def _bare(model: torch.nn.Module, tensors: torch.Tensor, batch: int, device: str) -> tuple[float, int]:
    """Images/s of the model alone over decoded tensors at its best thread count (all cores, or one), and that count."""
    best, threads = (0.0, 0), torch.get_num_threads()
    for n in sorted({threads, 1}):
        torch.set_num_threads(n)
        best = max(best, (_forward(model, tensors, batch, device), n))
    torch.set_num_threads(threads)
    return best


def _forward(model: torch.nn.Module, tensors: torch.Tensor, batch: int, device: str) -> float:
    # Each batch its own tensor, as predict stacks them (a slice of one big tensor can run at another speed).
    batches = [tensors[i:i + batch].clone() for i in range(0, len(tensors), batch)]
    with torch.inference_mode():
        for x in batches[:3]:  # warm-up: a network's first batches run slower (the scattering head's most)
            model(x.to(device))
        t0 = time.perf_counter()
        for x in batches:
            model(x.to(device))
        if device == "cuda":
            torch.cuda.synchronize()
    return len(tensors) / (time.perf_counter() - t0)


@dataclass
class Figures:
    predict: float  # img/s of predict_folder, whole command
    bare: float  # img/s of the network alone, best thread count
    bare_threads: int
    decode: float  # img/s of read + preprocess alone, one core, in-process
    images: int
    timing: Timing
    ratios: list[float]  # predict / bare of each measured pair

    @property
    def ratio(self) -> float:
        """The median of the paired ratios: a drift of the machine's speed hits both sides of a pair alike."""
        return statistics.median(self.ratios)


def measure(name: str, src: Path, work: Path, size: int, batch: int, device: str, repeat: int) -> Figures:
    study = DEFAULT_STUDY.model_copy(update={"image_size": size, "network": Network(name=name)})
    signer = AuditSigner.generate()
    model = build_network(study).eval()
    card = model_card(study=study, run_name="bench", rounds=0, fab_sha256=None, metrics={}, sites={})
    rel_dir = write_release(work / f"release-{name}", model.state_dict(), study, card, signer)
    release = verify_release(rel_dir, signer.public_raw)
    t0 = time.perf_counter()
    arrays = [a for p in source_files(src) for a in preprocess(read_dicom(p), study).arrays]
    decode = len(arrays) / (time.perf_counter() - t0)
    tensors = torch.from_numpy(np.stack(arrays))
    best: Figures | None = None
    for _ in range(repeat):  # in pairs, one right after the other: a drift of the VM's speed hits both alike
        bare, bare_threads = _bare(model.to(device), tensors, batch, device)
        t0 = time.perf_counter()
        summary = predict_folder(release, src, work / f"out-{name}", thresholds=(0.5,), threshold_label="bench",
                                 device=device, batch_size=batch, progress=False)
        full = summary.images / (time.perf_counter() - t0)
        assert summary.timing is not None
        if best is None:
            best = Figures(full, bare, bare_threads, decode, summary.images, summary.timing, [])
        best.ratios.append(full / bare)
        best.bare, best.bare_threads = max((best.bare, best.bare_threads), (bare, bare_threads))
        if full > best.predict:
            best.predict, best.timing = full, summary.timing
    assert best is not None
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--networks", default="scatter-head,resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5, help="measured pairs (bare, then predict)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    print(f"# bench/predict.py  commit {commit}  {platform.node()}  {os.cpu_count()} cores  device {args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = _images(work, args.images)
        first = read_dicom(source_files(src)[0])
        print(f"# {args.images} raw CT files (medfed synth, {first.Rows} x {first.Columns}, {first.BitsStored}-bit), "
              f"{args.image_size} px, batch {args.batch}")
        print(f"{'network':<14} {'images':>6} {'predict img/s':>13} {'bare img/s':>10} {'ratio':>5} "
              f"{'decode img/s':>12}   predict ms/img: read (CPU), network; network threads")
        for name in args.networks.split(","):
            f = measure(name, src, work, args.image_size, args.batch, args.device, args.repeat)
            t = f.timing
            print(f"{name:<14} {f.images:>6} {f.predict:>13.1f} {f.bare:>10.1f} {f.ratio:>5.2f} "
                  f"{f.decode:>12.1f}   {1e3 * t.read_cpu_s / max(1, t.read):.2f}, "
                  f"{1e3 * t.model_s / max(1, t.images):.2f}; {t.threads or '-'} (bare best: {f.bare_threads})")


if __name__ == "__main__":
    main()
