"""Exact per-class metrics of a simulated run's final model on the sites' pooled test splits.

A run's metrics.json holds what the sites released: figures from Gaussian-noised counts, paid for in
each site's ledger, which scatter at small test splits. A benchmark may look without noise, because
the synthetic sites are ours: this scores `coordinator/model.pt` (or a round's checkpoint) on every
site's test split, exactly, and prints the per-class and macro figures (models.metrics).

    python bench/study_metrics.py SIM_DIR [--round N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from coordinator.checkpoint import load_checkpoint  # noqa: E402
from medfed.settings import RunConfig, SiteConfig  # noqa: E402
from models.evaluation import predict  # noqa: E402
from models.metrics import metrics_from_logits  # noqa: E402
from models.study import study_of  # noqa: E402
from site_client.task import site_dataset, site_network  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sim", type=Path, help="the --out folder of `medfed simulate` (or `medfed demo`)")
    parser.add_argument("--round", type=int, default=None, help="a checkpointed round instead of the final model")
    args = parser.parse_args()
    coord = args.sim / "coordinator"
    ckpt = load_checkpoint(sorted((coord / "checkpoints").glob("round-*.pt"))[-1 if args.round is None else 0]
                           if args.round is None else coord / "checkpoints" / f"round-{args.round:04d}.pt")
    study = study_of(RunConfig.from_flower(ckpt.run_config))
    state = ckpt.state_dict if args.round is not None else torch.load(coord / "model.pt", weights_only=True)
    model = site_network(study, state)
    logits, targets = [], []
    for toml in sorted((args.sim / "sites").glob("*/site.toml")):
        site = SiteConfig.from_toml(toml)
        z, y = predict(model, site_dataset(site, study, "test"))
        logits.append(np.asarray(z))
        targets.append(np.asarray(y))
    report = metrics_from_logits(np.concatenate(logits), np.concatenate(targets), study).to_json()
    names = ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "calibration-error")
    print(f"# {study.name}: {study.task}, {len(study.classes)} classes, {int(report['num-examples'])} test images "
          f"pooled over {len(logits)} sites, round {ckpt.round if args.round else 'final'}")
    print(f"{'class':<14}" + "".join(f"{n:>19}" for n in names))
    for cls, row in [*report["per-class"].items(), ("macro", report["macro"])]:
        print(f"{cls:<14}" + "".join(f"{'n/a' if row.get(n) is None else format(row[n], '.3f'):>19}" for n in names))
    if report.get("confusion"):
        print("confusion (rows: truth, columns: decision):", report["confusion"])


if __name__ == "__main__":
    main()
