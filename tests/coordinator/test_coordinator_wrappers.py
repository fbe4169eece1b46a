"""The coordinator's strategy wrappers, each on its own over a real Flower strategy, and as build_strategy
composes them: recording (declines and failures are never "trained"), uniform weights, Poisson sampling,
aggregation receipts."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, FedMedian

from coordinator import site_dp
from coordinator.history import RunHistory
from coordinator.receipts import AGGREGATION_FILE, RECEIVED_FILE, Receipts, arrays_digest, read_jsonl
from coordinator.screening import NUM_EXAMPLES
from coordinator.strategy import (
    UNIFORM_KEY,
    AggregationReceipts,
    PoissonSampling,
    Recording,
    UniformWeights,
    build_strategy,
    innermost,
    mean_by_examples,
    weighted_mean_ignoring_nan,
)
from medfed.protocol import EGRESS_BLOCKED, SITE_DECLINED, SITE_FAILED, SITE_REFUSED
from medfed.settings import RunConfig
from medfed.wire import MODEL_ARRAY
from tests.grid_factory import Sites

pytestmark = pytest.mark.usefixtures("task_identity")

N = 8  # values in the toy global model


def _model(value: float) -> ArrayRecord:
    return ArrayRecord({MODEL_ARRAY: Array(np.full(N, value, dtype=np.float32))})


def _trained(to: Message, value: float, num_examples: int = 100) -> Message:
    content = RecordDict({"arrays": _model(value), "metrics": MetricRecord({"num-examples": num_examples})})
    return Message(content, reply_to=to)


def _evaluated(to: Message, auc: float, num_examples: int) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": num_examples, "auc": auc})}), reply_to=to)


def _train(strategy: Any, server_round: int, current: ArrayRecord, *nodes: int) -> dict[int, Message]:
    """The training messages ``strategy`` sends when ``nodes`` are connected, by node."""
    sent = strategy.configure_train(server_round, current, ConfigRecord(), Sites(*nodes))
    return {m.metadata.dst_node_id: m for m in sent}


def _cfg(**kw: Any) -> RunConfig:
    return RunConfig().with_overrides(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=3, **kw)


def _value(arrays: ArrayRecord | None) -> float:
    assert arrays is not None
    values = arrays[MODEL_ARRAY].numpy()
    assert np.allclose(values, values[0])
    return float(values[0])


# ---- Recording: a site that did not train is never recorded as trained --------------------------------------


@pytest.mark.parametrize("code, status", [(SITE_DECLINED, "declined"), (SITE_FAILED, "failed"),
                                          (SITE_REFUSED, "refused"), (EGRESS_BLOCKED, "egress-blocked")])
def test_a_train_reply_without_an_update_is_recorded_with_its_code_never_as_trained(
        tmp_path: Path, code: int, status: str) -> None:
    history = RunHistory()
    strategy = build_strategy(_cfg(), history, receipts=Receipts(tmp_path))
    sent = _train(strategy, 1, _model(0.0), 7, 8, 9)
    why = f"site b: {status} (the site's own words)"
    arrays, _ = strategy.aggregate_train(1, [_trained(sent[7], 0.1), Message(Error(code, why), reply_to=sent[8]),
                                             _trained(sent[9], 0.3)])
    assert _value(arrays) == pytest.approx(0.2)  # the mean of the two sites that trained
    site = history.to_json()[0]["sites"]["8"]
    assert (site["status"], site["reason"], site["train"]) == (status, why, {})
    assert all(history.to_json()[0]["sites"][n]["status"] == "trained" for n in ("7", "9"))
    (row,) = [r for r in read_jsonl(tmp_path / RECEIVED_FILE) if r["node"] == 8]
    assert row["error"] == {"code": code, "reason": why} and "status" not in row  # no "accepted" verdict
    (agg,) = read_jsonl(tmp_path / AGGREGATION_FILE)
    assert sorted(i["node"] for i in agg["inputs"]) == [7, 9]


@pytest.mark.parametrize("code, status", [(SITE_DECLINED, "declined"), (SITE_FAILED, "failed")])
def test_under_site_dp_a_declined_or_failed_site_is_recorded_and_the_round_releases_nothing(
        tmp_path: Path, code: int, status: str) -> None:
    """Flower's DP wrapper skips a round with an error reply; the recording layer above it still says why."""
    cfg = _cfg(site_dp="server-fixed", site_dp_clipping_norm=10.0)
    history = RunHistory()
    strategy = build_strategy(cfg, history, receipts=Receipts(tmp_path), site_dp_plan=site_dp.plan(cfg, 3))
    sent = _train(strategy, 1, _model(0.0), 7, 8, 9)
    arrays, _ = strategy.aggregate_train(1, [_trained(sent[7], 0.1), Message(Error(code, "no"), reply_to=sent[8]),
                                             _trained(sent[9], 0.3)])
    assert arrays is None and strategy.released_rounds == 0
    assert history.round(1).site(8).status == status and history.round(1).site(7).status == "trained"
    assert not read_jsonl(tmp_path / AGGREGATION_FILE)  # nothing was aggregated
    sent = _train(strategy, 2, _model(0.0), 7, 8, 9)
    strategy.aggregate_train(2, [_trained(sent[n], v) for n, v in ((7, 0.2), (8, 0.25), (9, 0.35))])
    assert strategy.released_rounds == 1  # a round that released a model counts towards the site-level epsilon


def test_recording_screens_before_the_dp_wrapper_and_keeps_what_the_site_sent(tmp_path: Path) -> None:
    """Flower's server-side clipping rewrites each reply's arrays; the receipt is of the update as it arrived."""
    cfg = _cfg(site_dp="server-fixed", site_dp_clipping_norm=0.01, max_update_norm=0.0)
    strategy = build_strategy(cfg, RunHistory(), receipts=Receipts(tmp_path), site_dp_plan=site_dp.plan(cfg, 3))
    sent = _train(strategy, 1, _model(0.0), 7, 8, 9)
    replies = [_trained(sent[n], 0.5) for n in (7, 8, 9)]
    strategy.aggregate_train(1, replies)
    rows = read_jsonl(tmp_path / RECEIVED_FILE)
    assert {r["records"]["arrays"]["digest"] for r in rows} == {arrays_digest(_model(0.5))}
    assert all(r["update_norm"] == pytest.approx(0.5 * np.sqrt(N), rel=1e-6) for r in rows)  # before clipping


# ---- UniformWeights ------------------------------------------------------------------------------------------


def _fedavg(**kw: Any) -> FedAvg:
    return FedAvg(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1, **kw)


def test_uniform_weights_weigh_every_site_one_whatever_it_claims() -> None:
    strategy = UniformWeights(_fedavg(weighted_by_key=UNIFORM_KEY, train_metrics_aggr_fn=weighted_mean_ignoring_nan,
                                      evaluate_metrics_aggr_fn=mean_by_examples))
    sent = _train(strategy, 1, _model(0.0), 7, 8)
    arrays, metrics = strategy.aggregate_train(1, [_trained(sent[7], 0.1, 100), _trained(sent[8], 0.3, 300)])
    assert _value(arrays) == pytest.approx(0.2)  # 0.25 if the claims weighed
    assert metrics is not None and (metrics[UNIFORM_KEY], metrics[NUM_EXAMPLES]) == (2, pytest.approx(200))
    # the evaluation figures stay weighted by test examples, and the training weight is none of them
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_evaluate(1, _model(0.0), ConfigRecord(), Sites(7, 8))}
    figures = strategy.aggregate_evaluate(1, [_evaluated(sent[7], 0.9, 30), _evaluated(sent[8], 0.5, 10)])
    assert figures is not None and figures["auc"] == pytest.approx(0.8) and UNIFORM_KEY not in figures


def test_uniform_weights_need_a_strategy_that_weighs_by_them() -> None:
    with pytest.raises(ValueError, match="weighted_by_key='site-weight'"):
        UniformWeights(_fedavg())  # weighs by num-examples: the claim would still count


# ---- PoissonSampling -----------------------------------------------------------------------------------------


def test_poisson_sampling_takes_each_site_independently_with_probability_q() -> None:
    nodes, q, rounds = tuple(range(10, 20)), 0.3, 300
    strategy = PoissonSampling(_fedavg(), q, q * len(nodes), rng=random.Random(5))
    picked = [[m.metadata.dst_node_id for m in strategy.configure_train(r, _model(0.0), ConfigRecord(),
                                                                       Sites(*nodes))] for r in range(rounds)]
    sizes = [len(p) for p in picked]
    for n in nodes:  # each site about q of the rounds (binomial sd ~ 0.026)
        assert abs(sum(n in p for p in picked) / rounds - q) < 0.1
    assert 0 in sizes and max(sizes) >= 6 and len(set(sizes)) >= 5  # the round's size varies: not m of N


def test_poisson_sampling_divides_the_sum_by_the_expected_number_of_sites() -> None:
    strategy = PoissonSampling(_fedavg(), 0.5, expected_sites=4.0, rng=random.Random(0))
    current = _model(1.0)
    for server_round in range(1, 50):  # until two sites happen to be sampled
        sent = list(strategy.configure_train(server_round, current, ConfigRecord(), Sites(*range(8))))
        if len(sent) == 2:
            break
    arrays, _ = strategy.aggregate_train(server_round, [_trained(sent[0], 2.0), _trained(sent[1], 4.0)])
    assert _value(arrays) == pytest.approx(1.0 + (1.0 + 3.0) / 4.0)  # current + sum of updates / qN


def test_poisson_sampling_with_nobody_sampled_releases_the_current_model() -> None:
    strategy = PoissonSampling(_fedavg(), 0.01, expected_sites=0.1, rng=random.Random(1))
    current = _model(0.7)
    assert list(strategy.configure_train(1, current, ConfigRecord(), Sites(3, 4))) == []
    arrays, metrics = strategy.aggregate_train(1, [])
    assert arrays is current and metrics is not None and not dict(metrics)


def test_poisson_sampling_refuses_settings_it_cannot_honour() -> None:
    with pytest.raises(ValueError, match="fraction_train=1.0"):
        PoissonSampling(_fedavg(fraction_train=0.5), 0.5, 2.0)  # it would draw from a sample, not from every site
    with pytest.raises(ValueError, match="rate"):
        PoissonSampling(_fedavg(), 0.0, 2.0)
    with pytest.raises(ValueError, match="expected number"):
        PoissonSampling(_fedavg(), 0.5, 0.0)


# ---- AggregationReceipts -------------------------------------------------------------------------------------


def test_aggregation_receipts_name_the_inputs_before_a_strategy_consumes_them(tmp_path: Path) -> None:
    """FedMedian pops the arrays it uses; the receipt must still name what went in, in the run's round."""
    strategy = AggregationReceipts(FedMedian(min_train_nodes=1, min_available_nodes=1), Receipts(tmp_path),
                                   round_offset=4)
    sent = _train(strategy, 1, _model(0.0), 7, 8, 9)
    replies = [_trained(sent[7], 0.1), _trained(sent[8], 0.2), Message(Error(SITE_DECLINED, "cap"), reply_to=sent[9])]
    arrays, _ = strategy.aggregate_train(1, replies)
    (row,) = read_jsonl(tmp_path / AGGREGATION_FILE)
    assert row["round"] == 5 and row["secure"] is False
    assert row["inputs"] == [{"node": 7, "digest": arrays_digest(_model(0.1))},
                             {"node": 8, "digest": arrays_digest(_model(0.2))}]
    assert arrays is not None and row["result"] == arrays_digest(arrays)


# ---- build_strategy: one place composes them -----------------------------------------------------------------


def _layers(strategy: Any) -> list[type]:
    out = [type(strategy)]
    while hasattr(strategy, "strategy"):
        strategy = strategy.strategy
        out.append(type(strategy))
    return out


def test_build_strategy_composes_the_wrappers_the_run_needs(tmp_path: Path) -> None:
    plain = build_strategy(_cfg(site_weights="reported"), RunHistory())
    assert _layers(plain) == [Recording, FedAvg]
    assert innermost(plain).weighted_by_key == NUM_EXAMPLES  # type: ignore[attr-defined]
    assert _layers(build_strategy(_cfg(), RunHistory())) == [Recording, UniformWeights, FedAvg]
    cfg = _cfg(site_dp="server-fixed", site_sampling="poisson", fraction_train=0.4)
    plan = site_dp.plan(cfg, 5)
    assert plan is not None
    full = build_strategy(cfg, RunHistory(), receipts=Receipts(tmp_path), site_dp_plan=plan, round_offset=2,
                          seen={"ab" * 32: 1})
    assert _layers(full) == [Recording, DifferentialPrivacyServerSideFixedClipping, AggregationReceipts,
                             PoissonSampling, UniformWeights, FedAvg]
    assert full.round_offset == 2 and full.screen.seen == {"ab" * 32: 1}
    poisson = full.strategy.strategy.strategy  # type: ignore[attr-defined]
    assert (poisson.rate, poisson.expected_sites) == (0.4, pytest.approx(2.0))
    assert innermost(full).fraction_train == 1.0  # type: ignore[attr-defined]
