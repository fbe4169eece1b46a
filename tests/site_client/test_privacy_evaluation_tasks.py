"""DP evaluation of multiclass and multilabel studies: sensitivity, its price, and the pooled figures.

One example moves one count in each class's with/without histogram (and, multiclass, one confusion cell),
so the ledger must charge σ / √(K+1) (multiclass) or σ / √K (multilabel), not σ: pricing the release as
sensitivity 1 would understate its ε.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn
from torch.utils.data import TensorDataset

from anonymization.audit.anchors import ANCHOR_RECORD, anchor_fields
from coordinator.history import RunHistory
from coordinator.report import plot_metrics, summary_lines, write_metrics
from coordinator.strategy import build_strategy
from medfed.settings import RunConfig, SiteConfig
from models.accounting import epsilon_of_history, gaussian_epsilon
from models.metrics import COUNT_KEYS, binned_counts, compute_metrics, metrics_from_counts, probabilities
from models.study import Study
from site_client.dp_evaluation import (
    RELEASED_METRICS,
    evaluation_segment,
    metrics_from_histograms,
    noisy_histograms,
    release_counts,
    sensitivity,
)
from site_client.egress import EVALUATE_METRICS, check_reply
from site_client.task import evaluate_round, ledger_for
from tests.grid_factory import Sites
from tests.models_factory import signal_logits

MULTICLASS = Study(task="multiclass", classes=("normal", "benign", "malignant"))
MULTILABEL = Study(task="multilabel", classes=("effusion", "nodule"))
BINARY = Study()
CFG = RunConfig().with_overrides(image_size=16, num_server_rounds=3)
pytestmark = pytest.mark.usefixtures("task_identity")


def _scores(study: Study, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return signal_logits(study, n, seed, shift=(1.0, 1.5, 1.5))


def _vector(counts: object) -> np.ndarray:
    c = counts  # BinnedCounts
    parts = [c.with_class.ravel(), c.without_class.ravel()]  # type: ignore[attr-defined]
    if c.confusion is not None:  # type: ignore[attr-defined]
        parts.append(c.confusion.ravel())  # type: ignore[attr-defined]
    return np.concatenate(parts)


@pytest.mark.parametrize(("study", "expected"), [(BINARY, 1.0), (MULTICLASS, 2.0), (MULTILABEL, math.sqrt(2))],
                         ids=lambda v: getattr(v, "task", str(v)))
def test_one_example_moves_the_release_by_its_sensitivity(study: Study, expected: float) -> None:
    """Add/remove one example: the released count vector moves by exactly sensitivity(study) in L2."""
    assert sensitivity(study) == pytest.approx(expected)
    logits, y = _scores(study, 120, seed=2)
    full = _vector(release_counts(logits, y, study))
    for i in range(0, 120, 13):
        keep = np.arange(120) != i
        assert np.linalg.norm(full - _vector(release_counts(logits[keep], y[keep], study))) == pytest.approx(expected)


class _Net(nn.Module):
    """A tiny K-output network standing in for the study's (models.evaluation.predict runs it for real)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.fc = nn.Linear(16, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _split(study: Study, n: int, seed: int) -> tuple[TensorDataset, dict[str, torch.Tensor]]:
    """A test split whose targets the model below partly predicts, and that model's state."""
    g = torch.Generator().manual_seed(seed)
    k = len(study.classes)
    x = torch.randn(n, 1, 4, 4, generator=g)
    w = torch.randn(k, 16, generator=g)
    scores = x.flatten(1) @ w.T + 1.5 * torch.randn(n, k, generator=g)
    y = scores.argmax(1) if study.task == "multiclass" else (scores > 0).float()
    torch.manual_seed(0)
    net = _Net(k)
    net.fc.weight.data = w.clone() * 0.5
    net.fc.bias.data.zero_()
    return TensorDataset(x, y), {k_: v.clone() for k_, v in net.state_dict().items()}


def _site(tmp_path: Path, name: str, noise: float = 1.0) -> SiteConfig:
    return SiteConfig(name=name, data_dir=tmp_path, state_dir=tmp_path / name / "state",
                      audit_dir=tmp_path / name / "audit", epsilon_cap=1000.0, delta=1e-5, evaluation_noise=noise)


@pytest.mark.adversarial
@pytest.mark.parametrize("study", [MULTICLASS, MULTILABEL], ids=lambda s: s.task)
def test_the_ledger_charges_the_study_sensitivity(tmp_path: Path, study: Study) -> None:
    """Priced as sensitivity 1, a K-class release would claim ε(1/σ) for what is really ε(√(K(+1))/σ)."""
    data, state = _split(study, 40, seed=1)
    site = _site(tmp_path, "hospital-m", noise=10.0)
    out = evaluate_round(site, CFG, "run-k", state, 1, study=study, build=lambda: _Net(len(study.classes)),
                         dataset=data)
    sigma, delta = site.evaluation_noise, site.delta
    assert ledger_for(site).history("run-k") == [(sigma / sensitivity(study), 1.0, 1)] == [
        evaluation_segment(sigma, study)]
    true_eps = gaussian_epsilon(sensitivity(study) / sigma, delta)
    assert out["epsilon"] == pytest.approx(true_eps, rel=1e-2)
    assert out["epsilon"] > 1.3 * gaussian_epsilon(1.0 / sigma, delta)  # what sensitivity 1 would have charged
    (row,) = ledger_for(site).rounds("run-k")
    assert row["noise_multiplier"] == pytest.approx(sigma / sensitivity(study))
    # the same model and study again: the same release, no new spend
    again = evaluate_round(site, CFG, "run-k", state, 2, study=study, build=lambda: _Net(len(study.classes)),
                           dataset=data)
    assert again["histogram-with"] == out["histogram-with"]
    assert ledger_for(site).epsilon("run-k", delta) == pytest.approx(epsilon_of_history(
        [evaluation_segment(sigma, study)], delta))


def test_calibration_reserves_evaluations_at_the_study_price(tmp_path: Path) -> None:
    from site_client.task import evaluations_reserved

    site = _site(tmp_path, "hospital-r", noise=10.0)
    ledger = ledger_for(site)
    assert evaluations_reserved(site, CFG, ledger, "run-r", MULTICLASS) == [(5.0, 1.0, 3)]
    assert evaluations_reserved(site, CFG, ledger, "run-r") == [(10.0, 1.0, 3)]


@pytest.mark.parametrize("study", [BINARY, MULTICLASS, MULTILABEL], ids=lambda s: s.task)
def test_released_figures_converge_to_the_exact_ones_as_noise_vanishes(study: Study) -> None:
    logits, y = _scores(study, 600, seed=5)
    p = probabilities(logits, study.task)
    binned = metrics_from_counts(binned_counts(p, y, study), study).flat()
    exact = compute_metrics(p, y, study).flat()
    errors = []
    for noise in (10.0, 1.0, 1e-6):  # seeded: a tail draw must not decide the test
        noisy = noisy_histograms(logits, y, noise, np.random.default_rng(7), study=study)
        released = metrics_from_histograms(noisy, study)
        assert set(released) == set(RELEASED_METRICS) and set(released) < EVALUATE_METRICS
        errors.append(max(abs(released[k] - binned[k]) for k in binned))  # type: ignore[operator]
    assert errors[2] < 1e-4 < errors[1] < errors[0]  # the error shrinks with the noise
    for k in ("auc", "calibration-error"):  # binning costs little against the exact figures
        assert released[k] == pytest.approx(exact[k], abs=0.03)
    for k in ("accuracy", "sensitivity", "specificity", "precision", "f1"):
        assert released[k] == pytest.approx(exact[k], abs=1e-5)


def _evaluate(strategy: Any, *nodes: int) -> list[Message]:
    """The evaluate messages the coordinator's strategy sends to ``nodes``, in that order."""
    messages = strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), Sites(*nodes))
    sent = {m.metadata.dst_node_id: m for m in messages}
    return [sent[n] for n in nodes]


def _reply(metrics: dict[str, object], site: str, to: Message) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics),  # type: ignore[arg-type]
                          ANCHOR_RECORD: ConfigRecord(anchor_fields(site, 3, "cd" * 32))})
    check_reply(content, "evaluate", None)  # what the site's egress guard lets out
    return Message(content=content, reply_to=to)


@pytest.mark.parametrize("study", [MULTICLASS, MULTILABEL], ids=lambda s: s.task)
def test_round_trip_from_site_evaluation_to_pooled_figures(tmp_path: Path, study: Study) -> None:
    """Three sites evaluate for real; the coordinator pools their noisy counts into per-class figures."""
    k = len(study.classes)
    names = ("hospital-a", "hospital-b", "hospital-c")
    splits = [_split(study, 150, seed=s) for s in (11, 12, 13)]
    state = splits[0][1]
    history = RunHistory()
    strategy = build_strategy(CFG, history, study)
    sent = _evaluate(strategy, 7, 8, 9)
    replies, exact = [], None
    for name, (data, _), msg in zip(names, splits, sent, strict=True):
        site = _site(tmp_path, name, noise=0.05)
        metrics = evaluate_round(site, CFG, "run-p", state, 1, study=study, build=lambda: _Net(k), dataset=data)
        replies.append(_reply(metrics, name, msg))
        x, y = data.tensors
        counts = binned_counts(probabilities(_logits(state, x, k), study.task), y.numpy(), study)
        exact = counts if exact is None else exact + counts
    mean = strategy.aggregate_evaluate(1, replies)
    assert mean is not None and not any(key in mean for key in COUNT_KEYS)  # the mean is of scalars only
    rec = history.to_json()[0]
    pooled = rec["pooled"]
    assert pooled["sites"] == list(names) and pooled["classes"] == list(study.classes)
    truth = metrics_from_counts(exact, study).to_json()  # the pool of the exact counts
    assert pooled["num-examples"] == pytest.approx(450, abs=1)
    for c in study.classes:
        for key in ("auc", "sensitivity", "specificity", "precision", "f1", "accuracy", "calibration-error"):
            assert pooled["per-class"][c][key] == pytest.approx(truth["per-class"][c][key], abs=0.01), (c, key)
    if study.task == "multiclass":
        assert np.allclose(pooled["confusion"], truth["confusion"], atol=1.0)
        assert len(pooled["confusion"]) == k
    # per site: named, its own per-class figures from its own counts, no raw counts kept in its scalars
    for node, name in zip(("7", "8", "9"), names, strict=True):
        site = rec["sites"][node]
        assert site["name"] == name and set(site["metrics"]["per-class"]) == set(study.classes)
        assert not set(site["evaluate"]) & set(COUNT_KEYS)
    write_metrics(tmp_path / "metrics.json", history, {})
    plot_metrics(tmp_path / "metrics.png", history)
    text = "\n".join(summary_lines(history))
    assert all(n in text for n in names) and all(c in text for c in study.classes) and "pooled macro" in text
    assert (tmp_path / "metrics.png").stat().st_size > 0


def _logits(state: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> np.ndarray:
    net = _Net(k)
    net.load_state_dict(state)
    with torch.no_grad():
        return net(x).numpy()


@pytest.mark.adversarial
def test_a_site_whose_counts_do_not_fit_the_study_is_not_pooled(tmp_path: Path) -> None:
    """A hostile site sending counts of another shape is left out of the pool, with the reason kept."""
    history = RunHistory()
    strategy = build_strategy(CFG, history, MULTICLASS)
    sent = _evaluate(strategy, 7, 8)
    data, state = _split(MULTICLASS, 60, seed=3)
    good = evaluate_round(_site(tmp_path, "hospital-a"), CFG, "run-h", state, 1, study=MULTICLASS,
                          build=lambda: _Net(3), dataset=data)
    bad = {**good, "confusion": [1.0] * 4}
    strategy.aggregate_evaluate(1, [_reply(good, "hospital-a", sent[0]), _reply(bad, "hospital-b", sent[1])])
    rec = history.to_json()[0]
    assert rec["pooled"]["sites"] == ["hospital-a"]
    assert "'confusion' must be a list of 9 counts" in rec["sites"]["8"]["evaluate_error"]


def test_the_plot_names_sites_and_ticks_whole_rounds(tmp_path: Path) -> None:
    """Operators asked: sites by name, not node id; integer rounds; coinciding lines both visible."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    history = RunHistory()
    for rnd in (1, 2, 3):
        for node, name in (("123456789", "hospital-a"), ("987654321", "hospital-b")):
            s = history.round(rnd).site(node)
            s.name, s.evaluate = name, {"auc": 0.7, "epsilon": 0.5 * rnd, "epsilon-cap": 8.0}  # identical lines
    captured: dict[str, object] = {}
    real_close = plt.close
    plt.close = lambda fig=None: captured.setdefault("fig", fig)  # type: ignore[assignment]
    try:
        plot_metrics(tmp_path / "metrics.png", history)
    finally:
        plt.close = real_close
    fig = captured["fig"]
    ax_auc, _, _, ax_eps = fig.axes  # type: ignore[attr-defined]
    assert [t.get_text() for t in ax_eps.get_legend().get_texts()] == ["hospital-a", "hospital-b"]
    assert list(ax_eps.get_xticks()) == [1, 2, 3]
    lines = [ln for ln in ax_eps.get_lines() if ln.get_label().startswith("hospital")]
    styles = {(ln.get_linestyle(), ln.get_marker(), ln.get_markersize()) for ln in lines}
    assert len(styles) == 2 and all(ln.get_markerfacecolor() == "none" for ln in lines)
    real_close(fig)
