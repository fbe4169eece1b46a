"""What DP-SGD costs per optimizer step, against plain SGD, for each Opacus per-sample-gradient mode.

The consortium's default model (``build_model`` at the RunConfig's default image
size) takes forward + backward + optimizer step on one fixed batch of the
RunConfig's default batch size, with and without DP, all in one process. The
modes are interleaved (each repeat runs every mode for ``--steps`` steps, in a
rotating order) so that load from other processes on a shared machine hits them
alike; a mode's ratio is the median over repeats of (its median step time / the
plain step's median in the same repeat). On CPU with one thread the step time is
the thread's CPU time (``time.thread_time``), which other processes on a shared
machine cannot inflate; wall-clock ratios are printed beside it. Peak memory of one step: CUDA
``max_memory_allocated`` on a GPU, the torch profiler's allocation events on CPU.
"ew" runs as train_local runs it, with per-sample conv gradients tap by tap
(models/conv_grad_sample.py); "ew-unfold" is Opacus' "ew" as torch
ships it, for comparison. The last line is the ratio of the default
configuration (train_local's default mode).

    .venv/bin/python bench/dp_overhead.py [--steps 20] [--repeats 7] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medfed.settings import RunConfig
from models import features
from models.conv_grad_sample import fast_conv_grad_samples
from models.network import build_model
from models.training import DEFAULT_GRAD_SAMPLE_MODE, GRAD_SAMPLE_MODES, MOMENTUM

BASELINE = "no-dp"
#: Opacus' "ew" as torch ships it (per-sample conv gradients by unfold at batches of 32 and more), for comparison.
EW_UNFOLD = "ew-unfold"


@dataclass
class Runner:
    """One configuration: a step function and the step times measured so far, per repeat."""

    name: str
    step: Callable[[], None]
    times: list[list[float]] = field(default_factory=list)
    walls: list[list[float]] = field(default_factory=list)
    peak_bytes: int | None = None
    error: str | None = None


def _make(name: str, image_size: int, x: torch.Tensor, y: torch.Tensor, device: str, lr: float) -> Runner:
    """A step of what train_local trains: the model's trained part, fed ``x`` (the front end's output)."""
    mode = "ew" if name == EW_UNFOLD else name
    torch.manual_seed(0)
    _, model = features.split(build_model(image_size).to(device))
    optim = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    criterion: Any = nn.BCEWithLogitsLoss()
    module: nn.Module = model
    if mode != BASELINE:
        from opacus import PrivacyEngine

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine()
        loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
        out = engine.make_private(
            module=model, optimizer=optim, data_loader=loader, criterion=criterion, noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode,
        )
        if mode == "ghost":
            module, optim, criterion, _ = out
        else:
            module, optim, _ = out

    def plain_step() -> None:
        optim.zero_grad(set_to_none=True)
        loss = criterion(module(x).view(-1), y)
        loss.backward()
        optim.step()

    def step() -> None:
        # as train_local runs "ew": per-sample conv gradients tap by tap (models/conv_grad_sample.py)
        with fast_conv_grad_samples():
            plain_step()

    return Runner(name, step if name == "ew" else plain_step)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_memory(r: Runner, device: str) -> int:
    """Bytes allocated at the peak of one step, above what was allocated before it."""
    if device == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        r.step()
        _sync(device)
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    saved = os.dup(2)  # the profiler prints start/stop lines on fd 2 from C++; keep the report readable
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                r.step()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return max(itertools.accumulate(b for _, b in events), default=0)


def main() -> None:
    cfg = RunConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode per repeat")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=cfg.batch_size)
    parser.add_argument("--image-size", type=int, default=cfg.image_size)
    parser.add_argument("--modes", nargs="+", default=list(GRAD_SAMPLE_MODES), choices=GRAD_SAMPLE_MODES)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    torch.set_num_threads(args.threads)
    # Opacus' hooks on the first layer fire although images need no gradient; harmless, noisy.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 1, args.image_size, args.image_size, generator=gen).to(args.device)
    y = (torch.rand(args.batch_size, generator=gen) < 0.5).float().to(args.device)
    model = build_model(args.image_size).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    front, _ = features.split(model)
    x = images
    if front is not None:
        # train_local runs the fixed front end once per dataset, not per step: time it apart.
        with torch.no_grad():
            front(images)  # warm-up
            _sync(args.device)
            t0 = time.perf_counter()
            x = front(images)
            _sync(args.device)
        front_ms = 1000 * (time.perf_counter() - t0) / len(images)
        print(f"fixed front end ({type(front).__name__}): {front_ms:.2f} ms per image, once per dataset; "
              f"the trained part takes {tuple(x.shape[1:])} inputs")
    print(f"model: build_model({args.image_size}), {n_params} trained parameters; batch {args.batch_size}; "
          f"device {args.device}; threads {torch.get_num_threads()}; torch {torch.__version__}")

    runners: list[Runner] = []
    for mode in [BASELINE, *args.modes, *([EW_UNFOLD] if "ew" in args.modes else [])]:
        try:
            r = _make(mode, args.image_size, x, y, args.device, cfg.lr)
            for _ in range(args.warmup):
                r.step()
            r.peak_bytes = _peak_memory(r, args.device)
        except Exception as err:  # noqa: BLE001 - a mode our model cannot use is reported, not fatal
            r = Runner(mode, lambda: None, error=f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
        runners.append(r)
    live = [r for r in runners if r.error is None]
    cpu_clock = args.device == "cpu" and torch.get_num_threads() == 1
    clock = time.thread_time if cpu_clock else time.perf_counter
    for rep in range(args.repeats):
        k = rep % len(live)
        for r in live[k:] + live[:k]:  # rotate the order so no mode always follows another
            times, walls = [], []
            for _ in range(args.steps):
                _sync(args.device)
                t0, w0 = clock(), time.perf_counter()
                r.step()
                _sync(args.device)
                times.append(clock() - t0)
                walls.append(time.perf_counter() - w0)
            r.times.append(times)
            r.walls.append(walls)

    base = runners[0]
    if base.error is not None:
        raise SystemExit(f"the plain SGD step failed: {base.error}")
    ratios: dict[str, float] = {}
    kind = "CPU time" if cpu_clock else "wall time"
    print(f"step time = {kind}")
    print(f"\n{'mode':<10} {'median ms/step':>15} {'p10-p90 ms':>15} {'vs SGD':>8} {'wall vs SGD':>12} {'peak MB':>9}")
    for r in runners:
        if r.error is not None:
            print(f"{r.name:<10} unsupported: {r.error}")
            continue
        flat = sorted(t for ts in r.times for t in ts)
        ratio = statistics.median(
            statistics.median(ts) / statistics.median(bs) for ts, bs in zip(r.times, base.times, strict=True)
        )
        wall_ratio = statistics.median(
            statistics.median(ts) / statistics.median(bs) for ts, bs in zip(r.walls, base.walls, strict=True)
        )
        ratios[r.name] = ratio
        p10, p90 = flat[len(flat) // 10], flat[(9 * len(flat)) // 10]
        print(f"{r.name:<10} {1000 * statistics.median(flat):>15.2f} {1000 * p10:>7.2f}-{1000 * p90:<7.2f} "
              f"{ratio:>7.2f}x {wall_ratio:>11.2f}x {(r.peak_bytes or 0) / 2**20:>9.2f}")
    fastest = min((m for m in ratios if m not in (BASELINE, EW_UNFOLD)), key=ratios.__getitem__, default=None)
    print(f"\nfastest DP mode here: {fastest} ({ratios.get(fastest, float('nan')):.2f}x); "
          f"{args.repeats} repeats x {args.steps} steps per mode")
    default = DEFAULT_GRAD_SAMPLE_MODE
    if default not in ratios:
        raise SystemExit(f"the default mode {default} was not measured or failed")
    print(f"default configuration (grad-sample-mode={default}): DP-SGD/SGD step {kind} = {ratios[default]:.2f}x")


if __name__ == "__main__":
    main()
