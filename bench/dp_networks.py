"""DP-SGD step time over a plain step, per registry network and Opacus per-sample-gradient mode; peak memory.

Each (network, mode) runs in its own process, so its peak resident memory
(``ru_maxrss``; CUDA ``max_memory_allocated`` on a GPU) is its own. A process
builds the network from a study (`models.registry`), takes ``--warmup`` steps and
then ``--steps`` timed steps on one fixed batch: forward, backward, optimizer step
(Opacus clips and noises in the DP modes; "ew" runs with train_local's tap-by-tap
conv gradients). The time of a step is the thread's CPU time with one thread (other
processes on a shared machine cannot inflate it), wall time on a GPU. A mode that
fails is skipped with Opacus' reason. The fastest mode whose peak memory fits
``--max-memory-mb`` is the network's default (``models.registry.DEFAULT_MODE``).

    .venv/bin/python bench/dp_networks.py [--networks all] [--image-size 64] [--batch 16]
                                          [--trainable all] [--steps 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BASELINE = "no-dp"


def _peak_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, mode: str, args: argparse.Namespace) -> dict:
    """One configuration in this process: median step seconds and peak memory."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from models.conv_grad_sample import fast_conv_grad_samples
    from models.registry import apply_trainable, build_network
    from models.study import Study
    from models.training import MOMENTUM, TaskLoss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    trainable = "all" if name == "scatter-head" else args.trainable
    study = Study.model_validate({"image-size": args.image_size, "network": {"name": name, "trainable": trainable}})
    model = apply_trainable(build_network(study), trainable).to(args.device).train()
    x = torch.randn(args.batch, 1, args.image_size, args.image_size, device=args.device)
    y = (torch.arange(args.batch, device=args.device) % 2).float()
    # a fixed front (head / last-block) runs once per dataset in training: time the trained part only
    front = getattr(model, "fixed_front", None)
    if front is not None:
        with torch.no_grad():
            x = front(x)
        model = model.trainable
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.SGD(params, lr=0.01, momentum=MOMENTUM)
    criterion = TaskLoss("binary")
    if mode != BASELINE:
        from opacus import PrivacyEngine

        warnings.filterwarnings("ignore")
        loader = DataLoader(TensorDataset(x, y), batch_size=args.batch)
        private = PrivacyEngine().make_private(module=model, optimizer=optim, criterion=criterion, data_loader=loader,
                                               noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
                                               grad_sample_mode=mode)
        model, optim = private[0], private[1]
        if mode == "ghost":
            criterion = private[2]
    before = _peak_mb(args.device)
    times: list[float] = []
    context = fast_conv_grad_samples() if mode == "ew" else nullcontext()
    with context:
        for i in range(args.warmup + args.steps):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t_cpu, t_wall = time.thread_time(), time.perf_counter()
            optim.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()
            optim.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            spent = time.perf_counter() - t_wall if args.device.startswith("cuda") or args.threads > 1 \
                else time.thread_time() - t_cpu
            if i >= args.warmup:
                times.append(spent)
    return {"network": name, "mode": mode, "seconds": statistics.median(times), "peak_mb": _peak_mb(args.device),
            "before_mb": before, "trained": sum(p.numel() for p in params)}


def _child(name: str, mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", name, mode, "--image-size", str(args.image_size), "--batch",
           str(args.batch), "--trainable", args.trainable, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--device", args.device]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"network": name, "mode": mode, "error": f"ran over {args.timeout}s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"network": name, "mode": mode, "error": last[:160]}
    return json.loads(lines[-1])


def main() -> None:
    from models.study import NETWORKS
    from models.training import GRAD_SAMPLE_MODES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", default="all", help="comma-separated registry names, or all")
    parser.add_argument("--modes", default=",".join(GRAD_SAMPLE_MODES))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--trainable", default="all", choices=("all", "last-block", "head", "norm-and-bias"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per configuration")
    parser.add_argument("--max-memory-mb", type=float, default=float("inf"), help="a mode above this does not fit")
    parser.add_argument("--child", nargs=2, metavar=("NETWORK", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args)), flush=True)
        return
    names = NETWORKS if args.networks == "all" else tuple(args.networks.split(","))
    modes = args.modes.split(",")
    t0 = time.monotonic()
    rows: dict[str, dict[str, dict]] = {}
    for name in names:
        for mode in (BASELINE, *modes):
            r = _child(name, mode, args)
            rows.setdefault(name, {})[mode] = r
            print(f"  {name:<16} {mode:<9} " + (f"FAILED: {r['error']}" if "error" in r else
                  f"{r['seconds'] * 1000:8.0f} ms/step  peak {r['peak_mb']:.0f} MB"), flush=True)
    print(f"\nDP step time / plain step time, {args.image_size}x{args.image_size}, batch {args.batch}, trained part "
          f"'{args.trainable}' (scatter-head: all), {args.threads} thread(s), {args.device}; peak memory MB")
    print("| network | trained params | plain ms | " + " | ".join(modes) + " | default |")
    print("|---|---|---|" + "---|" * len(modes) + "---|")
    defaults: dict[str, str] = {}
    for name, by_mode in rows.items():
        base = by_mode[BASELINE]
        if "error" in base:
            print(f"| {name} | | failed: {base['error']} |" + " |" * (len(modes) + 1))
            continue
        cells, fits = [], {}
        for mode in modes:
            r = by_mode[mode]
            if "error" in r:
                cells.append(f"fails ({r['error'][:60]})")
                continue
            ratio = r["seconds"] / base["seconds"]
            cells.append(f"{ratio:.1f}x, {r['peak_mb']:.0f} MB")
            if r["peak_mb"] <= args.max_memory_mb:
                fits[mode] = ratio
        defaults[name] = min(fits, key=fits.__getitem__) if fits else "-"
        print(f"| {name} | {base['trained']:,} | {base['seconds'] * 1000:.0f} | " + " | ".join(cells)
              + f" | {defaults[name]} |")
    print(f"\nDEFAULT_MODE = {json.dumps(defaults)}")
    print(f"total {time.monotonic() - t0:.0f}s")


if __name__ == "__main__":
    main()
