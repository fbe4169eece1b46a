"""Evaluation is a DP release: noisy score histograms, paid for in the ledger before release, once per model.

The attack it answers: a coordinator sends crafted models (every logit +50, then -50) and reads the
site's exact positive count off accuracy x num-examples. Every released figure now comes from
histograms with Gaussian noise, and each evaluation costs ε that the site's caps bound.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from coordinator.federation import initial_state
from medfed.protocol import SITE_REFUSED
from medfed.settings import DEFAULT_EVALUATION_NOISE, RunConfig, SiteConfig
from medfed.wire import pack
from models.accounting import calibrate_noise, epsilon_of_history, gaussian_epsilon
from models.dataset import ManifestDataset
from models.evaluation import evaluate
from models.network import build_model
from site_client.client_app import build_app
from site_client.dp_evaluation import (
    FIRST_POSITIVE_BIN,
    NUM_BINS,
    RELEASED_SCALARS,
    STORE_DIR,
    NoisyHistograms,
    histograms,
    metrics_from_histograms,
    noisy_histograms,
)
from site_client.egress import EVALUATE_METRICS
from site_client.ledger import EVALUATED
from site_client.task import SiteRefusal, evaluate_round, ledger_for
from tests.models_factory import make_store

CFG = RunConfig().with_overrides(image_size=16, batch_size=3, num_server_rounds=3, grad_sample_mode="hooks",
                                  optimizer="sgd", local_epochs=1, noise_multiplier=1.0, calibrate_noise=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deid")
    make_store(root, n_patients=24, images_per_patient=2, size=16, seed=5)
    return root


def _site(tmp_path: Path, store: Path, cap: float = 1000.0, noise: float = DEFAULT_EVALUATION_NOISE,
          per_run: float | None = None) -> SiteConfig:
    return SiteConfig(name="hospital-e", data_dir=store, state_dir=tmp_path / "state", audit_dir=tmp_path / "audit",
                      epsilon_cap=cap, delta=1e-3, evaluation_noise=noise, epsilon_cap_per_run=per_run)


def _crafted(bias: float) -> dict[str, torch.Tensor]:
    """A model whose every weight is 0 and whose logit is ``bias`` for every image."""
    state = {k: torch.zeros_like(v) for k, v in build_model(16).state_dict().items()}
    state["classifier.head.bias"] = torch.tensor([bias])
    return state


def _test_split(store: Path) -> tuple[int, int]:
    """(examples, positives) of the site's test split: what the attack is after."""
    data = ManifestDataset(store, split="test", image_size=16)
    labels = [int(data[i][1]) for i in range(len(data))]
    return len(labels), sum(labels)


def test_crafted_models_no_longer_recover_the_positive_count(tmp_path: Path, store: Path) -> None:
    site = _site(tmp_path, store)
    n, positives = _test_split(store)
    assert 0 < positives < n
    # what the attack reads without DP: exact figures, exact count
    exact = evaluate(_load(_crafted(50.0)), ManifestDataset(store, split="test", image_size=16))
    assert round(exact["accuracy"] * exact["num_examples"]) == positives
    estimates, counts = [], []
    for k in range(5):  # five crafted pairs (distinct digests), each evaluation paid for
        up = evaluate_round(site, CFG, "run-x", _crafted(50.0 + k), 2 * k + 1)
        down = evaluate_round(site, CFG, "run-x", _crafted(-50.0 - k), 2 * k + 2)
        assert set(up) == set(down) == EVALUATE_METRICS
        assert up["num-examples"] != n and down["num-examples"] != n  # the count itself is noisy
        assert up["accuracy"] != pytest.approx(positives / n, abs=1e-9)
        counts += [up["num-examples"], down["num-examples"]]
        estimates.append(up["accuracy"] * up["num-examples"])
    # the attacker's estimates scatter by the noise (σ √NUM_BINS on a class total), not around one exact answer
    assert not all(np.isfinite(e) and round(e) == positives for e in estimates)
    assert np.std(counts) > 1.0
    ledger = ledger_for(site)
    assert sum(1 for r in ledger.rounds("run-x") if r["status"] == EVALUATED) == 10


def _load(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(16)
    model.load_state_dict(state)
    return model


def test_each_evaluation_is_paid_before_release_and_once_per_model(tmp_path: Path, store: Path) -> None:
    site = _site(tmp_path, store)
    ledger = ledger_for(site)
    state = initial_state(CFG)
    first = evaluate_round(site, CFG, "run-e", state, 1)
    sigma = site.evaluation_noise
    assert ledger.history("run-e") == [(sigma, 1.0, 1)]
    (row,) = ledger.rounds("run-e")
    assert row["status"] == EVALUATED and row["digest"] and row["noise_multiplier"] == sigma
    assert first["epsilon"] == pytest.approx(gaussian_epsilon(1.0 / sigma, site.delta), rel=1e-3)
    # the same global model again (another round, even another run): the same figures, no new spend
    again = evaluate_round(site, CFG, "run-e", {k: v.clone() for k, v in state.items()}, 2)
    other_run = evaluate_round(site, CFG, "run-f", state, 1)
    for key in ("auc", "accuracy", "sensitivity", "specificity", "f1", "num-examples"):
        assert _same(again[key], first[key]) and _same(other_run[key], first[key])
    assert ledger.history("run-e") == [(sigma, 1.0, 1)] and ledger.history("run-f") == []
    assert len(ledger.rounds()) == 1
    # another model is another release: paid again, composed in the run's account
    evaluate_round(site, CFG, "run-e", _crafted(1.0), 3)
    assert ledger.history("run-e") == [(sigma, 1.0, 2)]
    assert ledger.epsilon("run-e", site.delta) == pytest.approx(epsilon_of_history([(sigma, 1.0, 2)], site.delta))


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_the_spend_is_committed_before_anything_is_released(tmp_path: Path, store: Path) -> None:
    site = _site(tmp_path, store)
    site.state_dir.mkdir(parents=True)
    (site.state_dir / STORE_DIR).write_text("not a folder")  # the release step cannot keep the result
    with pytest.raises(OSError):
        evaluate_round(site, CFG, "run-c", initial_state(CFG), 1)
    # nothing was returned, yet the spend stands: over-counting is safe, under-counting never is
    assert ledger_for(site).history("run-c") == [(site.evaluation_noise, 1.0, 1)]


def test_an_evaluation_over_a_cap_is_declined_with_no_spend(tmp_path: Path, store: Path) -> None:
    one = gaussian_epsilon(1.0 / DEFAULT_EVALUATION_NOISE, 1e-3)
    site = _site(tmp_path, store, cap=one * 1.2)  # one evaluation fits the site's lifetime, two do not
    ledger = ledger_for(site)
    evaluate_round(site, CFG, "run-1", initial_state(CFG), 1)
    with pytest.raises(SiteRefusal, match="lifetime cap") as err:
        evaluate_round(site, CFG, "run-2", _crafted(50.0), 1)
    assert f"{one:.3f} -> " in str(err.value) and "evaluate" in str(err.value)
    assert ledger.history("run-2") == [] and ledger.lifetime_epsilon(site.delta, "prv") == pytest.approx(one)
    assert [r["status"] for r in ledger.rounds("run-2")] == ["evaluation-declined"]
    # a per-run cap declines too, naming itself
    capped = _site(tmp_path / "b", store, cap=10.0, per_run=one * 1.2)
    evaluate_round(capped, CFG, "run-1", initial_state(CFG), 1)
    with pytest.raises(SiteRefusal, match="per-run cap"):
        evaluate_round(capped, CFG, "run-1", _crafted(50.0), 2)
    # through the ClientApp the coordinator hears SITE_REFUSED
    msg = Message(content=RecordDict({"arrays": pack(_crafted(-50.0)), "config": ConfigRecord({"server-round": 2})}),
                  dst_node_id=1, message_type="evaluate")
    toml = tmp_path / "site.toml"
    toml.write_text(site.to_toml())
    ctx = Context(run_id=7, node_id=1, node_config={"site-config": str(toml)}, state=RecordDict(), run_config={})
    reply = build_app(CFG)(msg, ctx)
    assert reply.has_error() and reply.error.code == SITE_REFUSED and "lifetime cap" in reply.error.reason


# Messages are built here as the coordinator would, outside Flower's runtime (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("task_identity")


def test_one_example_moves_one_bin_by_one() -> None:
    """The L2 sensitivity of the count vector under add/remove is 1: what the accounting assumes."""
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(0, 2, 200), rng.integers(0, 2, 200).astype(float)
    pos, neg = histograms(logits, labels)
    assert pos.shape == neg.shape == (NUM_BINS,) and pos.sum() + neg.sum() == 200
    for i in range(0, 200, 17):
        keep = np.arange(200) != i
        p2, n2 = histograms(logits[keep], labels[keep])
        diff = np.concatenate([pos - p2, neg - n2])
        assert np.linalg.norm(diff) == 1.0


def test_metrics_from_noise_free_histograms_are_the_exact_metrics() -> None:
    """The derivation is right: with no noise it reproduces models.evaluation's figures (AUC up to binning)."""
    from sklearn.metrics import roc_auc_score

    logits = np.array([-4.0, -2.5, -1.5, -0.7, -0.2, 0.2, 0.7, 1.5, 2.5, 4.0] * 3)
    labels = np.array([0, 0, 0, 1, 0, 1, 0, 1, 1, 1] * 3, dtype=float)
    pos, neg = histograms(logits, labels)
    m = metrics_from_histograms(NoisyHistograms(tuple(pos), tuple(neg), 1.0))
    pred = logits >= 0
    tp, tn = float(((pred) & (labels == 1)).sum()), float(((~pred) & (labels == 0)).sum())
    fp, fn = float(((pred) & (labels == 0)).sum()), float(((~pred) & (labels == 1)).sum())
    assert m["accuracy"] == pytest.approx((tp + tn) / 30)
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn)) and m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn)) and m["num-examples"] == 30
    assert m["auc"] == pytest.approx(roc_auc_score(labels, logits))  # one score per bin: binning loses nothing
    assert FIRST_POSITIVE_BIN == NUM_BINS // 2  # the decision threshold (logit 0) is a bin edge


def test_noise_is_fresh_and_metrics_stay_in_range() -> None:
    logits, labels = np.zeros(3), np.array([1.0, 0.0, 1.0])
    a, b = noisy_histograms(logits, labels, 10.0), noisy_histograms(logits, labels, 10.0)
    assert a.positives != b.positives  # OS entropy, never a fixed seed
    for h in (a, b):
        m = metrics_from_histograms(h)
        ratios = [v for k, v in m.items() if k in RELEASED_SCALARS and k != "num-examples"]
        assert len(ratios) == 7 and all(math.isnan(v) or 0.0 <= v <= 1.0 for v in ratios)  # type: ignore[operator]
        assert m["num-examples"] >= 0.0
    with pytest.raises(ValueError, match="evaluation noise must be > 0"):
        noisy_histograms(logits, labels, 0.0)


def test_egress_allows_exactly_the_released_metrics() -> None:
    from site_client.dp_evaluation import RELEASED_METRICS

    released = metrics_from_histograms(NoisyHistograms((1.0,) * NUM_BINS, (1.0,) * NUM_BINS, 1.0))
    assert set(released) == set(RELEASED_METRICS)
    assert set(RELEASED_METRICS) | {"epsilon", "epsilon-cap"} == EVALUATE_METRICS
    assert "loss" not in EVALUATE_METRICS  # not derived from the noisy histograms, so not released


def test_a_calibrated_run_leaves_its_evaluations_payable(tmp_path: Path, store: Path) -> None:
    from site_client.task import train_round

    cfg = CFG.with_overrides(calibrate_noise=True, noise_multiplier=0.5)
    site = _site(tmp_path, store, cap=3.0)
    state = initial_state(cfg)
    for rnd in (1, 2, 3):
        reply = train_round(site, cfg, "run-c", rnd, state)
        assert reply.state_dict is not None, reply.declined
        state = reply.state_dict
        evaluate_round(site, cfg, "run-c", state, rnd)  # never declined: it was reserved
    ledger = ledger_for(site)
    assert sum(1 for r in ledger.rounds("run-c") if r["status"] == EVALUATED) == 3
    assert 0.98 * site.epsilon_cap <= ledger.lifetime_epsilon(site.delta, "prv") <= site.epsilon_cap
    # calibrated without the reserve, σ would be lower and the third evaluation would cross the cap
    sigma, q, steps = next(seg for seg in ledger.history("run-c") if seg[1] < 1.0)
    plain = calibrate_noise([], q, steps, 3, site.epsilon_cap, site.delta, floor=0.5)
    assert plain < sigma
    assert epsilon_of_history([(plain, q, 3 * steps), (site.evaluation_noise, 1.0, 3)], site.delta) > site.epsilon_cap

