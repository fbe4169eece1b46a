"""The site's egress allow-list: nothing but model arrays and named scalar metrics leaves.

Every reply the ClientApp produces passes through :func:`check_reply` (wired in
as a Flower mod in `client_app.py`); a reply that carries anything else is
replaced by an error that says only that it was blocked. What did leave is
recorded in the site's audit trail: names, shapes, dtypes, bytes and a digest
(DESIGN.md invariant 1).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, MetricRecord, RecordDict

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"

#: Scalar metrics a site may send after training. Anything else is blocked.
TRAIN_METRICS: frozenset[str] = frozenset(
    {
        "num-examples",
        "train-loss",
        "epsilon",
        "epsilon-cap",
        "delta",
        "steps",
        "sample-rate",
        "noise-multiplier",
    }
)
#: Scalar metrics a site may send after evaluating the global model on its test split.
EVALUATE_METRICS: frozenset[str] = frozenset(
    {"num-examples", "auc", "accuracy", "sensitivity", "specificity", "f1", "loss", "epsilon", "epsilon-cap"}
)


class EgressViolation(Exception):
    """A reply carried something outside the allow-list; it must not leave the site."""


@dataclass
class EgressReport:
    """What a reply carries out of the site, for the audit trail."""

    message_type: str
    arrays: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    bytes: int = 0
    digest: str = ""

    def as_record(self) -> dict[str, Any]:
        return {
            "message_type": self.message_type,
            "arrays": self.arrays,
            "metrics": self.metrics,
            "bytes": self.bytes,
            "digest": self.digest,
        }


def _category(message_type: str) -> str:
    return message_type.split(".", 1)[0]


def check_reply(content: RecordDict, message_type: str, expected_arrays: ArrayRecord | None) -> EgressReport:
    """Validate a reply against the allow-list, or raise :class:`EgressViolation`.

    ``expected_arrays`` is the global model the coordinator sent: a train reply
    must carry exactly those array names and shapes, so no extra tensor can
    smuggle data out.
    """
    category = _category(message_type)
    if category == "train":
        allowed_metrics = TRAIN_METRICS
    elif category == "evaluate":
        allowed_metrics = EVALUATE_METRICS
    else:
        raise EgressViolation(f"message type {message_type!r} is not allowed to leave the site")

    report = EgressReport(message_type=message_type)
    digest = hashlib.sha256()
    keys = set(content.keys())
    expected_keys = {METRICS_KEY, ARRAYS_KEY} if category == "train" else {METRICS_KEY}
    if keys != expected_keys:
        raise EgressViolation(f"reply records {sorted(keys)} differ from the allowed {sorted(expected_keys)}")
    if content.config_records:
        raise EgressViolation("config records may not leave the site")

    metrics = content[METRICS_KEY]
    if not isinstance(metrics, MetricRecord):
        raise EgressViolation(f"'{METRICS_KEY}' must be a MetricRecord")
    for name, value in metrics.items():
        if name not in allowed_metrics:
            raise EgressViolation(f"metric {name!r} is not on the {category} allow-list")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EgressViolation(f"metric {name!r} must be a single number, not {type(value).__name__}")
        if isinstance(value, float) and math.isinf(value):
            raise EgressViolation(f"metric {name!r} is infinite")
    report.metrics = sorted(metrics.keys())

    if category == "train":
        arrays = content[ARRAYS_KEY]
        if not isinstance(arrays, ArrayRecord):
            raise EgressViolation(f"'{ARRAYS_KEY}' must be an ArrayRecord")
        if expected_arrays is not None:
            want = {k: tuple(a.shape) for k, a in expected_arrays.items()}
            got = {k: tuple(a.shape) for k, a in arrays.items()}
            if want != got:
                extra = sorted(set(got) - set(want))
                missing = sorted(set(want) - set(got))
                raise EgressViolation(
                    f"model arrays differ from the global model (extra {extra}, missing {missing}, "
                    "or shapes changed)"
                )
        for name, arr in arrays.items():
            payload = arr.data
            digest.update(name.encode())
            digest.update(payload)
            report.arrays.append(
                {"name": name, "shape": list(arr.shape), "dtype": arr.dtype, "bytes": len(payload)}
            )
            report.bytes += len(payload)
    report.digest = digest.hexdigest()
    return report
