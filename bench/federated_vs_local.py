"""Federated (DP FedAvg) against local-only training with the same privacy budget.

Prints three AUCs on the pooled test splits of all sites: the federated model,
the mean of the local-only models and the best local-only model. Each local
model uses the same DP-SGD settings and the same number of local steps as the
site did in the federation, so it spends the same ε.

    .venv/bin/python bench/federated_vs_local.py [--out DIR] [--rounds R] [--patients P]
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
from medfed.demo import run_demo
from medfed.settings import RunConfig, SiteConfig
from models.dataset import ManifestDataset
from models.evaluation import evaluate
from models.network import build_model
from models.training import DPSettings, train_local
from opacus.accountants import RDPAccountant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epsilon-cap", type=float, default=10.0)
    args = parser.parse_args()
    logs.setup(False)

    out = args.out or Path(tempfile.mkdtemp(prefix="medfed-bench-"))
    if out.exists():
        shutil.rmtree(out)
    t0 = time.monotonic()
    summary = run_demo(out, sites=3, rounds=args.rounds, patients=args.patients, seed=args.seed,
                       epsilon_caps=[args.epsilon_cap] * 3, progress=False)
    cfg = RunConfig().with_overrides(seed=args.seed)
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
        accountant = RDPAccountant()
        train_local(model, ManifestDataset(site.data_dir, "train", cfg.image_size),
                    epochs=cfg.local_epochs * outcome.rounds_trained, batch_size=cfg.batch_size, lr=cfg.lr,
                    dp=DPSettings(cfg.noise_multiplier, cfg.max_grad_norm), accountant=accountant, seed=args.seed)
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
