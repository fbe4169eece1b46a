"""The coordinator's Flower strategy, from the run config: FedAvg, FedProx, FedAdam, or a robust one
(FedMedian, FedTrimmedAvg, Krum, Bulyan).

Flower's own message-API strategies do the aggregation; we only add a thin
layer that screens every training reply before it is aggregated
(:mod:`coordinator.screening`: a bad reply drops that site from the round, with
its reason) and records each site's scalar metrics and every decline with its
reason, which Flower's strategies log but do not keep.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Bulyan, FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy

from anonymization.audit_anchors import ANCHOR_RECORD, AnchorError, parse_anchor
from coordinator.history import RunHistory, SiteRound
from coordinator.receipts import Receipts, aggregation_inputs
from coordinator.screening import check_train_reply
from medfed.protocol import COORDINATOR_REJECTED, ERROR_NAMES
from medfed.settings import RunConfig
from models.metrics import COUNT_KEYS, BinnedCounts, counts_from_reply, metrics_from_counts
from models.study import DEFAULT_STUDY, Study

log = logging.getLogger(__name__)


def weighted_mean_ignoring_nan(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Example-weighted mean of each metric over sites, skipping sites where it is undefined.

    Flower's default aggregator turns one NaN (AUC on a one-class test split)
    into a NaN for the whole consortium; a site without both classes simply
    has no say in the AUC.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for rec in records:
        metrics = next(iter(rec.metric_records.values()))
        w = float(metrics[weighted_by_key])
        for k, v in metrics.items():
            if k == weighted_by_key or isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)):
                continue
            sums[k] = sums.get(k, 0.0) + w * float(v)
            weights[k] = weights.get(k, 0.0) + w
    out = {k: sums[k] / weights[k] for k in sums if weights[k] > 0}
    out[weighted_by_key] = int(sum(float(next(iter(r.metric_records.values()))[weighted_by_key]) for r in records))
    return MetricRecord(out)


class NodesUnavailable(RuntimeError):
    """Too few sites connected within the wait the run allows."""


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, poll: float = 0.5) -> int:
    """Wait until ``minimum`` nodes are connected, at most ``timeout`` seconds; return how many are.

    Flower's own wait has no bound (a run whose minimum exceeds the sites
    present would hang for ever), and it sizes the sample from the nodes seen
    *before* waiting, so the first round of a fraction-1.0 run can leave sites
    out. Waiting here first fixes both.
    """
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < minimum:
        if time.monotonic() >= deadline:
            raise NodesUnavailable(
                f"only {connected} of the {minimum} sites the run needs (min-available-nodes) connected "
                f"within {timeout:g}s; start the missing sites' SuperNodes or lower min-available-nodes"
            )
        time.sleep(poll)
    return connected


#: Metric a uniformly weighted aggregation weights by (site-level DP: every site counts the same).
UNIFORM_KEY = "site-weight"


class _Recording:
    """Mixin: remember each site's reply (metrics, or the reason it gave none).

    Deployment additions (issue 6): what arrived is written to the run's
    receipts (``receipts``); ``uniform_weights`` averages sites equally (needed
    for site-level DP: each site's clipped update must weigh 1/m); with
    ``poisson_rate`` each site is sampled independently and the mean update is
    taken over the *expected* number of sites; ``released_rounds`` counts the
    rounds that produced a model (for the site-level ε).
    """

    history: RunHistory
    study: Study = DEFAULT_STUDY  # what the sites' evaluation counts are read against
    round_offset: int = 0  # rounds already done before a resume
    node_wait_timeout: float = 900.0
    receipts: Receipts | None = None
    secure: bool = False
    uniform_weights: bool = False
    poisson_rate: float | None = None
    num_sites: int | None = None
    released_rounds: int = 0
    max_update_norm: float = 0.0  # L2 bound on a reply's update (0: none); replies above it are rejected
    _current: ArrayRecord | None = None
    _sent: list[Message] | None = None  # the last messages configured (their ids name a reply's site)
    _seen: dict[str, int] | None = None  # digest of every training update this run -> its round (replays)
    _rejected: dict[int, tuple[Message, str]] | None = None  # id(stand-in error) -> (the reply, why refused)
    _recorded_round: int | None = None  # the last round aggregate_train recorded (see screen_first)
    _norms: dict[int, tuple[Message, float | None]] | None = None  # id(accepted reply) -> (it, its update norm)
    _pool: list[tuple[str | None, BinnedCounts]] | None = None  # this round's sites' evaluation counts

    def _remember(self, messages: Iterable[Message]) -> list[Message]:
        self._sent = list(messages)
        return self._sent

    def _sites_of(self, replies: list[Message]) -> list[int]:
        """The site each reply is about. The SuperLink answers for an unavailable node under its own id
        (1): such a reply names the message it answers, else it is one of the sites that did not reply."""
        sent = self._sent or []
        by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
        answered = {r.metadata.src_node_id for r in replies if r.metadata.src_node_id != SUPERLINK_NODE_ID}
        missing = [m.metadata.dst_node_id for m in sent if m.metadata.dst_node_id not in answered]
        out = []
        for r in replies:
            nid = r.metadata.src_node_id
            if nid == SUPERLINK_NODE_ID:
                nid = by_id.get(r.metadata.reply_to_message_id) or (missing[0] if missing else nid)
                if nid in missing:
                    missing.remove(nid)
            out.append(nid)
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        connected = wait_for_nodes(grid, self.min_available_nodes, self.node_wait_timeout)  # type: ignore[attr-defined]
        if self.num_sites is None:
            self.num_sites = connected
        self._current = arrays
        if self.poisson_rate is None:
            messages = self._remember(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
            config["server-round"] = server_round + self.round_offset  # the sites see the run's round, resumed or not
            return messages
        # Poisson sampling: each site joins with probability q, independently (site-level DP accounting).
        nodes = [n for n in grid.get_node_ids() if random.random() < self.poisson_rate]
        log.info("configure_train: Poisson-sampled %d of %d sites (q=%g)", len(nodes), connected, self.poisson_rate)
        config["server-round"] = server_round + self.round_offset
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})  # type: ignore[attr-defined]
        return self._remember(self._construct_messages(record, nodes, MessageType.TRAIN))  # type: ignore[attr-defined]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        wait_for_nodes(grid, self.min_available_nodes, self.node_wait_timeout)  # type: ignore[attr-defined]
        messages = self._remember(super().configure_evaluate(server_round, arrays, config, grid))  # type: ignore[misc]
        config["server-round"] = server_round + self.round_offset
        return messages

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies with every training reply that fails :func:`check_train_reply` replaced by an error
        (code COORDINATOR_REJECTED, the reason): Flower's strategies and DP wrappers then treat the site as
        one that sent nothing, and the run goes on. Idempotent, so wrappers may screen before this layer."""
        if self._current is None:
            return list(replies)
        if self._seen is None:
            self._seen = {}
        if self._rejected is None:
            self._rejected = {}
        if self._norms is None:
            self._norms = {}
        run_round = server_round + self.round_offset
        out: list[Message] = []
        for msg in replies:
            if msg.has_error():
                out.append(msg)
                continue
            verdict = check_train_reply(
                msg.content, self._current, arrays_key=self.arrayrecord_key,  # type: ignore[attr-defined]
                max_update_norm=self.max_update_norm, seen=self._seen, server_round=run_round,
                check_replay=not self.secure)  # under SecAgg+ every reply carries the same aggregate
            if verdict.digest is not None:
                self._seen.setdefault(verdict.digest, run_round)
            if verdict.reason is None:
                self._norms[id(msg)] = (msg, verdict.update_norm)
                out.append(msg)
                continue
            stand_in = Message(error=Error(COORDINATOR_REJECTED, verdict.reason), metadata=msg.metadata)
            self._rejected[id(stand_in)] = (msg, verdict.reason)
            out.append(stand_in)
        return out

    def _record(self, server_round: int, replies: list[Message], phase: str) -> None:
        rec = self.history.round(server_round + self.round_offset)
        nodes = self._sites_of(replies)
        rejected = self._rejected or {}
        for msg, node in zip(replies, nodes, strict=True):
            # Under SecAgg+ the train "replies" are the secure aggregate; their raw messages were logged
            # stage by stage by coordinator.secure.SecAggPlusGrid.
            if self.receipts is not None and not (self.secure and phase == "train"):
                original, reason = rejected.get(id(msg), (msg, None))
                verdict: dict[str, object] | None = None
                if phase == "train" and reason is not None:
                    verdict = {"status": "rejected", "reason": reason}
                elif phase == "train" and not msg.has_error():
                    norm = (self._norms or {}).get(id(msg), (None, None))[1]
                    verdict = {"status": "accepted"} if norm is None else {"status": "accepted", "update_norm": norm}
                self.receipts.received(server_round + self.round_offset, phase, original, node=node, verdict=verdict)
            site = rec.site(node)
            _name_site(site, msg)
            if msg.has_error():
                site.no_result(phase, ERROR_NAMES.get(msg.error.code, "no-reply"), msg.error.reason)
                log.warning("round %d: site node %d sent no %s result: %s", server_round,
                            node, phase, msg.error.reason)
                continue
            if phase == "train":
                site.status, site.reason = "trained", None
            metrics = next(iter(msg.content.metric_records.values()), None)
            if metrics is not None:
                values = dict(metrics)
                if phase == "evaluate":
                    self._site_counts(site, values)
                getattr(site, phase).update({k: v for k, v in values.items() if k not in COUNT_KEYS})
        # Flower hands over only the replies that came; a site that stayed silent (e.g. killed mid-round
        # and back too late) must still show in the round, or the operator cannot tell who was missing.
        for nid in {m.metadata.dst_node_id for m in self._sent or []} - set(nodes):
            reason = f"no {phase} reply from site node {nid} before the round's timeout"
            rec.site(nid).no_result(phase, "no-reply", reason)
            log.warning("round %d: %s", server_round, reason)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = self.screen(server_round, replies)
        self._record(server_round, replies, "train")
        self._rejected, self._norms, self._recorded_round = {}, {}, server_round
        valid = [m for m in replies if not m.has_error()]
        inputs = aggregation_inputs(replies)  # before aggregating: FedMedian & co. pop the arrays they use
        if self.poisson_rate is not None and not valid and self._current is not None:
            # Nobody sampled: the release is the current model (the DP wrapper adds its noise).
            arrays, metrics = self._current, MetricRecord()
        elif self.uniform_weights:
            arrays, metrics = self._aggregate_uniform(server_round, replies)
        else:
            arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is not None and self.poisson_rate is not None and valid and self._current is not None:
            arrays = _fixed_denominator(self._current, arrays, len(valid), self.poisson_rate * (self.num_sites or 1))
        if self.receipts is not None:
            self.receipts.aggregation(server_round + self.round_offset, inputs, arrays, self.secure)
        if arrays is not None:
            self.released_rounds += 1
        self.history.round(server_round + self.round_offset).train = dict(metrics) if metrics is not None else {}
        return arrays, metrics

    def _aggregate_uniform(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The strategy's aggregation with every site weighing the same (clipped updates, 1/m each)."""
        rewritten = []
        for m in replies:
            if m.has_error():
                rewritten.append(m)
                continue
            metrics = next(iter(m.content.metric_records.values()))
            content = RecordDict({
                **{k: v for k, v in m.content.array_records.items()},
                "metrics": MetricRecord({**dict(metrics), UNIFORM_KEY: 1}),
            })
            rewritten.append(Message(content=content, metadata=m.metadata))
        key = self.weighted_by_key  # type: ignore[attr-defined,has-type]
        self.weighted_by_key = UNIFORM_KEY  # type: ignore[attr-defined]
        try:
            return super().aggregate_train(server_round, rewritten)  # type: ignore[misc]
        finally:
            self.weighted_by_key = key  # type: ignore[attr-defined]

    def _site_counts(self, site: SiteRound, values: dict[str, object]) -> None:
        """Read a site's noisy counts against the study: its own per-class figures, and a share of the pool."""
        if not any(k in values for k in COUNT_KEYS):
            return  # a site that released only scalars (an older site): it is in the mean, not in the pool
        try:
            counts = counts_from_reply(values, self.study)
        except ValueError as err:
            site.evaluate_error = f"its evaluation counts do not fit the study and were not pooled: {err}"
            log.warning("site %s: %s", site.name or "?", site.evaluate_error)
            return
        site.metrics = metrics_from_counts(counts, self.study).to_json()
        self._pool = [*(self._pool or []), (site.name, counts)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self._pool = []
        self._record(server_round, replies, "evaluate")
        rec = self.history.round(server_round + self.round_offset)
        pool, self._pool = self._pool, []
        if pool:  # the consortium's figures from the summed noisy counts: post-processing of what was released
            total: BinnedCounts = pool[0][1]
            for _, c in pool[1:]:
                total = total + c
            rec.pooled = {**metrics_from_counts(total, self.study).to_json(),
                          "sites": [name or "?" for name, _ in pool]}
        stripped = [_without_counts(m) for m in replies]  # the mean is over the scalar figures
        metrics = super().aggregate_evaluate(server_round, stripped)  # type: ignore[misc]
        rec.evaluate = dict(metrics) if metrics is not None else {}
        return metrics


def _name_site(site: SiteRound, msg: Message) -> None:
    """Take the site's name from the audit anchor its reply carries (error and SecAgg+ replies have none)."""
    if msg.has_error() or ANCHOR_RECORD not in msg.content:
        return
    record = msg.content[ANCHOR_RECORD]
    if isinstance(record, ConfigRecord):
        with contextlib.suppress(AnchorError):  # receipts.py logs a malformed anchor; the node names the site
            site.name = parse_anchor(dict(record))[0]


def _without_counts(msg: Message) -> Message:
    """The reply with its evaluation counts left out (they are pooled, not averaged)."""
    if msg.has_error():
        return msg
    content = RecordDict({
        k: (MetricRecord({n: v for n, v in r.items() if n not in COUNT_KEYS}) if isinstance(r, MetricRecord) else r)
        for k, r in msg.content.items()
    })
    return Message(content=content, metadata=msg.metadata)


def _fixed_denominator(current: ArrayRecord, mean: ArrayRecord, sampled: int, expected: float) -> ArrayRecord:
    """current + (sum of updates) / (expected number of sites): the Poisson DP-FedAvg estimator."""
    scale = sampled / expected
    return ArrayRecord({
        k: Array(np.asarray(current[k].numpy() + scale * (mean[k].numpy() - current[k].numpy()),
                            dtype=current[k].numpy().dtype))
        for k in current
    })


class RecordingFedAvg(_Recording, FedAvg):
    """FedAvg that keeps per-site metrics and declines."""


class RecordingFedProx(_Recording, FedProx):
    """FedProx that keeps per-site metrics and declines."""


class RecordingFedAdam(_Recording, FedAdam):
    """FedAdam that keeps per-site metrics and declines."""


class RecordingFedMedian(_Recording, FedMedian):
    """FedMedian (coordinate-wise median) that keeps per-site metrics and declines."""


class RecordingFedTrimmedAvg(_Recording, FedTrimmedAvg):
    """FedTrimmedAvg (coordinate-wise trimmed mean) that keeps per-site metrics and declines."""


class RecordingKrum(_Recording, Krum):
    """Krum (the update closest to its neighbours) that keeps per-site metrics and declines."""


class RecordingBulyan(_Recording, Bulyan):
    """Bulyan (Multi-Krum selection, then trimmed mean) that keeps per-site metrics and declines."""


def screen_first(top: Strategy, recording: Strategy) -> Strategy:
    """Make ``top`` (a DP wrapper around ``recording``) screen replies before its own clipping sees them.

    Flower's wrappers subtract the global model from each reply: an array of another shape
    would raise there before the recording strategy could refuse it.
    """
    if top is recording:
        return top
    aggregate = top.aggregate_train

    def aggregate_train(
        server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        screened = recording.screen(server_round, replies)  # type: ignore[attr-defined]
        recording._recorded_round = None  # type: ignore[attr-defined]
        result = aggregate(server_round, screened)
        if recording._recorded_round != server_round:  # type: ignore[attr-defined]
            # The wrapper skipped a round with an error reply: the round must still say who and why.
            recording._record(server_round, screened, "train")  # type: ignore[attr-defined]
            recording._rejected, recording._norms = {}, {}  # type: ignore[attr-defined]
        return result

    top.aggregate_train = aggregate_train  # type: ignore[method-assign]
    return top


def build_strategy(cfg: RunConfig, history: RunHistory, study: Study | None = None) -> Strategy:
    """The strategy the run config asks for, recording into ``history``; ``study`` reads the evaluations."""
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=cfg.min_evaluate_nodes,
        min_available_nodes=cfg.min_available_nodes,
        weighted_by_key="num-examples",
        train_metrics_aggr_fn=weighted_mean_ignoring_nan,
        evaluate_metrics_aggr_fn=weighted_mean_ignoring_nan,
    )
    strategy: Strategy
    if cfg.strategy == "fedavg":
        strategy = RecordingFedAvg(**common)
    elif cfg.strategy == "fedprox":
        strategy = RecordingFedProx(**common, proximal_mu=cfg.proximal_mu)
    elif cfg.strategy == "fedadam":
        strategy = RecordingFedAdam(**common, eta=cfg.server_lr, eta_l=cfg.lr)
    elif cfg.strategy == "fedmedian":
        strategy = RecordingFedMedian(**common)
    elif cfg.strategy == "fedtrimmedavg":
        strategy = RecordingFedTrimmedAvg(**common, beta=cfg.trim_beta)
    elif cfg.strategy == "krum":
        strategy = RecordingKrum(**common, num_malicious_nodes=cfg.num_malicious_sites)
    else:
        strategy = RecordingBulyan(**common, num_malicious_nodes=cfg.num_malicious_sites)
    strategy.history = history  # type: ignore[attr-defined]
    strategy.study = study or DEFAULT_STUDY  # type: ignore[attr-defined]
    strategy.node_wait_timeout = cfg.round_timeout  # type: ignore[attr-defined]
    # A site's own claim never sets its weight unless the run says so (docs/deployment.md, "A malicious site").
    strategy.uniform_weights = cfg.site_weights == "uniform"  # type: ignore[attr-defined]
    strategy.max_update_norm = cfg.max_update_norm  # type: ignore[attr-defined]
    return strategy
