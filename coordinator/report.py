"""The run's outputs a person reads: metrics.json and a plot of AUC and ε per round."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # the coordinator has no screen
import matplotlib.pyplot as plt  # noqa: E402

from coordinator.history import RunHistory  # noqa: E402
from medfed.files import write_file  # noqa: E402


def _atomic_write_text(path: Path, text: str) -> None:
    write_file(path, text.encode())


def write_metrics(path: Path, history: RunHistory, run_config: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """metrics.json: per round the global metrics (``auc``), per-site metrics and each site's ``epsilon``."""
    doc: dict[str, Any] = {
        "about": (
            "Per round: 'auc' and 'evaluate' are the global model's metrics on the sites' test splits "
            "(example-weighted mean over sites); 'sites' are keyed by Flower node id, each with its "
            "status, its own metrics and its privacy spend 'epsilon' against 'epsilon_cap'."
        ),
        "run_config": run_config,
        "rounds": history.to_json(),
    }
    if extra:
        doc.update(extra)
    _atomic_write_text(path, json.dumps(doc, indent=2, allow_nan=False))


def plot_metrics(path: Path, history: RunHistory) -> None:
    """metrics.png: global AUC per round (left) and each site's ε against its cap (right)."""
    rounds = history.to_json()
    fig, (ax_auc, ax_eps) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [r["round"] for r in rounds if r["auc"] is not None]
    ax_auc.plot(xs, [r["auc"] for r in rounds if r["auc"] is not None], marker="o", label="global AUC")
    ax_auc.set_xlabel("round")
    ax_auc.set_ylabel("AUC (sites' test splits)")
    ax_auc.set_ylim(0.0, 1.0)
    ax_auc.grid(alpha=0.3)
    ax_auc.set_title("Global model")

    nodes = sorted({n for r in rounds for n in r["sites"]})
    for i, node in enumerate(nodes):
        pts = [(r["round"], r["sites"][node]["epsilon"]) for r in rounds
               if node in r["sites"] and r["sites"][node]["epsilon"] is not None]
        if not pts:
            continue
        line = ax_eps.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"site {i + 1} (node {node[:6]})")
        caps = [r["sites"][node]["epsilon_cap"] for r in rounds if node in r["sites"]]
        cap = next((c for c in caps if c is not None and not math.isnan(c)), None)
        if cap is not None:
            ax_eps.axhline(cap, linestyle="--", color=line[0].get_color(), alpha=0.6)
    ax_eps.set_xlabel("round")
    ax_eps.set_ylabel("ε spent (dashed: cap)")
    ax_eps.grid(alpha=0.3)
    ax_eps.set_title("Privacy spent per site")
    if nodes:
        ax_eps.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
