"""A site refuses a model that SecAgg+ would clip, instead of letting Flower distort it with a warning.

SecAgg+ scales each site's model by weight / max-weight and clips it to
± clipping-range before quantizing. The unit tests check the range check and
where it runs (the adapter that hands the update to Flower's mod); the
simulation makes the largest of three sites refuse before it spends anything
while the other two are securely aggregated.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat

from coordinator.federation import initial_state
from medfed.protocol import ARRAY_NAMES_KEY
from medfed.settings import ConfigError, RunConfig
from site_client.secagg import _adapter, range_problem


def test_values_that_fit_after_weighting_pass() -> None:
    values = [np.array([0.5, -2.0]), np.zeros((2, 2))]
    assert range_problem(values, weight=400, max_weight=1000, clipping_range=1.0) is None  # 2.0 * 0.4 = 0.8
    assert range_problem(values, weight=1000, max_weight=1000, clipping_range=2.0) is None  # exactly at the edge
    assert range_problem([], weight=5000, max_weight=1000, clipping_range=1.0) is None


def test_weight_over_max_weight_that_clips_is_named_with_the_fix() -> None:
    problem = range_problem([np.array([0.1, -2.5])], weight=4096, max_weight=1000, clipping_range=8.0)
    assert problem is not None
    # 4.096 * 2.5 = 10.24 > 8: both knobs are named, each with a value that would fit
    assert "4.1" in problem and "10.2" in problem and "secagg-clipping-range" in problem
    assert "secagg-max-weight to at least" in problem
    suggested_weight = float(problem.rsplit("secagg-max-weight to at least ", 1)[1])
    assert range_problem([np.array([0.1, -2.5])], 4096, suggested_weight, 8.0) is None
    suggested_range = float(problem.split("secagg-clipping-range to at least ")[1].split(",")[0])
    assert range_problem([np.array([0.1, -2.5])], 4096, 1000, suggested_range) is None


def test_non_finite_values_are_refused() -> None:
    assert "NaN" in (range_problem([np.array([1.0, np.nan])], 1, 1, 8.0) or "")
    assert "NaN" in (range_problem([np.array([np.inf])], 1, 1, 8.0) or "")


def test_uniform_weights_use_a_bound_of_one() -> None:
    assert RunConfig().with_overrides(secagg=True).secagg_uniform_weights  # site-weights=uniform, the default
    plain = RunConfig().with_overrides(secagg=True, site_weights="reported")
    assert not plain.secagg_uniform_weights and plain.secagg_weight_bound == plain.secagg_max_weight
    site_dp = plain.with_overrides(site_dp="client-fixed", site_weights="uniform")
    assert site_dp.secagg_uniform_weights and site_dp.secagg_weight_bound == 1.0
    assert not RunConfig().with_overrides(site_dp="client-fixed").secagg_uniform_weights  # no SecAgg+, no weights


def _masked_vector_stage(names: list[str], arrays: list[np.ndarray], max_weight: float,
                         clipping_range: float) -> tuple[Message, Context]:
    fitins = FitIns(ndarrays_to_parameters(arrays), {ARRAY_NAMES_KEY: names, "server-round": 1})
    msg = Message(compat.fitins_to_recorddict(fitins, keep_input=True), dst_node_id=7,
                  message_type=MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    ctx.state.config_records[RECORD_KEY_STATE] = ConfigRecord({"max_weight": max_weight,
                                                               "clipping_range": clipping_range})
    return msg, ctx


def _trained(peak: float, examples: int):  # noqa: ANN202 - a Flower handler
    def handler(msg: Message, ctx: Context) -> Message:
        arrays = ArrayRecord({k: Array(np.full_like(a.numpy(), peak)) for k, a in msg.content["arrays"].items()})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": examples})}),
                       reply_to=msg)
    return handler


def test_adapter_refuses_an_update_that_would_be_clipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check on the trained model itself, with the bounds Flower's mod stored at set-up."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 7), ("_task_id", 1)):  # what a ClientApp process has set
        monkeypatch.setattr(TaskIdentity, attr, value)
    names, arrays = ["w", "b"], [np.zeros((2, 3), np.float32), np.zeros(3, np.float32)]
    msg, ctx = _masked_vector_stage(names, arrays, max_weight=10.0, clipping_range=1.0)
    with pytest.raises(ConfigError, match="secagg-clipping-range 1.*privacy spend stands"):
        _adapter(_trained(0.6, examples=20))(msg, ctx)  # 0.6 * 20 / 10 = 1.2 > 1
    msg, ctx = _masked_vector_stage(names, arrays, max_weight=10.0, clipping_range=1.0)
    reply = _adapter(_trained(0.4, examples=20))(msg, ctx)  # 0.8 fits
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    assert fitres.num_examples == 20


@pytest.mark.e2e
def test_largest_site_refuses_before_spending_and_the_others_aggregate(tmp_path: Path) -> None:
    from medfed.demo import prepare_sites, simulate
    from site_client.replay import ReplayStore
    from site_client.task import ledger_for

    sites = prepare_sites(tmp_path, sites=3, patients=24, seed=11, epsilon_caps=[1000.0] * 3, delta=1e-5,
                          progress=False)
    base = RunConfig().with_overrides(
        num_server_rounds=1, image_size=32, batch_size=8, demo_dir=str(tmp_path), out_dir=str(tmp_path / "coord"),
        min_train_nodes=3, min_evaluate_nodes=1, min_available_nodes=3, fraction_evaluate=0.0, seed=4,
        secagg=True, site_weights="reported", run_name="sim-range")
    # A site's weight is its published size bucket, never n itself: give the three sites distinct ones.
    sizes = [30, 20, 10]
    sites = [s.model_copy(update={"size_bucket": b}) for s, b in zip(sites, sizes, strict=True)]
    for s in sites:
        (s.data_dir.parent / "site.toml").write_text(s.to_toml())
    peak = max(float(v.abs().max()) for v in initial_state(base).values())
    largest, second = sorted(sizes)[-1], sorted(sizes)[-2]
    # max-weight 1: each model is scaled by its site's bucket; only the largest site's initial model overflows
    cfg = base.with_overrides(secagg_max_weight=1.0, secagg_clipping_range=peak * (largest + second) / 2)
    simulate(cfg, 3)

    metrics = json.loads((tmp_path / "coord" / "metrics.json").read_text())
    by_status = {s["status"]: s for s in metrics["rounds"][-1]["sites"].values()}
    assert sorted(s["status"] for s in metrics["rounds"][-1]["sites"].values()) == ["refused", "trained", "trained"]
    assert "secure aggregation would clip" in by_status["refused"]["reason"]
    assert "nothing was spent" in by_status["refused"]["reason"]
    big = sites[sizes.index(largest)]
    assert ledger_for(big).epsilon("sim-range", big.delta) == 0.0
    assert ReplayStore(big.state_dir).released("sim-range") == []

    # the global model is the bucket-weighted mean of the two other sites' released models
    keys = list(initial_state(cfg))
    others = [(s, n) for s, n in zip(sites, sizes, strict=True) if s is not big]
    mean = {k: sum(n * torch.load(ReplayStore(s.state_dir).released("sim-range")[0]["path"],
                                  weights_only=True)[k].double() for s, n in others) / sum(n for _, n in others)
            for k in keys}
    final = torch.load(tmp_path / "coord" / "model.pt", weights_only=True)
    worst = max(float((final[k].double() - mean[k]).abs().max()) for k in keys)
    assert worst < 1e-3, f"secure aggregate differs from the weighted mean of the two sites by {worst}"
