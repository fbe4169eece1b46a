"""Coordinator pieces without Flower's runtime: aggregation, history, checkpoints, report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from coordinator.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from coordinator.history import RunHistory
from coordinator.report import plot_metrics, write_metrics
from coordinator.strategy import build_strategy, innermost, weighted_mean_ignoring_nan
from medfed.settings import RunConfig
from tests.grid_factory import Sites


def _rec(n: int, **m: float) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({"num-examples": n, **m})})


def test_weighted_mean_skips_nan_sites() -> None:
    sites = [_rec(30, auc=0.9, loss=1.0), _rec(10, auc=float("nan"), loss=3.0)]
    out = weighted_mean_ignoring_nan(sites, "num-examples")
    assert out["auc"] == pytest.approx(0.9)
    assert out["loss"] == pytest.approx((30 * 1.0 + 10 * 3.0) / 40)
    assert out["num-examples"] == 40


@pytest.mark.parametrize("name, cls", [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam)])
def test_strategy_from_run_config(name: str, cls: type) -> None:
    cfg = RunConfig().with_overrides(strategy=name, min_train_nodes=3, min_available_nodes=3)
    strategy: Any = innermost(build_strategy(cfg, RunHistory()))  # the Flower strategy inside our wrappers
    assert type(strategy) is cls
    assert strategy.min_train_nodes == 3
    if name == "fedprox":
        assert strategy.proximal_mu == RunConfig().proximal_mu


def _history() -> RunHistory:
    h = RunHistory()
    r = h.round(1)
    r.seconds = 2.5
    r.evaluate = {"auc": 0.7, "num-examples": 40}
    r.site(11).train = {"epsilon": 1.5, "epsilon-cap": 8.0}
    r.site(11).evaluate = {"epsilon": 1.5, "epsilon-cap": 8.0, "auc": float("nan")}
    r.site(22).status, r.site(22).reason = "declined", "over cap"
    return h


def test_history_json_roundtrip_and_nan_becomes_null() -> None:
    h = _history()
    data = h.to_json()
    assert data[0]["auc"] == 0.7
    assert data[0]["sites"]["11"]["epsilon"] == 1.5 and data[0]["sites"]["11"]["epsilon_cap"] == 8.0
    assert data[0]["sites"]["11"]["evaluate"]["auc"] is None
    json.dumps(data, allow_nan=False)
    assert RunHistory.from_json(data).to_json() == data


def test_checkpoint_roundtrip_and_latest(tmp_path: Path) -> None:
    state = torch.nn.Linear(3, 1).state_dict()
    save_checkpoint(tmp_path, 1, state, _history(), {"lr": 0.1})
    p2 = save_checkpoint(tmp_path, 2, state, _history(), {"lr": 0.1})
    assert latest_checkpoint(tmp_path) == p2
    ck = load_checkpoint(p2)
    assert ck.round == 2 and torch.equal(ck.state_dict["weight"], state["weight"])
    assert ck.history.to_json() == _history().to_json()
    assert not list(tmp_path.glob(".*tmp"))


def test_metrics_json_and_plot(tmp_path: Path) -> None:
    write_metrics(tmp_path / "metrics.json", _history(), {"lr": 0.1})
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["rounds"][0]["auc"] == 0.7
    assert doc["rounds"][0]["sites"]["22"]["status"] == "declined"
    plot_metrics(tmp_path / "metrics.png", _history())
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not math.isnan(doc["rounds"][0]["seconds"])


class _Grid:
    """Just enough of a Flower Grid for the node wait: nodes join after some polls."""

    def __init__(self, joins: list[int]) -> None:
        self.joins = joins
        self.polls = 0

    def get_node_ids(self) -> list[int]:
        self.polls += 1
        return list(range(self.joins[min(self.polls, len(self.joins)) - 1]))


def test_wait_for_nodes_returns_once_enough_connected() -> None:
    from coordinator.strategy import wait_for_nodes

    grid = _Grid([0, 1, 3])
    assert wait_for_nodes(grid, 3, timeout=5.0, poll=0.01) == 3  # type: ignore[arg-type]
    assert grid.polls == 3


def test_wait_for_nodes_is_bounded_and_says_what_to_do() -> None:
    from coordinator.strategy import NodesUnavailable, wait_for_nodes

    with pytest.raises(NodesUnavailable, match=r"only 1 of the 3 sites.*min-available-nodes"):
        wait_for_nodes(_Grid([1]), 3, timeout=0.05, poll=0.01)  # type: ignore[arg-type]


@pytest.mark.usefixtures("task_identity")
def test_configure_train_samples_every_site_once_they_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower sizes the sample before waiting; ours waits first, so fraction 1.0 means every site."""
    from flwr.app import ArrayRecord, ConfigRecord

    cfg = RunConfig().with_overrides(min_train_nodes=1, min_available_nodes=3, round_timeout=5.0)
    strategy = build_strategy(cfg, RunHistory())
    grid = _Grid([0, 3])
    monkeypatch.setattr("coordinator.strategy.time.sleep", lambda s: None)
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))  # type: ignore[arg-type]
    assert sorted(m.metadata.dst_node_id for m in msgs) == [0, 1, 2]


def test_site_that_only_evaluated_is_not_marked_trained() -> None:
    h = RunHistory()
    h.round(1).site(7).evaluate = {"auc": 0.5}
    assert h.to_json()[0]["sites"]["7"]["status"] == "not-sampled"


@pytest.fixture
def recording(task_identity: None) -> tuple[RunHistory, Any]:
    """A strategy and its history; messages need the identity of a running task (tests/conftest.py)."""
    history = RunHistory()
    return history, build_strategy(RunConfig(), history)


def _send(strategy: Any, phase: str, nodes: tuple[int, ...], server_round: int = 1) -> dict[int, Any]:
    """The messages the strategy sends to ``nodes`` for ``phase``, by node."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    configure = strategy.configure_train if phase == "train" else strategy.configure_evaluate
    model = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    return {m.metadata.dst_node_id: m for m in configure(server_round, model, ConfigRecord(), Sites(*nodes))}


def _trained(to: Any, step: float = 0.1) -> Any:
    from flwr.app import Array, ArrayRecord, Message

    arrays = ArrayRecord({"w": Array(np.full(3, step, np.float32))})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 5})}), reply_to=to)


def test_an_evaluate_failure_does_not_hide_why_a_site_did_not_train(recording: tuple[RunHistory, Any]) -> None:
    """A site that refused to train and then failed to evaluate keeps its refusal as the round's reason."""
    from flwr.app import Error, Message

    from medfed.protocol import SITE_REFUSED

    history, strategy = recording
    train = _send(strategy, "train", (7, 8))
    strategy.aggregate_train(1, [Message(Error(SITE_REFUSED, "site b refuses: cap 0.05"), reply_to=train[7]),
                                 _trained(train[8])])
    evaluate = _send(strategy, "evaluate", (7, 8))
    ev_ok = Message(RecordDict({"metrics": MetricRecord({"num-examples": 2, "auc": 0.7})}), reply_to=evaluate[8])
    strategy.aggregate_evaluate(1, [Message(Error(4004, "site b failed (DatasetError)"), reply_to=evaluate[7]), ev_ok])
    sites = history.to_json()[0]["sites"]
    assert (sites["7"]["status"], sites["7"]["reason"]) == ("refused", "site b refuses: cap 0.05")
    assert sites["7"]["evaluate_error"] == "site b failed (DatasetError)"
    assert (sites["8"]["status"], sites["8"]["reason"], sites["8"]["evaluate_error"]) == ("trained", None, None)
    assert sites["8"]["evaluate"]["auc"] == 0.7


def test_a_site_that_stays_silent_is_recorded_as_no_reply(recording: tuple[RunHistory, Any]) -> None:
    """Flower passes on only the replies that came; the round must still name the site that sent none."""
    history, strategy = recording
    train = _send(strategy, "train", (7, 8))
    strategy.aggregate_train(1, [_trained(train[8])])
    _send(strategy, "evaluate", (7, 8))
    strategy.aggregate_evaluate(1, [])
    sites = history.to_json()[0]["sites"]
    assert sites["7"]["status"] == "no-reply" and "no train reply" in sites["7"]["reason"]
    assert sites["8"]["status"] == "trained"
    assert all("no evaluate reply" in sites[n]["evaluate_error"] for n in ("7", "8"))
