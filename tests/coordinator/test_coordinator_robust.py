"""One malicious site against the coordinator: every attack of the table is refused or outvoted.

Two honest sites and one attacker reply to a round; the global model must stay
finite and near the honest mean (FedAvg) or the median (robust strategies), the
attacker must be recorded as rejected with its reason, and the run must go on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from coordinator.history import RunHistory
from coordinator.receipts import (
    AGGREGATION_FILE,
    RECEIVED_FILE,
    Receipts,
    read_jsonl,
    train_digests,
)
from coordinator.site_dp import SiteDPPlan
from coordinator.strategy import build_strategy
from medfed.settings import ConfigError, RunBounds, RunConfig
from medfed.wire import MODEL_ARRAY
from tests.grid_factory import Sites

pytestmark = [pytest.mark.adversarial, pytest.mark.usefixtures("task_identity")]

N = 64                      # values in the toy global model
GLOBAL = np.full(N, 0.5, dtype=np.float32)
HONEST = (0.1, 0.3)         # each honest site's update (added to every value)
ATTACKER = 9                # the attacker's node id; honest sites are 7 and 8


def _reply(values: np.ndarray, num_examples: float = 500, epsilon: float = 1.0, **records: Any) -> RecordDict:
    content: dict[str, Any] = {"arrays": ArrayRecord({MODEL_ARRAY: Array(np.asarray(values))}),
                               "metrics": MetricRecord({"num-examples": num_examples, "epsilon": epsilon})}
    content.update(records)
    return RecordDict(content)


def _nan() -> RecordDict:
    v = GLOBAL + 0.2
    v[3] = np.nan
    return _reply(v)


#: The attack table: name -> (attacker's reply, what its rejection reason says; None: accepted at weight 1).
ATTACKS: dict[str, tuple[Callable[[], RecordDict], str | None]] = {
    "one NaN value": (_nan, "non-finite"),
    "values 1e4": (lambda: _reply(np.full(N, 1e4, dtype=np.float32)), "above max-update-norm"),
    "num-examples 1e9": (lambda: _reply(GLOBAL + 1.0, num_examples=1e9), None),
    "num-examples -999": (lambda: _reply(GLOBAL + 1.0, num_examples=-999), "not a positive count"),
    "shape (1,)": (lambda: _reply(np.full(1, 0.7, dtype=np.float32)), "float32[1]; the global model's is float32[64]"),
    "shape (N+1,)": (lambda: _reply(np.full(N + 1, 0.7, dtype=np.float32)), "float32[65]"),
    "float64 array": (lambda: _reply((GLOBAL + 0.2).astype(np.float64)), "float64[64]"),
    "infinite metric": (lambda: _reply(GLOBAL + 0.2, epsilon=float("inf")), "not finite"),
    "extra record": (lambda: _reply(GLOBAL + 0.2, leak=ConfigRecord({"x": b"data"})), "reply records"),
    "second array": (lambda: RecordDict({"arrays": ArrayRecord({MODEL_ARRAY: Array(GLOBAL), "x": Array(GLOBAL)}),
                                         "metrics": MetricRecord({"num-examples": 5})}), "differ from the global"),
}


def _cfg(strategy: str = "fedavg", sites: int = 3, **kw: Any) -> RunConfig:
    return RunConfig().with_overrides(strategy=strategy, min_train_nodes=sites, min_available_nodes=sites, **kw)


class Round:
    """A strategy driven round by round in-process, with real Flower messages and the run's receipts."""

    def __init__(self, cfg: RunConfig, out: Path, *, seen: dict[str, int] | None = None,
                 plan: SiteDPPlan | None = None) -> None:
        self.history = RunHistory()
        self.strategy = build_strategy(cfg, self.history, receipts=Receipts(out), seen=seen, site_dp_plan=plan)
        self.out = out
        self.global_ = GLOBAL.copy()

    def run(self, server_round: int, replies: dict[int, RecordDict]) -> np.ndarray | None:
        current = ArrayRecord({MODEL_ARRAY: Array(self.global_.copy())})
        sent = {m.metadata.dst_node_id: m
                for m in self.strategy.configure_train(server_round, current, ConfigRecord(), Sites(*replies))}
        msgs = [Message(content, reply_to=sent[n]) for n, content in replies.items()]
        arrays, _ = self.strategy.aggregate_train(server_round, msgs)
        if arrays is None:
            return None
        self.global_ = arrays[MODEL_ARRAY].numpy()
        return self.global_

    def site(self, server_round: int, node: int) -> dict[str, Any]:
        return self.history.round(server_round).site(node).__dict__


def _honest(global_: np.ndarray) -> dict[int, RecordDict]:
    return {7: _reply(global_ + HONEST[0]), 8: _reply(global_ + HONEST[1])}


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("strategy", ["fedavg", "fedmedian"])
def test_one_attacker_neither_spoils_the_model_nor_stops_the_run(tmp_path: Path, strategy: str, attack: str) -> None:
    make, reason = ATTACKS[attack]
    r = Round(_cfg(strategy), tmp_path)
    model = r.run(1, {**_honest(GLOBAL), ATTACKER: make()})
    assert model is not None and np.isfinite(model).all() and model.shape == GLOBAL.shape
    updates = [HONEST[0], HONEST[1]]
    site = r.site(1, ATTACKER)
    if reason is None:  # a claim of 1e9 examples is accepted but weighs like any site: 1
        assert site["status"] == "trained"
        updates.append(1.0)
    else:
        assert site["status"] == "rejected" and reason in site["reason"]
        (row,) = [x for x in read_jsonl(tmp_path / RECEIVED_FILE) if x["node"] == ATTACKER]
        assert row["status"] == "rejected" and reason in row["reason"]
        (agg,) = read_jsonl(tmp_path / AGGREGATION_FILE)
        assert sorted(i["node"] for i in agg["inputs"]) == [7, 8]
    expected = np.mean(updates) if strategy == "fedavg" else np.median(updates)
    np.testing.assert_allclose(model, GLOBAL + expected, rtol=1e-6)
    assert all(r.site(1, n)["status"] == "trained" for n in (7, 8))
    # The run goes on: the next round aggregates as usual.
    after = r.run(2, {**_honest(model), ATTACKER: _reply(model + 0.2)})
    assert after is not None
    np.testing.assert_allclose(after, model + 0.2, rtol=1e-5)  # mean and median of 0.1, 0.2, 0.3


def test_weights_are_uniform_by_default_and_reported_only_when_asked(tmp_path: Path) -> None:
    """A site's num-examples claim does not weigh it unless site-weights=reported (which trusts the sites)."""
    replies = {7: _reply(GLOBAL + 0.1, 100), 8: _reply(GLOBAL + 0.3, 300)}
    uniform = Round(_cfg(sites=2), tmp_path / "u").run(1, replies)
    np.testing.assert_allclose(uniform, GLOBAL + 0.2, rtol=1e-6)  # type: ignore[arg-type]
    replies = {7: _reply(GLOBAL + 0.1, 100), 8: _reply(GLOBAL + 0.3, 300)}
    reported = Round(_cfg(sites=2, site_weights="reported"), tmp_path / "r").run(1, replies)
    np.testing.assert_allclose(reported, GLOBAL + 0.25, rtol=1e-6)  # type: ignore[arg-type]


def test_update_norm_bound_rejects_above_and_keeps_below(tmp_path: Path) -> None:
    bound = 2.0  # ||update|| = 0.3 * sqrt(64) = 2.4 for site 8, 0.8 for site 7
    r = Round(_cfg(sites=2, max_update_norm=bound), tmp_path)
    model = r.run(1, _honest(GLOBAL))
    np.testing.assert_allclose(model, GLOBAL + 0.1, rtol=1e-6)  # type: ignore[arg-type]
    assert r.site(1, 8)["status"] == "rejected"
    assert "update L2 norm 2.4 is above max-update-norm 2" in r.site(1, 8)["reason"]
    (accepted,) = [x for x in read_jsonl(tmp_path / RECEIVED_FILE) if x["status"] == "accepted"]
    assert accepted["node"] == 7 and accepted["update_norm"] == pytest.approx(0.8, rel=1e-5)  # what to tune it by
    off = Round(_cfg(sites=2, max_update_norm=0.0), tmp_path / "off")
    np.testing.assert_allclose(off.run(1, _honest(GLOBAL)), GLOBAL + 0.2, rtol=1e-6)  # type: ignore[arg-type]


def test_a_replayed_update_is_refused_from_any_site_and_after_a_resume(tmp_path: Path) -> None:
    r = Round(_cfg(), tmp_path)
    first = _honest(GLOBAL)
    kept = first[7]["arrays"][MODEL_ARRAY].numpy().copy()  # the honest site's round-1 update, as sent
    r.run(1, {**first, ATTACKER: _reply(GLOBAL + 0.2)})
    own = GLOBAL + 0.2
    model = r.run(2, {**_honest(r.global_), ATTACKER: _reply(kept)})  # another site's earlier update
    assert (r.site(2, ATTACKER)["status"], r.site(2, ATTACKER)["reason"]) == ("rejected", "replayed")
    assert model is not None and np.isfinite(model).all()
    # A resumed coordinator remembers the digests its received.jsonl holds.
    resumed = Round(_cfg(), tmp_path, seen=train_digests(tmp_path))
    resumed.global_ = r.global_
    honest = {7: _reply(r.global_ + 0.11), 8: _reply(r.global_ + 0.33)}
    resumed.run(3, {**honest, ATTACKER: _reply(own)})  # its own round-1 update
    assert resumed.site(3, ATTACKER)["reason"] == "replayed"
    assert all(resumed.site(3, n)["status"] == "trained" for n in (7, 8))


@pytest.mark.parametrize("strategy, sites, kw", [
    ("fedtrimmedavg", 3, {}), ("krum", 5, {}), ("bulyan", 7, {}), ("fedmedian", 3, {})])
def test_robust_strategies_outvote_a_large_update_without_the_norm_bound(
        tmp_path: Path, strategy: str, sites: int, kw: dict[str, Any]) -> None:
    """With max-update-norm off, 1e4 everywhere still does not move a robust aggregate off the honest sites."""
    r = Round(_cfg(strategy, sites, max_update_norm=0.0, **kw), tmp_path)
    honest = np.linspace(0.1, 0.3, sites - 1, dtype=np.float32)
    replies = {10 + i: _reply(GLOBAL + u) for i, u in enumerate(honest)}
    model = r.run(1, {**replies, ATTACKER: _reply(np.full(N, 1e4, dtype=np.float32))})
    assert model is not None and np.isfinite(model).all()
    assert np.all(model >= GLOBAL + honest.min() - 1e-5) and np.all(model <= GLOBAL + honest.max() + 1e-5)
    fedavg = Round(_cfg("fedavg", sites, max_update_norm=0.0), tmp_path / "fedavg")
    replies = {10 + i: _reply(GLOBAL + u) for i, u in enumerate(honest)}
    spoilt = fedavg.run(1, {**replies, ATTACKER: _reply(np.full(N, 1e4, dtype=np.float32))})
    assert spoilt is not None and spoilt.mean() > 1e3  # the same attack without a robust rule or a bound


@pytest.mark.parametrize("overrides, says", [
    ({"strategy": "fedmedian", "secagg": True, "min_train_nodes": 3, "min_available_nodes": 3}, "sees only their sum"),
    ({"strategy": "fedmedian", "site_dp": "server-fixed", "min_train_nodes": 3, "min_available_nodes": 3}, "site-dp"),
    ({"site_weights": "reported", "site_dp": "server-fixed"}, "site-weights=uniform"),
    ({"strategy": "krum", "min_train_nodes": 4, "min_available_nodes": 4}, "at least 5 sites"),
    ({"strategy": "bulyan", "min_train_nodes": 6, "min_available_nodes": 6}, "at least 7 sites"),
    ({"strategy": "fedtrimmedavg", "min_train_nodes": 3, "min_available_nodes": 3, "trim_beta": 0.2},
     "raise trim-beta"),
])
def test_combinations_that_cannot_work_are_refused_with_the_reason(overrides: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        RunConfig().with_overrides(**overrides)


def test_combinations_that_work_are_accepted_and_sites_may_accept_the_new_strategies() -> None:
    RunConfig().with_overrides(secagg=True)  # fedavg: the bound checks the secure mean
    RunConfig().with_overrides(site_dp="server-fixed", strategy="fedprox")
    RunConfig().with_overrides(strategy="krum", min_train_nodes=5, min_available_nodes=5)
    for name in ("fedmedian", "fedtrimmedavg", "krum", "bulyan"):
        assert name in RunBounds().strategies
        RunBounds.model_validate({"strategies": [name]})
    with pytest.raises(ConfigError, match="max-update-norm"):
        RunConfig.from_flower({"max-update-norm": -1.0})


def test_a_bad_reply_under_a_site_dp_wrapper_is_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    """Flower's DP wrappers clip before our layer; an array of another shape must be refused before that."""
    from coordinator import site_dp

    cfg = _cfg(site_dp="server-fixed", site_dp_clipping_norm=10.0)
    plan = site_dp.plan(cfg, 3)
    r = Round(cfg, tmp_path, plan=plan)
    arrays = r.run(1, {**_honest(GLOBAL), ATTACKER: _reply(np.full(N + 1, 0.7, dtype=np.float32))})
    assert arrays is None  # Flower's wrapper releases nothing in a round with a failed site
    site = r.site(1, ATTACKER)
    assert site["status"] == "rejected" and "float32[65]" in site["reason"]


def test_metrics_json_names_the_rejected_site(tmp_path: Path) -> None:
    from coordinator.report import write_metrics

    r = Round(_cfg(), tmp_path)
    r.run(1, {**_honest(GLOBAL), ATTACKER: _nan()})
    write_metrics(tmp_path / "metrics.json", r.history, {})
    sites = json.loads((tmp_path / "metrics.json").read_text())["rounds"][0]["sites"]
    assert sites[str(ATTACKER)]["status"] == "rejected" and "non-finite" in sites[str(ATTACKER)]["reason"]


# --- The attack table through Flower's Simulation Engine: the real ServerApp, one crafted ClientApp -----------

#: Round -> what the attacker (partition 2) sends in the simulation; honest partitions add 0.01 and 0.02.
SIM_ATTACKS = {1: "plausible", 2: "one NaN value", 3: "values 1e4", 4: "num-examples 1e9", 5: "num-examples -999",
               6: "shape (1,)", 7: "shape (N+1,)", 8: "replay of round 1"}
SIM_ACCEPTED = {1, 4}


def _attack_client() -> Any:
    """A ClientApp that trains nothing: honest nodes nudge the model, node 2 runs the attack table by round."""
    from flwr.app import Context
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        part = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])  # type: ignore[arg-type]
        g = msg.content["arrays"][MODEL_ARRAY].numpy()  # type: ignore[index]
        values, n = g + np.float32(0.01 * (part + 1)), 500.0
        if part == 2:
            attack = SIM_ATTACKS[rnd]
            if attack == "plausible":
                values = g + np.float32(0.05)
                context.state["replay"] = ArrayRecord({MODEL_ARRAY: Array(values.copy())})
            elif attack == "one NaN value":
                values = g.copy()
                values[0] = np.nan
            elif attack == "values 1e4":
                values = np.full_like(g, 1e4)
            elif attack == "num-examples 1e9":
                values, n = g + np.float32(0.5), 1e9
            elif attack == "num-examples -999":
                values, n = g + np.float32(0.5), -999.0
            elif attack == "shape (1,)":
                values = np.full(1, 0.5, dtype=np.float32)
            elif attack == "shape (N+1,)":
                values = np.full(g.size + 1, 0.5, dtype=np.float32)
            else:
                values = context.state["replay"][MODEL_ARRAY].numpy()  # type: ignore[index]
        content = RecordDict({"arrays": ArrayRecord({MODEL_ARRAY: Array(np.asarray(values))}),
                              "metrics": MetricRecord({"num-examples": n})})
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "auc": 0.5})}), reply_to=msg)

    return app


@pytest.mark.e2e
@pytest.mark.parametrize("strategy, total", [("fedavg", 0.08 / 3 + 0.53 / 3 + 6 * 0.015),
                                             ("fedmedian", 0.02 * 2 + 6 * 0.015)])
def test_attack_table_through_a_flower_simulation(tmp_path: Path, strategy: str, total: float) -> None:
    """Every round the attacker tries the next row of the table; the run completes every round and the final
    model is exactly the honest sites' work plus the two replies that were acceptable (weighing 1 each)."""
    import torch
    from flwr.simulation import run_simulation

    from coordinator.federation import initial_state
    from coordinator.server_app import build_app

    cfg = _cfg(strategy, num_server_rounds=len(SIM_ATTACKS), image_size=16, fraction_evaluate=0.0,
               min_evaluate_nodes=1, out_dir=str(tmp_path), round_timeout=60.0)
    run_simulation(server_app=build_app(cfg), client_app=_attack_client(), num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},  # type: ignore[arg-type]
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == list(SIM_ATTACKS)
    attacker = next(n for n, s in rounds[1]["sites"].items() if s["status"] == "rejected")
    for r in rounds:
        for node, site in r["sites"].items():
            if node != attacker:
                assert site["status"] == "trained", (r["round"], site)
            elif r["round"] in SIM_ACCEPTED:
                assert site["status"] == "trained"
            else:
                assert site["status"] == "rejected" and site["reason"], (r["round"], site)
    assert rounds[7]["sites"][attacker]["reason"] == "replayed"
    rejected = [x for x in read_jsonl(tmp_path / RECEIVED_FILE) if x.get("status") == "rejected"]
    assert sorted(x["round"] for x in rejected) == sorted(set(SIM_ATTACKS) - SIM_ACCEPTED)
    start = initial_state(cfg)
    final = torch.load(tmp_path / "model.pt", weights_only=True)
    for k, v in start.items():
        assert torch.isfinite(final[k]).all()
        np.testing.assert_allclose(final[k].numpy(), v.numpy() + total, atol=2e-5)
