"""What privacy and federation cost in accuracy: AUC per method, on synthetic hospitals.

Four `medfed synth` hospitals: three train (sizes 10:5:2, different scanners and
prevalence), the fourth is held out as an *unseen* site. Every method trains the
consortium's network for the same number of epochs over its data (rounds x
local epochs), with the same optimizer, batch size and per-round learning rate
(the run config's schedule), the optimizer's state kept from round to round:

* local-only, per site, without DP and with DP-SGD at epsilon 8: each site alone;
* pooled (no DP) and pooled DP-SGD at epsilon 8: all three sites' training images in one place
  (what federation tries to approach without moving data);
* FedAvg (no DP): an in-process FedAvg loop (weighted by examples, like Flower's
  FedAvg; each site keeps its Adam state across rounds, as the ClientApp does);
  the ClientApp itself refuses to train without DP, by design;
* FedAvg with record-level DP at epsilon 1, 3 and 8 (delta 1e-5): the real ServerApp and
  ClientApp in Flower's Simulation Engine, each site calibrating its own noise to
  its cap over the run (`calibrate-noise`), its ledger accounting every step.

AUC is reported on each site's test split, on the pooled test splits, and on all
images of the unseen site. The goal lines compare on the pooled test splits, for
FedAvg + DP on the mean of ``--goal-repeats`` runs at ε = 8: its noise is unseeded,
as at a real site, and one run's AUC moves by several hundredths with the noise alone.

    .venv/bin/python bench/utility.py [--work DIR] [--patients 2000] [--rounds 20]
                                      [--local-epochs 2] [--batch-size 256] [--lr 0.01]
                                      [--goal-repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

import torch  # noqa: E402
from torch.utils.data import ConcatDataset, Dataset, TensorDataset  # noqa: E402

from medfed import logs  # noqa: E402
from medfed.demo import prepare_sites, simulate  # noqa: E402
from medfed.settings import RunConfig, SiteConfig  # noqa: E402
from models.accounting import calibrate_noise, epsilon  # noqa: E402
from models.dataset import ManifestDataset  # noqa: E402
from models.evaluation import evaluate  # noqa: E402
from models.network import build_model  # noqa: E402
from models.training import LR_SCHEDULES, DPSettings, planned_steps, round_lr, train_local  # noqa: E402

DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0)
GOAL_EPSILON = 8.0  # the goals are stated at this ε
NOISE_FLOOR = RunConfig().noise_multiplier  # calibration never goes below this sigma
UNSEEN = "unseen"


def prepare(work: Path, patients: int, seed: int) -> tuple[list[SiteConfig], SiteConfig]:
    """Synthesize and de-identify four hospitals; move the fourth out of the federation."""
    marker = work / "prepared.json"
    recipe = {"patients": patients, "seed": seed, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        print(f"reusing prepared sites in {work}", flush=True)
    else:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        t = time.monotonic()
        prepare_sites(work, sites=4, patients=patients, seed=seed, epsilon_caps=[8.0] * 4, delta=DELTA,
                      workers=2, progress=False)
        held_out = sorted((work / "sites").iterdir())[-1]
        (work / UNSEEN).mkdir()
        shutil.move(str(held_out), work / UNSEEN / held_out.name)
        marker.write_text(json.dumps(recipe))
        print(f"prepared 4 hospitals in {time.monotonic() - t:.0f}s", flush=True)
    sites = [SiteConfig.from_toml(p / "site.toml") for p in sorted((work / "sites").iterdir())]
    unseen_dir = next((work / UNSEEN).iterdir())
    # the unseen site's paths moved with it: read its store from where it is now
    unseen = SiteConfig.from_toml(unseen_dir / "site.toml").model_copy(update={"data_dir": unseen_dir / "deid"})
    return sites, unseen


def tensors(data_dir: Path, split: str, size: int) -> TensorDataset:
    """A site's split, decoded once (the transforms are the dataset's own)."""
    ds = ManifestDataset(data_dir, split=split, image_size=size)  # type: ignore[arg-type]
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    ys = torch.tensor([float(ds[i][1]) for i in range(len(ds))])
    return TensorDataset(xs, ys)


def dp_sigma(n: int, batch: int, epochs: int, eps: float) -> float:
    """Noise multiplier that spends exactly ``eps`` over ``epochs`` epochs (one segment)."""
    steps, q = planned_steps(n, batch, epochs)
    return calibrate_noise((), q, steps, 1, eps, DELTA, "rdp", floor=NOISE_FLOOR)


def train_alone(data: Dataset, args: argparse.Namespace, epochs: int, eps: float | None, seed: int) -> torch.nn.Module:
    """One model on one dataset for ``epochs`` epochs, optionally DP-SGD at ``eps``.

    Trained in ``args.rounds`` chunks of ``args.local_epochs`` epochs with the run's
    per-round learning rate and one optimizer state throughout, so it sees exactly
    the schedule a federated site sees; with DP, one σ over all chunks spends ``eps``.
    """
    torch.manual_seed(seed)
    model = build_model(args.image_size)
    dp = None
    if eps is not None:
        dp = DPSettings(dp_sigma(len(data), args.batch_size, epochs, eps), args.max_grad_norm)  # type: ignore[arg-type]
    state: dict = {}
    for rnd in range(1, args.rounds + 1):
        train_local(model, data, epochs=args.local_epochs, batch_size=args.batch_size,
                    lr=round_lr(args.lr, rnd, args.rounds, args.lr_schedule), optimizer=args.optimizer,
                    optimizer_state=state, dp=dp, seed=seed * 10_000 + rnd)
    return model


def fedavg_in_process(train: list[TensorDataset], args: argparse.Namespace, seed: int, eps: float | None = None,
                      after_round: Callable[[int, dict[str, torch.Tensor]], None] | None = None) -> torch.nn.Module:
    """FedAvg in one process: each round every site trains from the global model; weighted mean.

    Without ``eps`` it is the table's plain FedAvg. With ``eps`` each site runs DP-SGD
    with one σ calibrated to spend ``eps`` over the whole run, as the ClientApp does
    (same `train_local`, same calibration), but with seeded noise so that recipes can
    be compared draw for draw (`bench/dp_recipe.py`). ``after_round(r, state)`` sees
    each round's global state.
    """
    torch.manual_seed(seed)
    global_state = build_model(args.image_size).state_dict()
    weights = [len(d) for d in train]
    epochs = args.rounds * args.local_epochs
    dps = [None if eps is None else DPSettings(dp_sigma(len(d), args.batch_size, epochs, eps), args.max_grad_norm)
           for d in train]
    optimizer_states: list[dict] = [{} for _ in train]  # each site keeps its own, as the ClientApp does
    for rnd in range(args.rounds):
        states = []
        for i, data in enumerate(train):
            model = build_model(args.image_size)
            model.load_state_dict(global_state)
            train_local(model, data, epochs=args.local_epochs, batch_size=args.batch_size,
                        lr=round_lr(args.lr, rnd + 1, args.rounds, args.lr_schedule),
                        optimizer=args.optimizer, optimizer_state=optimizer_states[i], dp=dps[i],
                        seed=seed * 10_000 + rnd * 100 + i)
            states.append(model.state_dict())
        global_state = {k: sum(w * s[k].float() for w, s in zip(weights, states, strict=True)) / sum(weights)
                        for k in global_state}
        if after_round is not None:
            after_round(rnd + 1, global_state)
    model = build_model(args.image_size)
    model.load_state_dict(global_state)
    return model


def fedavg_flower(work: Path, sites: list[SiteConfig], args: argparse.Namespace, eps: float,
                  repeat: int = 1) -> tuple[torch.nn.Module, dict]:
    """FedAvg with record-level DP at every site (cap ``eps``), through the real Flower apps."""
    for site in sites:  # each site's cap is its privacy officer's: here the same for all
        capped = site.model_copy(update={"epsilon_cap": eps})
        (site.data_dir.parent / "site.toml").write_text(capped.to_toml())
    out = work / (f"fedavg-dp-eps{eps:g}" + (f"-{repeat}" if repeat > 1 else ""))
    if out.exists():
        shutil.rmtree(out)
    cfg = RunConfig().with_overrides(
        num_server_rounds=args.rounds,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        optimizer=args.optimizer,
        max_grad_norm=args.max_grad_norm,
        noise_multiplier=NOISE_FLOOR,
        calibrate_noise=True,
        keep_optimizer_state=True,
        image_size=args.image_size,
        demo_dir=str(work),
        out_dir=str(out),
        min_train_nodes=len(sites),
        min_evaluate_nodes=len(sites),
        min_available_nodes=len(sites),
        fraction_evaluate=0.0 if args.no_round_eval else 1.0,
        seed=args.seed,
        run_name=f"utility-eps{eps:g}-{time.time_ns()}",  # a fresh account in each site's ledger
    )
    simulate(cfg, len(sites))
    model = build_model(args.image_size)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    metrics = json.loads((out / "metrics.json").read_text())
    last = metrics["rounds"][-1]["sites"]
    spent = {"epsilon": [s["train"].get("epsilon") for s in last.values()],
             "noise-multiplier": [s["train"].get("noise-multiplier") for s in last.values()],
             "trained": [sum(1 for r in metrics["rounds"] if r["sites"].get(k, {}).get("status") == "trained")
                         for k in last]}
    return model, spent


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """The training recipe's options, defaulting to the run config's: what a consortium gets without tuning."""
    run = RunConfig()
    parser.add_argument("--rounds", type=int, default=run.num_server_rounds)
    parser.add_argument("--local-epochs", type=int, default=run.local_epochs)
    parser.add_argument("--batch-size", type=int, default=run.batch_size)
    parser.add_argument("--lr", type=float, default=run.lr)
    parser.add_argument("--lr-schedule", default=run.lr_schedule, choices=LR_SCHEDULES)
    parser.add_argument("--optimizer", default=run.optimizer, choices=("sgd", "adam"))
    parser.add_argument("--max-grad-norm", type=float, default=run.max_grad_norm)
    parser.add_argument("--image-size", type=int, default=run.image_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one); "
                        "prepared sites are reused when the recipe matches")
    parser.add_argument("--patients", type=int, default=2000, help="patients at the largest site")
    add_recipe_args(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS))
    parser.add_argument("--goal-repeats", type=int, default=3, help="FedAvg + DP runs at the goal's ε (8): the noise "
                        "is unseeded, as in production, so one run is one draw; the goal is judged on their mean")
    parser.add_argument("--no-round-eval", action="store_true", help="skip per-round federated evaluation (faster)")
    args = parser.parse_args()
    logs.setup(False)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.monotonic()
    work = (args.work or Path(tempfile.mkdtemp(prefix="medfed-utility-"))).resolve()
    sites, unseen = prepare(work, args.patients, args.seed)
    epochs = args.rounds * args.local_epochs
    size = args.image_size

    train = [tensors(s.data_dir, "train", size) for s in sites]
    tests = {s.name: tensors(s.data_dir, "test", size) for s in sites}
    evals: dict[str, Dataset] = dict(tests)
    evals["pooled"] = ConcatDataset(list(tests.values()))
    evals[UNSEEN] = tensors(unseen.data_dir, "all", size)
    print("training images " + ", ".join(f"{s.name} {len(d)}" for s, d in zip(sites, train, strict=True))
          + f"; test {', '.join(f'{k} {len(v)}' for k, v in evals.items())}", flush=True)

    rows: list[tuple[str, str, dict[str, float], float]] = []

    def score(method: str, eps: str, model: torch.nn.Module, t: float) -> dict[str, float]:
        aucs = {k: float(evaluate(model, d)["auc"]) for k, d in evals.items()}
        rows.append((method, eps, aucs, time.monotonic() - t))
        print(f"  {method:<24} eps {eps:>4}  pooled AUC {aucs['pooled']:.3f}  unseen {aucs[UNSEEN]:.3f}  "
              f"({time.monotonic() - t:.0f}s)", flush=True)
        return aucs

    local_rows = []
    for s, data in zip(sites, train, strict=True):
        t = time.monotonic()
        local_rows.append(score(f"local-only {s.name}", "-", train_alone(data, args, epochs, None, args.seed), t))
    local_dp_rows = []
    for s, data in zip(sites, train, strict=True):
        t = time.monotonic()
        local_dp_rows.append(score(f"local-only DP {s.name}", "8", train_alone(data, args, epochs, 8.0, args.seed), t))
    t = time.monotonic()
    pooled = score("pooled", "-", train_alone(ConcatDataset(train), args, epochs, None, args.seed), t)
    t = time.monotonic()
    pooled_dp = score("pooled DP", "8", train_alone(ConcatDataset(train), args, epochs, 8.0, args.seed), t)
    t = time.monotonic()
    score("FedAvg", "-", fedavg_in_process(train, args, args.seed), t)
    fed: dict[float, list[dict[str, float]]] = {}
    spends: dict[str, dict] = {}
    for eps in (float(e) for e in args.epsilons.split(",")):
        repeats = max(1, args.goal_repeats) if eps == GOAL_EPSILON else 1
        for i in range(repeats):
            t = time.monotonic()
            model, spent = fedavg_flower(work, sites, args, eps, i + 1)
            label = f"{eps:g}" if repeats == 1 else f"{eps:g} #{i + 1}"
            fed.setdefault(eps, []).append(score("FedAvg + DP (Flower)", label, model, t))
            spends[label] = spent

    cols = [s.name for s in sites] + ["pooled", UNSEEN]
    print()
    print(
        f"AUC, {len(sites)} sites + 1 unseen, {args.patients} patients at the largest site, {size}x{size}, "
        f"{args.rounds} rounds x {args.local_epochs} local epochs (= {epochs} epochs everywhere), batch "
        f"{args.batch_size}, {args.optimizer} lr {args.lr:g} ({args.lr_schedule} over the rounds), "
        f"clip {args.max_grad_norm:g}, delta {DELTA:g}"
    )
    print("| method | ε | " + " | ".join(cols) + " | seconds |")
    print("|---|---|" + "---|" * len(cols) + "---|")
    for method, eps, aucs, secs in rows:
        print(f"| {method} | {eps} | " + " | ".join(f"{aucs[c]:.3f}" for c in cols) + f" | {secs:.0f} |")
    mean_local = statistics.mean(r["pooled"] for r in local_rows)
    summaries = [("local-only, mean of sites", "-", local_rows), ("local-only DP, mean of sites", "8", local_dp_rows)]
    if len(fed.get(GOAL_EPSILON, [])) > 1:
        summaries.append((f"FedAvg + DP (Flower), mean of {len(fed[GOAL_EPSILON])} runs", f"{GOAL_EPSILON:g}",
                          fed[GOAL_EPSILON]))
    for label, eps_label, group in summaries:
        print(f"| {label} | {eps_label} | " + " | ".join(
            f"{statistics.mean(r[c] for r in group):.3f}" for c in cols) + " | |")
    for eps, spent in spends.items():
        print(f"FedAvg + DP at ε={eps}: sites' ε spent {[round(e, 3) for e in spent['epsilon'] if e is not None]}, "
              f"σ of the last round {[round(s, 3) for s in spent['noise-multiplier'] if s is not None]}, "
              f"rounds trained {spent['trained']}")
    n_pooled = sum(len(d) for d in train)
    steps, q = planned_steps(n_pooled, args.batch_size, epochs)
    sigma = dp_sigma(n_pooled, args.batch_size, epochs, 8.0)
    print(f"pooled DP: σ {sigma:.3f}, q {q:.4f}, {steps} steps, ε {epsilon(q, sigma, steps, DELTA):.3f}")
    if GOAL_EPSILON in fed:
        runs = [r["pooled"] for r in fed[GOAL_EPSILON]]
        fed_auc = statistics.mean(runs)
        spread = (f" (mean of {len(runs)} runs: {', '.join(f'{r:.3f}' for r in runs)}; "
                  f"sd {statistics.stdev(runs):.3f})" if len(runs) > 1 else "")
        gap = pooled["pooled"] - fed_auc
        print(f"goal: FedAvg+DP ε=8 within 0.03 AUC of pooled non-private: {fed_auc:.3f}{spread} vs "
              f"{pooled['pooled']:.3f} (gap {gap:+.3f}) -> {'met' if gap <= 0.03 else 'MISSED'}")
        print(f"goal: FedAvg+DP ε=8 above the mean local-only AUC: {fed_auc:.3f} vs {mean_local:.3f} -> "
              f"{'met' if fed_auc > mean_local else 'MISSED'}")
    print(f"pooled DP ε=8 vs pooled: {pooled_dp['pooled']:.3f} vs {pooled['pooled']:.3f}")
    print(f"total {time.monotonic() - t0:.0f}s; work folder {work}")


if __name__ == "__main__":
    main()
