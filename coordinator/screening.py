"""Every site's training reply is checked before it can reach the aggregation.

One malicious site must not spoil the global model: a single NaN, an array of
another shape (numpy would broadcast it onto every weight, or raise and end the
run), a huge update, or a replay of an earlier update is refused here with a
reason, and only that site drops out of the round. A site's claimed
``num-examples`` is checked for sense, but the weight a site gets is decided by
the run config (``site-weights``), never by the claim (docs/deployment.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from anonymization.audit.anchors import ANCHOR_RECORD
from coordinator.receipts import arrays_digest
from medfed.protocol import COORDINATOR_REJECTED

#: The metric record of a reply (the sites' egress guard allows this one name).
METRICS_RECORD = "metrics"
#: The metric holding a site's coarse training-set size (its published size bucket).
NUM_EXAMPLES = "num-examples"
#: Reason given for an update already seen in an earlier round of this run.
REPLAYED = "replayed"


@dataclass(frozen=True)
class Verdict:
    """What the screen concluded about one reply: ``reason`` is None when it may be aggregated."""

    reason: str | None
    digest: str | None = None
    update_norm: float | None = None


def check_train_reply(content: RecordDict, current: ArrayRecord, *, arrays_key: str, max_update_norm: float,
                      seen: dict[str, int], server_round: int, check_replay: bool = True) -> Verdict:
    """Screen one training reply against the global model ``current`` that was sent.

    ``seen`` maps the digest of every update received in this run to its round; a
    digest seen in an earlier round is a replay. ``max_update_norm`` 0 means no bound.
    """
    names = set(content.keys())
    required = {arrays_key, METRICS_RECORD}
    allowed = required | {ANCHOR_RECORD}
    if not required <= names or not names <= allowed:
        return Verdict(f"reply records {sorted(names)}; a training reply holds {sorted(required)} "
                       f"and optionally '{ANCHOR_RECORD}'")
    arrays, metrics = content[arrays_key], content[METRICS_RECORD]
    if not isinstance(arrays, ArrayRecord):
        return Verdict(f"'{arrays_key}' is a {type(arrays).__name__}, not an ArrayRecord")
    if not isinstance(metrics, MetricRecord):
        return Verdict(f"'{METRICS_RECORD}' is a {type(metrics).__name__}, not a MetricRecord")
    if ANCHOR_RECORD in names and not isinstance(content[ANCHOR_RECORD], ConfigRecord):
        return Verdict(f"'{ANCHOR_RECORD}' is a {type(content[ANCHOR_RECORD]).__name__}, not a ConfigRecord")

    problem = _metrics_problem(metrics)
    if problem:
        return Verdict(problem)
    if list(arrays.keys()) != list(current.keys()):
        return Verdict(f"arrays {list(arrays.keys())[:4]} differ from the global model's {list(current.keys())}")
    try:
        digest = arrays_digest(arrays)
        norm_sq = 0.0
        for name, want in current.items():
            got = arrays[name]
            if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
                return Verdict(f"array {name!r} is {got.dtype}{list(got.shape)}; the global model's is "
                               f"{want.dtype}{list(want.shape)}", digest)
            values = got.numpy()
            if values.shape != tuple(want.shape) or not np.isfinite(values).all():
                return Verdict(f"array {name!r} holds non-finite values (NaN or inf)", digest)
            diff = values.astype(np.float64) - want.numpy().astype(np.float64)
            norm_sq += float(np.dot(diff.ravel(), diff.ravel()))
    except Exception as err:  # noqa: BLE001 - an undecodable array is a bad reply, not a crash of the run
        return Verdict(f"arrays could not be decoded ({type(err).__name__}: {err})")
    norm = math.sqrt(norm_sq)
    if not math.isfinite(norm):
        return Verdict(f"the update's L2 norm overflows ({norm})", digest)
    if max_update_norm > 0 and norm > max_update_norm:
        return Verdict(f"update L2 norm {norm:.4g} is above max-update-norm {max_update_norm:g}", digest, norm)
    if check_replay and seen.get(digest, server_round) < server_round:
        return Verdict(REPLAYED, digest, norm)
    return Verdict(None, digest, norm)


def _metrics_problem(metrics: MetricRecord) -> str | None:
    """Why the metrics cannot be used (None: every value one finite number, a positive num-examples)."""
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric {name!r} must be a single number, not {type(value).__name__}"
        if not math.isfinite(float(value)):
            return f"metric {name!r} is not finite ({value})"
    if NUM_EXAMPLES not in metrics:
        return f"metric {NUM_EXAMPLES!r} is missing"
    count = float(metrics[NUM_EXAMPLES])  # type: ignore[arg-type]
    if count < 1 or count != int(count):
        return f"metric {NUM_EXAMPLES!r} = {metrics[NUM_EXAMPLES]} is not a positive count"
    return None


@dataclass(frozen=True)
class Screened:
    """One reply after the screen: ``message`` is what aggregation sees (the reply, or an error standing in
    for it when it was refused), ``original`` what the site sent, ``verdict`` what its receipt says."""

    message: Message
    original: Message
    verdict: dict[str, object] | None = None


@dataclass
class ReplyScreen:
    """Screens each round's training replies with :func:`check_train_reply`.

    It remembers the digest of every update of the run (``seen``: a resumed run
    starts from its receipts), so a replay of an earlier round's update, from any
    site, is refused. Under SecAgg+ every reply carries the same aggregate, so
    ``check_replay`` is off there.
    """

    arrays_key: str
    max_update_norm: float = 0.0  # L2 bound on a reply's update (0: none)
    check_replay: bool = True
    seen: dict[str, int] = field(default_factory=dict)

    def screen(self, replies: Iterable[Message], current: ArrayRecord | None, server_round: int) -> list[Screened]:
        """Each reply with its verdict; a refused one replaced by an error (code COORDINATOR_REJECTED, the
        reason), so that Flower's strategies and DP wrappers treat the site as one that sent nothing.
        Without the global model that was sent (``current``) nothing can be checked, and replies pass."""
        return [self._one(msg, current, server_round) for msg in replies]

    def _one(self, msg: Message, current: ArrayRecord | None, server_round: int) -> Screened:
        if msg.has_error():
            return Screened(msg, msg)
        if current is None:
            return Screened(msg, msg, {"status": "accepted"})
        verdict = check_train_reply(msg.content, current, arrays_key=self.arrays_key,
                                    max_update_norm=self.max_update_norm, seen=self.seen,
                                    server_round=server_round, check_replay=self.check_replay)
        if verdict.digest is not None:
            self.seen.setdefault(verdict.digest, server_round)
        if verdict.reason is not None:
            stand_in = Message(error=Error(COORDINATOR_REJECTED, verdict.reason), metadata=msg.metadata)
            return Screened(stand_in, msg, {"status": "rejected", "reason": verdict.reason})
        if verdict.update_norm is None:
            return Screened(msg, msg, {"status": "accepted"})
        return Screened(msg, msg, {"status": "accepted", "update_norm": verdict.update_norm})
