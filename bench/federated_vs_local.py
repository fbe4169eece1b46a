"""Federated (DP FedAvg) against local-only training with the same privacy budget.

Prints three AUCs on the pooled test splits of all sites: the federated model,
the mean of the local-only models and the best local-only model. Each local
model trains as many local epochs as its site did in the federation, with the
same optimizer and batch, and DP-SGD noise calibrated to spend exactly the ε
that site spent in the federation — the same privacy budget.

    .venv/bin/python bench/federated_vs_local.py [--out DIR] [--rounds R] [--patients P]
    .venv/bin/python bench/federated_vs_local.py --reuse demo-out   # a finished `make demo`
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset

from medfed import logs
from medfed.demo import DemoSummary, run_demo, site_outcome
from medfed.settings import RunConfig, SiteConfig
from models.accounting import calibrate_noise, make_accountant
from models.dataset import ManifestDataset
from models.evaluation import evaluate
from models.network import build_model
from models.training import DPSettings, planned_steps, round_lr, train_local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="a finished demo folder (default run config) to measure instead of running one")
    parser.add_argument("--rounds", type=int, default=RunConfig().num_server_rounds)
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epsilon-cap", type=float, default=8.0)
    args = parser.parse_args()
    logs.setup(False)

    t0 = time.monotonic()
    if args.reuse is not None:
        out = args.reuse.resolve()
        if not (out / "coordinator" / "model.pt").exists():
            raise SystemExit(f"{out} holds no finished demo (no coordinator/model.pt); run `make demo` first")
        metrics = json.loads((out / "coordinator" / "metrics.json").read_text())
        sites = [SiteConfig.from_toml(p / "site.toml") for p in sorted((out / "sites").iterdir())]
        summary = DemoSummary(out=out, rounds=metrics["rounds"], sites=[site_outcome(s) for s in sites],
                              model=out / "coordinator" / "model.pt", metrics=out / "coordinator" / "metrics.json",
                              plot=out / "coordinator" / "metrics.png", wall_seconds=0.0, simulation_seconds=0.0)
    else:
        out = args.out or Path(tempfile.mkdtemp(prefix="medfed-bench-"))
        if out.exists():
            shutil.rmtree(out)
        summary = run_demo(out, sites=3, rounds=args.rounds, patients=args.patients, seed=args.seed,
                           epsilon_caps=[args.epsilon_cap] * 3, progress=False)
    cfg = RunConfig.from_flower({}, RunConfig().with_overrides(seed=args.seed))
    sites = [SiteConfig.from_toml(p / "site.toml") for p in sorted((out / "sites").iterdir())]
    pooled_test = ConcatDataset([ManifestDataset(s.data_dir, "test", cfg.image_size) for s in sites])

    fed = build_model(cfg.image_size)
    fed.load_state_dict(torch.load(summary.model, weights_only=True))
    fed_auc = evaluate(fed, pooled_test)["auc"]

    local_aucs: dict[str, float] = {}
    local_eps: dict[str, float] = {}
    for site, outcome in zip(sites, summary.sites, strict=True):
        torch.manual_seed(args.seed)
        model = build_model(cfg.image_size)
        data = ManifestDataset(site.data_dir, "train", cfg.image_size)
        epochs = cfg.local_epochs * max(1, outcome.rounds_trained)
        steps, q = planned_steps(len(data), cfg.batch_size, epochs)
        sigma = calibrate_noise((), q, steps, 1, outcome.epsilon, site.delta, cfg.accountant, floor=0.05)
        accountant = make_accountant(cfg.accountant)
        state: dict = {}  # one optimizer throughout, and the run's per-round learning rate, as in the federation
        for rnd in range(1, max(1, outcome.rounds_trained) + 1):
            train_local(model, data, epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                        lr=round_lr(cfg.lr, rnd, max(1, outcome.rounds_trained), cfg.lr_schedule),
                        optimizer=cfg.optimizer, optimizer_state=state, dp=DPSettings(sigma, cfg.max_grad_norm),
                        accountant=accountant, seed=args.seed * 10_000 + rnd)
        local_aucs[site.name] = evaluate(model, pooled_test)["auc"]
        local_eps[site.name] = accountant.get_epsilon(site.delta)

    print(json.dumps({"federated_eps": {o.name: round(o.epsilon, 3) for o in summary.sites},
                      "local_eps": {k: round(v, 3) for k, v in local_eps.items()},
                      "local_auc": {k: round(v, 4) for k, v in local_aucs.items()},
                      "seconds": round(time.monotonic() - t0, 1)}, indent=1))
    print(f"pooled-test AUC  federated {fed_auc:.4f}  local-only mean {statistics.mean(local_aucs.values()):.4f}  "
          f"local-only best {max(local_aucs.values()):.4f}")


if __name__ == "__main__":
    main()
