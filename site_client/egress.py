"""The site's egress allow-list: nothing but model arrays, named scalar metrics and the trail's anchor leaves.

Every reply the ClientApp produces passes through :func:`check_reply` (wired in
as a Flower mod in `client_app.py`); a reply that carries anything else is
replaced by an error that says only that it was blocked. What did leave is
recorded in the site's audit trail: names, shapes, dtypes, bytes and a digest
(docs/design.md invariant 1), and the anchor (site name, record number, line hash:
see :mod:`anonymization.audit.anchors`).
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from anonymization.audit.anchors import ANCHOR_RECORD, EGRESS_ANCHOR_FIELD, AnchorError, parse_anchor
from medfed.protocol import RELEASE_KEPT
from medfed.wire import summarize

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"

#: Scalar metrics a site may send after training. Anything else is blocked. No training loss (with a
#: crafted global model it is a count of labels); num-examples is the site's size bucket, and steps,
#: sample-rate and noise-multiplier are planned on that bucket (site_client.task), never on the exact n.
TRAIN_METRICS: frozenset[str] = frozenset(
    {
        "num-examples",
        "epsilon",
        "epsilon-cap",
        "delta",
        "steps",
        "sample-rate",
        "noise-multiplier",
    }
)
#: Metrics a site may send after evaluating the global model on its test split: the DP release of
#: site_client.dp_evaluation (macro figures derived from noisy counts, and those counts) and the site's
#: privacy figures.
EVALUATE_METRICS: frozenset[str] = frozenset(
    {"num-examples", "auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "calibration-error",
     "histogram-with", "histogram-without", "confusion", "epsilon", "epsilon-cap"}
)
#: The evaluate metrics that are lists of noisy counts (every other metric is one number), and the longest
#: each may be: 64 classes x 51 bins (a study's limits: models.study), a 64 x 64 confusion matrix.
EVALUATE_COUNT_LISTS: dict[str, int] = {"histogram-with": 64 * 51, "histogram-without": 64 * 51, "confusion": 64 * 64}


#: A site's answer to the release sent in a run's last message: whether it kept it, nothing else.
RELEASE_METRICS: frozenset[str] = frozenset({RELEASE_KEPT})


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
    anchor: dict[str, Any] | None = None  # the trail's head the reply carried (not with SecAgg+)

    def as_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "message_type": self.message_type,
            "arrays": self.arrays,
            "metrics": self.metrics,
            "bytes": self.bytes,
            "digest": self.digest,
        }
        if self.anchor is not None:
            out[EGRESS_ANCHOR_FIELD] = self.anchor
        return out


def _category(message_type: str) -> str:
    return message_type.split(".", 1)[0]


def check_reply(content: RecordDict, message_type: str, expected_arrays: ArrayRecord | None) -> EgressReport:
    """Validate a reply against the allow-list, or raise :class:`EgressViolation`.

    ``expected_arrays`` is the global model the coordinator sent: a train reply
    must carry exactly those array names and shapes, so no extra tensor can
    smuggle data out.
    """
    category, allowed_metrics = _allowed_metrics(message_type)
    report = EgressReport(message_type=message_type)
    _check_records(content, category)
    report.anchor = _check_anchor(content[ANCHOR_RECORD])  # the only config record that may leave
    report.metrics = _check_metrics(content[METRICS_KEY], category, allowed_metrics)
    if category == "train":
        report.arrays, report.bytes, report.digest = _check_arrays(content[ARRAYS_KEY], expected_arrays)
    else:
        report.digest = summarize(ArrayRecord())["digest"]  # the digest of nothing: no arrays left
    return report


def _allowed_metrics(message_type: str) -> tuple[str, frozenset[str]]:
    """The reply's category (train or evaluate) and its metric allow-list; any other message may not leave."""
    category = _category(message_type)
    if category == "train":
        return category, TRAIN_METRICS
    if category == "evaluate":
        return category, EVALUATE_METRICS
    if category == "query":
        return category, RELEASE_METRICS
    raise EgressViolation(f"message type {message_type!r} is not allowed to leave the site")


def _check_records(content: RecordDict, category: str) -> None:
    """Exactly the records a reply of this category has: metrics, the anchor and (train only) the arrays."""
    keys = set(content.keys())
    expected_keys = {METRICS_KEY, ARRAYS_KEY, ANCHOR_RECORD} if category == "train" else {METRICS_KEY, ANCHOR_RECORD}
    if keys != expected_keys:
        raise EgressViolation(f"reply records {sorted(keys)} differ from the allowed {sorted(expected_keys)}")


def _check_metrics(metrics: Any, category: str, allowed: frozenset[str]) -> list[str]:
    """A MetricRecord of allowed names, each one finite number or (evaluate) a list of noisy counts.

    Returns the metric names, sorted, for the audit trail.
    """
    if not isinstance(metrics, MetricRecord):
        raise EgressViolation(f"'{METRICS_KEY}' must be a MetricRecord")
    lists = EVALUATE_COUNT_LISTS if category == "evaluate" else {}
    for name, value in metrics.items():
        if name not in allowed:
            raise EgressViolation(f"metric {name!r} is not on the {category} allow-list")
        _check_metric_value(name, value, lists)
    if category == "evaluate":
        sizes = {len(v) for k, v in metrics.items() if k in ("histogram-with", "histogram-without")}
        if len(sizes) > 1:
            raise EgressViolation("'histogram-with' and 'histogram-without' differ in length")
    return sorted(metrics.keys())


def _check_metric_value(name: str, value: Any, lists: dict[str, int]) -> None:
    """One metric's value: a count list where ``lists`` allows one, else a single number that is not infinite."""
    if name in lists and isinstance(value, list):
        _check_count_list(name, value, lists[name])
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EgressViolation(f"metric {name!r} must be a single number, not {type(value).__name__}")
    if isinstance(value, float) and math.isinf(value):
        raise EgressViolation(f"metric {name!r} is infinite")


def _check_arrays(arrays: Any, expected_arrays: ArrayRecord | None) -> tuple[list[dict[str, Any]], int, str]:
    """A train reply's ArrayRecord: the global model's names and shapes, finite values.

    Returns what the audit trail records of it: the arrays' summaries, their bytes and digest.
    """
    if not isinstance(arrays, ArrayRecord):
        raise EgressViolation(f"'{ARRAYS_KEY}' must be an ArrayRecord")
    if expected_arrays is not None:
        _check_shapes(arrays, expected_arrays)
    for name, arr in arrays.items():
        values = arr.numpy()
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise EgressViolation(f"model array {name!r} holds non-finite values (NaN or inf)")
    summary = summarize(arrays)
    return summary["arrays"], summary["bytes"], summary["digest"]


def _check_shapes(arrays: ArrayRecord, expected_arrays: ArrayRecord) -> None:
    """The same array names and shapes as the global model, so no extra tensor can carry data out."""
    want = {k: tuple(a.shape) for k, a in expected_arrays.items()}
    got = {k: tuple(a.shape) for k, a in arrays.items()}
    if want != got:
        extra = sorted(set(got) - set(want))
        missing = sorted(set(want) - set(got))
        raise EgressViolation(
            f"model arrays differ from the global model (extra {extra}, missing {missing}, "
            "or shapes changed)"
        )


def _check_count_list(name: str, value: list[Any], longest: int) -> None:
    """A list of noisy counts: finite floats, no longer than the largest study can need."""
    if not 0 < len(value) <= longest:
        raise EgressViolation(f"metric {name!r} holds {len(value)} values; it may hold 1 to {longest}")
    if not all(isinstance(x, float) and math.isfinite(x) for x in value):
        raise EgressViolation(f"metric {name!r} must be a list of finite numbers")


def _check_anchor(record: Any) -> dict[str, Any]:
    """The anchor record: a ConfigRecord of exactly site, seq and head, each of its allowed form."""
    if not isinstance(record, ConfigRecord):
        raise EgressViolation(f"'{ANCHOR_RECORD}' must be a ConfigRecord holding the audit trail's anchor")
    try:
        site, seq, head = parse_anchor(dict(record))
    except AnchorError as err:
        raise EgressViolation(str(err)) from None
    return {"site": site, "seq": seq, "head": head}


# ---- SecAgg+ (issue 6) ------------------------------------------------------------------------------
# With secure aggregation on, a training round is four messages of Flower's SecAgg+ protocol and what a
# site sends is key material and its *masked* update (integers that reveal nothing without the other
# sites' masks). Each stage's reply has exactly these records and keys, nothing else.

#: Flower's SecAgg+ reply record (flwr.common.secure_aggregation.secaggplus_constants.RECORD_KEY_CONFIGS).
SECAGG_RECORD = "secaggplus_configs"
#: stage -> the keys of its SecAgg+ reply record.
SECAGG_STAGE_KEYS: dict[str, frozenset[str]] = {
    "setup": frozenset({"pk1", "pk2"}),
    "share_keys": frozenset({"dsts", "ctxts"}),
    "collect_masked_vectors": frozenset({"masked_params"}),
    "unmask": frozenset({"nids", "shares"}),
}
#: Records of the masked-vector reply besides SECAGG_RECORD (Flower's legacy FitRes layout).
SECAGG_FITRES_RECORDS = frozenset({"fitres.parameters", "fitres.num_examples", "fitres.metrics", "fitres.status"})
_MAX_KEY_BYTES = 4096  # a serialized EC public key, a Shamir share or an encrypted share pair: < 1 KiB


def is_secagg_reply(content: RecordDict) -> bool:
    return SECAGG_RECORD in content.config_records


def check_secagg_reply(content: RecordDict, message_type: str, expected_arrays: ArrayRecord | None) -> EgressReport:
    """Validate one SecAgg+ reply (any stage) against the allow-list, or raise :class:`EgressViolation`.

    ``expected_arrays`` is the global model of the masked-vector stage: the masked update must be one
    integer array per model array, of the same shape.
    """
    if _category(message_type) != "train":
        raise EgressViolation(f"SecAgg+ records may only answer a train message, not {message_type!r}")
    rec = content.config_records[SECAGG_RECORD]
    stage = _secagg_stage(rec)
    _check_secagg_records(content, stage)
    report = EgressReport(message_type=f"{message_type}:secagg:{stage}")
    if stage == "setup":
        sent = _check_public_keys(rec, report)
    elif stage in ("share_keys", "unmask"):
        sent = _check_shares(rec, stage, report)
    else:  # collect_masked_vectors: the masked update, shaped like the model
        sent = _check_masked_update(content, rec, expected_arrays, report)
    report.digest = hashlib.sha256(b"".join(sent)).hexdigest()
    return report


def _secagg_stage(rec: ConfigRecord) -> str:
    """The protocol stage whose reply keys the record holds, exactly."""
    keys = frozenset(rec.keys())
    stage = next((s for s, k in SECAGG_STAGE_KEYS.items() if k == keys), None)
    if stage is None:
        raise EgressViolation(f"SecAgg+ record keys {sorted(keys)} match no protocol stage")
    return stage


def _check_secagg_records(content: RecordDict, stage: str) -> None:
    """Besides the SecAgg+ record, only the masked-vector stage may carry records (Flower's FitRes layout)."""
    extra = set(content.keys()) - {SECAGG_RECORD}
    allowed_extra = SECAGG_FITRES_RECORDS if stage == "collect_masked_vectors" else frozenset()
    if not extra <= allowed_extra:
        raise EgressViolation(f"records {sorted(extra - allowed_extra)} may not leave with SecAgg+ stage {stage}")


def _bytes_list(rec: ConfigRecord, stage: str, name: str, limit: int | None) -> list[bytes]:
    """``rec[name]`` as a list of byte strings, each at most ``limit`` bytes long."""
    value = rec[name]
    if not isinstance(value, list) or not all(isinstance(b, bytes) for b in value):
        raise EgressViolation(f"SecAgg+ {stage}: {name!r} must be a list of bytes")
    for b in value:
        if limit is not None and len(b) > limit:
            raise EgressViolation(f"SecAgg+ {stage}: an item of {name!r} is {len(b)} bytes, over {limit}")
    return cast(list[bytes], value)


def _node_ids(rec: ConfigRecord, stage: str, name: str) -> list[int]:
    """``rec[name]`` as a list of node ids (integers, not booleans)."""
    value = rec[name]
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise EgressViolation(f"SecAgg+ {stage}: {name!r} must be a list of node ids")
    return cast(list[int], value)


def _check_public_keys(rec: ConfigRecord, report: EgressReport) -> list[bytes]:
    """Setup: two public keys, each one short byte string. Returns what the digest covers."""
    keys = []
    for k in ("pk1", "pk2"):
        v = rec[k]
        if not isinstance(v, bytes) or len(v) > _MAX_KEY_BYTES:
            raise EgressViolation(f"SecAgg+ setup: {k!r} must be one public key (bytes)")
        keys.append(v)
        report.bytes += len(v)
    return keys


def _check_shares(rec: ConfigRecord, stage: str, report: EgressReport) -> list[bytes]:
    """Share keys / unmask: node ids and as many key-sized blobs (encrypted shares, Shamir shares).
    Returns what the digest covers."""
    ids_key, blobs_key = ("dsts", "ctxts") if stage == "share_keys" else ("nids", "shares")
    ids = _node_ids(rec, stage, ids_key)
    blobs = _bytes_list(rec, stage, blobs_key, _MAX_KEY_BYTES)
    if len(ids) != len(blobs):
        raise EgressViolation(f"SecAgg+ {stage}: {ids_key!r} and {blobs_key!r} differ in length")
    report.bytes += sum(len(b) for b in blobs)
    return blobs


def _check_masked_update(content: RecordDict, rec: ConfigRecord, expected_arrays: ArrayRecord | None,
                         report: EgressReport) -> list[bytes]:
    """Collect masked vectors: one integer array per model array (the weight first), and an empty FitRes.
    Returns what the digest covers: each array's name and bytes."""
    masked = _bytes_list(rec, "collect_masked_vectors", "masked_params", None)
    if expected_arrays is None:
        raise EgressViolation("SecAgg+ masked update without the global model it answers")
    # Flower's SecAgg+ puts the (masked, quantized) weight first, as a one-element array.
    names = ["(weight)", *expected_arrays.keys()]
    want = [(1,), *(tuple(a.shape) for a in expected_arrays.values())]
    if len(masked) != len(want):
        raise EgressViolation(f"SecAgg+ masked update has {len(masked)} arrays, the model needs {len(want)} "
                              "(weight + one per model array)")
    sent = []
    for name, blob, shape in zip(names, masked, want, strict=True):
        arr = _masked_array(name, blob, shape)
        sent += [name.encode(), blob]
        report.arrays.append({"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype),
                              "bytes": len(blob), "masked": True})
        report.bytes += len(blob)
    report.metrics = _check_fitres(content)
    return sent


def _masked_array(name: str, blob: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """One masked array: a plain .npy of integers of the model array's shape (no pickles)."""
    try:
        arr = np.load(io.BytesIO(blob), allow_pickle=False)
    except (ValueError, OSError) as err:
        raise EgressViolation(f"SecAgg+ masked array {name!r} is not a plain array: {err}") from None
    if tuple(arr.shape) != shape or arr.dtype.kind not in "iu":
        raise EgressViolation(f"SecAgg+ masked array {name!r} is {arr.dtype}{list(arr.shape)}, "
                              f"not an integer array of shape {list(shape)}")
    return arr


def _check_fitres(content: RecordDict) -> list[str]:
    """The FitRes records beside the masked update: no unmasked arrays, the count, an empty status, and
    metrics from the train allow-list only. Returns the metric names."""
    params = content.array_records["fitres.parameters"]
    if any(len(a.data) for a in params.values()):
        raise EgressViolation("SecAgg+ masked-vector reply still carries unmasked arrays")
    num = content.metric_records["fitres.num_examples"]
    if set(num.keys()) != {"num_examples"}:
        raise EgressViolation("SecAgg+ fitres.num_examples must hold only num_examples")
    status = content.config_records["fitres.status"]
    if set(status.keys()) != {"code", "message"} or status["message"] not in ("", None):
        raise EgressViolation("SecAgg+ fitres.status must be an empty status")
    return _check_fitres_metrics(content.config_records["fitres.metrics"])


def _check_fitres_metrics(metrics: ConfigRecord) -> list[str]:
    """The site's training metrics beside a masked update: train allow-list names, one finite number each."""
    for name, value in metrics.items():
        if name not in TRAIN_METRICS:
            raise EgressViolation(f"metric {name!r} is not on the train allow-list")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and math.isinf(value)):
            raise EgressViolation(f"metric {name!r} must be a single finite number")
    return sorted(metrics.keys())
