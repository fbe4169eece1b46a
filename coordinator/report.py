"""The run's outputs a person reads: metrics.json, its summary and a plot of the figures and ε per round."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # the coordinator has no screen
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from coordinator.history import RunHistory  # noqa: E402
from medfed.files import write_file  # noqa: E402
from models.metrics import CLASS_METRICS  # noqa: E402

#: Line styles and hollow markers of shrinking size, so lines that coincide (equal ε, equal AUC) stay visible.
_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def _atomic_write_text(path: Path, text: str) -> None:
    write_file(path, text.encode())


def summary(history: RunHistory) -> dict[str, Any]:
    """The last evaluated round: the pooled figures (per class, macro, confusion) and each site's, by name."""
    rounds = history.to_json()
    last = next((r for r in reversed(rounds) if r.get("pooled") or r["evaluate"]), None)
    if last is None:
        return {"round": None, "about": "no round was evaluated"}
    names = history.site_names()
    sites = {}
    for node, s in last["sites"].items():
        if s.get("metrics"):
            sites[names.get(node, node)] = {"macro": s["metrics"]["macro"], "per-class": s["metrics"]["per-class"],
                                            "num-examples": s["metrics"]["num-examples"]}
        elif s["evaluate"]:
            sites[names.get(node, node)] = {"macro": {k: s["evaluate"].get(k) for k in CLASS_METRICS},
                                            "num-examples": s["evaluate"].get("num-examples")}
    pooled = last.get("pooled")
    return {
        "round": last["round"],
        "pooled": None if pooled is None else {k: pooled[k] for k in ("task", "classes", "num-examples", "macro",
                                                                      "per-class", "confusion", "sites")},
        "sites": sites,
        "mean": {k: last["evaluate"].get(k) for k in CLASS_METRICS if k in last["evaluate"]},
    }


def summary_lines(history: RunHistory) -> list[str]:
    """The summary as text: pooled per-class and macro figures, each site's macro figures, the confusion."""
    doc = summary(history)
    if doc["round"] is None:
        return ["no round was evaluated"]
    heads = ("AUC", "acc", "sens", "spec", "prec", "F1", "ECE")
    width = max([len("pooled macro")] + [len(str(s)) + 2 for s in doc["sites"]]
                + [len(c) + 2 for c in (doc["pooled"] or {}).get("per-class", {})])

    def row(label: str, m: dict[str, Any], n: Any = None) -> str:
        cells = " ".join(f"{'n/a' if m.get(k) is None else format(m[k], '.3f'):>6}" for k in CLASS_METRICS)
        return f"{label:<{width}} {cells}" + ("" if n is None else f" {n:>8.0f}")

    lines = [f"round {doc['round']}: figures from the sites' noisy counts (DP); NaN/undefined shows as n/a",
             f"{'':<{width}} " + " ".join(f"{h:>6}" for h in heads) + f" {'examples':>8}"]
    pooled = doc["pooled"]
    if pooled is not None:
        lines.append(row("pooled macro", pooled["macro"], pooled["num-examples"]))
        for c, m in pooled["per-class"].items():
            lines.append(row(f"  {c}", m))
    for name, s in doc["sites"].items():
        lines.append(row(str(name), s["macro"], s.get("num-examples")))
    if pooled is not None and pooled.get("confusion") is not None:
        labels = pooled["classes"] if pooled["task"] == "multiclass" else ["negative", "positive"]
        lines.append("pooled confusion (rows: true, columns: predicted): "
                     + "; ".join(f"{lab}: " + " ".join("n/a" if v is None else f"{v:.0f}" for v in r)
                                 for lab, r in zip(labels, pooled["confusion"], strict=True)))
    return lines


def write_metrics(path: Path, history: RunHistory, run_config: dict[str, Any],
                  extra: dict[str, Any] | None = None) -> None:
    """metrics.json: per round the global metrics, the pooled per-class figures, each site's figures and ε."""
    doc: dict[str, Any] = {
        "about": (
            "Per round: 'evaluate' (and 'auc') are the example-weighted means of the sites' released macro "
            "figures; 'pooled' are the figures of the consortium's summed noisy counts, per class and macro, "
            "with the confusion matrix. 'sites' are keyed by Flower node id, each with its 'name' (from its audit "
            "anchor), status, released scalars, its per-class figures ('metrics', from its noisy counts) and its "
            "privacy spend 'epsilon' against 'epsilon_cap'. 'summary' is the last evaluated round. Every "
            "figure derives from counts with Gaussian noise (DP); null is undefined (e.g. a class absent)."
        ),
        "run_config": run_config,
        "rounds": history.to_json(),
        "summary": summary(history),
    }
    if extra:
        doc.update(extra)
    _atomic_write_text(path, json.dumps(doc, indent=2, allow_nan=False))


def _style(i: int, n: int) -> dict[str, Any]:
    """Line i of n: its own dash and hollow marker, larger for earlier lines, so coinciding lines both show."""
    return {"linestyle": _STYLES[i % len(_STYLES)], "marker": _MARKERS[i % len(_MARKERS)],
            "markersize": 4 + 2.5 * (n - 1 - i), "markerfacecolor": "none", "linewidth": 1.2 + 0.6 * (n - 1 - i),
            "alpha": 0.9}


def _series(rounds: list[dict[str, Any]], get: Any) -> tuple[list[int], list[float]]:
    pts = [(int(r["round"]), v) for r in rounds if (v := get(r)) is not None]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def plot_metrics(path: Path, history: RunHistory) -> None:
    """metrics.png: AUC per round (pooled, per site), pooled macro figures, pooled per-class AUC, ε per site."""
    rounds = history.to_json()
    names = history.site_names()
    nodes = sorted({n for r in rounds for n in r["sites"]}, key=lambda n: names.get(n, n))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax_auc, ax_macro, ax_class, ax_eps = axes.flat
    _plot_auc(ax_auc, rounds, nodes, names)
    _plot_pooled_macro(ax_macro, rounds)
    _plot_class_auc(ax_class, rounds)
    _plot_epsilon(ax_eps, rounds, nodes, names)
    _round_axes(axes.flat, rounds)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _plot_auc(ax: Any, rounds: list[dict[str, Any]], nodes: list[str], names: dict[str, str]) -> None:
    """AUC per round: the pooled macro AUC (else the mean over sites) in black, then each site's own."""
    xs, ys = _series(rounds, lambda r: (r.get("pooled") or {}).get("macro", {}).get("auc"))
    if xs:
        ax.plot(xs, ys, color="black", label="pooled (macro)", **_style(0, len(nodes) + 1))
    else:
        xs, ys = _series(rounds, lambda r: r["auc"])
        ax.plot(xs, ys, color="black", label="mean over sites", **_style(0, len(nodes) + 1))
    for i, node in enumerate(nodes):
        sx, sy = _series(rounds, lambda r, n=node: r["sites"].get(n, {}).get("evaluate", {}).get("auc"))
        if sx:
            ax.plot(sx, sy, label=names[node], **_style(i + 1, len(nodes) + 1))
    ax.set_ylabel("AUC (sites' test splits)")
    ax.set_ylim(0.0, 1.0)
    ax.set_title("AUC: pooled and per site")


def _plot_pooled_macro(ax: Any, rounds: list[dict[str, Any]]) -> None:
    """The pooled macro figures other than AUC (AUC has its own panel), one line each."""
    shown = [k for k in CLASS_METRICS if k != "auc"]
    for i, k in enumerate(shown):
        mx, my = _series(rounds, lambda r, k=k: (r.get("pooled") or {}).get("macro", {}).get(k))
        if mx:
            ax.plot(mx, my, label=k, **_style(i, len(shown)))
    ax.set_ylim(0.0, 1.0)
    ax.set_title("Pooled macro figures")


def _plot_class_auc(ax: Any, rounds: list[dict[str, Any]]) -> None:
    """The pooled AUC of each class of the last pooled round, so a class the model misses shows."""
    classes = next((r["pooled"]["classes"] for r in reversed(rounds) if r.get("pooled")), [])
    for i, c in enumerate(classes):
        cx, cy = _series(rounds, lambda r, c=c: (r.get("pooled") or {}).get("per-class", {}).get(c, {}).get("auc"))
        if cx:
            ax.plot(cx, cy, label=c, **_style(i, len(classes)))
    ax.set_ylim(0.0, 1.0)
    ax.set_title("Pooled AUC per class")


def _plot_epsilon(ax: Any, rounds: list[dict[str, Any]], nodes: list[str], names: dict[str, str]) -> None:
    """ε spent per site per round, with the site's cap (its first known one) dashed in the same colour."""
    for i, node in enumerate(nodes):
        ex, ey = _series(rounds, lambda r, n=node: r["sites"][n]["epsilon"] if n in r["sites"] else None)
        if not ex:
            continue
        line = ax.plot(ex, ey, label=names[node], **_style(i, len(nodes)))
        caps = [r["sites"][node]["epsilon_cap"] for r in rounds if node in r["sites"]]
        cap = next((c for c in caps if c is not None and not math.isnan(c)), None)
        if cap is not None:
            ax.axhline(cap, linestyle="--", color=line[0].get_color(), alpha=0.6)
    ax.set_ylabel("ε spent (dashed: cap)")
    ax.set_title("Privacy spent per site")


def _round_axes(axes: Any, rounds: list[dict[str, Any]]) -> None:
    """Every panel: x is the round, ticked at whole rounds (never 0.975), with a grid and a legend if any."""
    numbers = sorted({int(r["round"]) for r in rounds})
    for ax in axes:
        ax.set_xlabel("round")
        if numbers:
            ax.set_xlim(numbers[0] - 0.5, numbers[-1] + 0.5)
        if 0 < len(numbers) <= 20:
            ax.set_xticks(numbers)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
