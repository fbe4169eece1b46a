"""The egress allow-list: only model arrays and named scalar metrics may leave a site."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from anonymization.audit.anchors import anchor_fields
from medfed.protocol import RELEASE_KEPT
from site_client.egress import EVALUATE_METRICS, TRAIN_METRICS, EgressViolation, check_reply

ANCHOR = anchor_fields("hospital-a", 12, "ab" * 32)  # every reply carries the audit trail's head


def _global() -> ArrayRecord:
    return ArrayRecord(torch.nn.Linear(4, 2).state_dict())


def _reply(**records: object) -> RecordDict:
    return RecordDict({**records, "audit": ConfigRecord(ANCHOR)})  # type: ignore[dict-item]


def _train_reply(**extra_metrics: float) -> RecordDict:
    metrics = {"num-examples": 10, "epsilon": 1.2, **extra_metrics}
    return _reply(arrays=_global(), metrics=MetricRecord(metrics))


def test_good_train_reply_is_reported() -> None:
    report = check_reply(_train_reply(), "train", _global())
    assert {a["name"] for a in report.arrays} == {"weight", "bias"}
    assert report.bytes == sum(a["bytes"] for a in report.arrays) > 0
    assert len(report.digest) == 64
    assert report.metrics == ["epsilon", "num-examples"]
    assert report.anchor == ANCHOR and report.as_record()["anchor"] == ANCHOR


def test_metric_off_the_allow_list_is_blocked() -> None:
    with pytest.raises(EgressViolation, match="patient-age"):
        check_reply(_train_reply(**{"patient-age": 54.0}), "train", _global())


def test_list_metric_is_blocked() -> None:
    reply = _reply(arrays=_global(), metrics=MetricRecord({"num-examples": 3, "epsilon": [0.1, 0.2]}))
    with pytest.raises(EgressViolation, match="single number"):
        check_reply(reply, "train", _global())


def test_extra_array_is_blocked() -> None:
    arrays = _global()
    arrays["smuggled"] = ArrayRecord({"x": torch.zeros(3)})["x"]
    reply = _reply(arrays=arrays, metrics=MetricRecord({"num-examples": 1}))
    with pytest.raises(EgressViolation, match="smuggled"):
        check_reply(reply, "train", _global())


def test_reshaped_array_is_blocked() -> None:
    reply = _reply(arrays=ArrayRecord(torch.nn.Linear(4, 3).state_dict()), metrics=MetricRecord({"num-examples": 1}))
    with pytest.raises(EgressViolation, match="shapes"):
        check_reply(reply, "train", _global())


def test_config_record_and_extra_records_are_blocked() -> None:
    reply = _train_reply()
    reply["notes"] = ConfigRecord({"patient": "DOE^JOHN"})
    with pytest.raises(EgressViolation):
        check_reply(reply, "train", _global())


def test_evaluate_reply_may_not_carry_arrays() -> None:
    reply = _reply(arrays=_global(), metrics=MetricRecord({"num-examples": 1, "auc": 0.5}))
    with pytest.raises(EgressViolation):
        check_reply(reply, "evaluate", None)
    ok = _reply(metrics=MetricRecord({"num-examples": 1, "auc": 0.5}))
    assert check_reply(ok, "evaluate", None).arrays == []


def test_a_query_reply_says_only_whether_the_release_was_kept() -> None:
    report = check_reply(_reply(metrics=MetricRecord({RELEASE_KEPT: 1})), "query", None)
    assert report.metrics == [RELEASE_KEPT] and report.arrays == []
    with pytest.raises(EgressViolation, match="not on the query allow-list"):
        check_reply(_reply(metrics=MetricRecord({"num-examples": 1})), "query", None)
    with pytest.raises(EgressViolation, match="differ from the allowed"):
        check_reply(_reply(metrics=MetricRecord({RELEASE_KEPT: 1}), arrays=_global()), "query", None)
    with pytest.raises(EgressViolation, match="not allowed to leave"):
        check_reply(_reply(metrics=MetricRecord({RELEASE_KEPT: 1})), "reconnect", None)


def test_allow_lists_hold_only_aggregate_scalars() -> None:
    # A guard against someone widening the allow-list with per-record data.
    assert {"num-examples", "epsilon", "epsilon-cap", "delta", "steps",
                             "sample-rate", "noise-multiplier"} >= TRAIN_METRICS
    assert "num-examples" in EVALUATE_METRICS and "auc" in EVALUATE_METRICS


def test_training_loss_is_blocked() -> None:
    """With a crafted global model the training loss is a count of positive labels: it never leaves."""
    with pytest.raises(EgressViolation, match="'train-loss' is not on the train allow-list"):
        check_reply(_train_reply(**{"train-loss": 0.5}), "train", _global())


def test_non_finite_update_is_blocked() -> None:
    arrays = _global()
    bad = torch.nn.Linear(4, 2).state_dict()
    bad["bias"][0] = float("nan")
    with pytest.raises(EgressViolation, match="'bias' holds non-finite"):
        check_reply(_reply(arrays=ArrayRecord(bad), metrics=MetricRecord({"epsilon": 1.0})), "train", arrays)


def _evaluate_reply(**metrics: object) -> RecordDict:
    base: dict[str, object] = {"num-examples": 20.0, "auc": 0.7, "histogram-with": [1.0] * 10,
                               "histogram-without": [2.0] * 10, "confusion": [1.0, 2.0, 3.0, 4.0]}
    return _reply(metrics=MetricRecord({**base, **metrics}))  # type: ignore[arg-type]


def test_the_evaluate_allow_list_is_exactly_the_dp_release() -> None:
    """A widened evaluate allow-list fails here: each key is a DP figure, its noisy counts, or the privacy spend."""
    assert frozenset({
        "num-examples", "auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "calibration-error",
        "histogram-with", "histogram-without", "confusion", "epsilon", "epsilon-cap",
    }) == EVALUATE_METRICS
    assert frozenset({"num-examples", "epsilon", "epsilon-cap", "delta", "steps", "sample-rate",
                                       "noise-multiplier"}) == TRAIN_METRICS


@pytest.mark.adversarial
@pytest.mark.parametrize("metric", ["auc", "precision", "calibration-error", "histogram-with", "confusion"])
def test_a_train_reply_carrying_an_evaluate_only_metric_is_refused(metric: str) -> None:
    """Evaluation figures are paid for as evaluations; a train reply may not carry one out on the side."""
    value: object = [1.0, 2.0] if metric in ("histogram-with", "confusion") else 0.5
    reply = _reply(arrays=_global(), metrics=MetricRecord({"num-examples": 10, metric: value}))  # type: ignore[dict-item]
    with pytest.raises(EgressViolation, match="not on the train allow-list"):
        check_reply(reply, "train", _global())


def test_evaluate_reply_with_noisy_counts_leaves() -> None:
    report = check_reply(_evaluate_reply(), "evaluate", None)
    assert {"histogram-with", "histogram-without", "confusion"} <= set(report.metrics)


@pytest.mark.adversarial
@pytest.mark.parametrize(("metrics", "why"), [
    ({"auc": [0.1, 0.2]}, "single number"),  # only the count keys may be lists
    ({"histogram-with": [1.0] * 9}, "differ in length"),
    ({"confusion": [1.0] * (64 * 64 + 1)}, "may hold 1 to"),
    ({"histogram-without": [float("nan")] * 10}, "finite numbers"),
    ({"confusion": [1, 2, 3, 4]}, "finite numbers"),  # integers: not noised counts
])
def test_malformed_count_lists_are_blocked(metrics: dict[str, object], why: str) -> None:
    with pytest.raises(EgressViolation, match=why):
        check_reply(_evaluate_reply(**metrics), "evaluate", None)
