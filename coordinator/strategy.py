"""The coordinator's Flower strategy: FedAvg, FedProx or FedAdam, from the run config.

Flower's own message-API strategies do the aggregation; we only add a thin
layer that records each site's scalar metrics and every decline with its
reason, which Flower's strategies log but do not keep.
"""

from __future__ import annotations

import logging
import math
import random
import time
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from coordinator.history import RunHistory
from coordinator.receipts import Receipts
from medfed.protocol import ERROR_NAMES
from medfed.settings import RunConfig

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
            if k == weighted_by_key or not isinstance(v, (int, float)) or math.isnan(float(v)):
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
    round_offset: int = 0  # rounds already done before a resume
    node_wait_timeout: float = 900.0
    receipts: "Receipts | None" = None
    secure: bool = False
    uniform_weights: bool = False
    poisson_rate: float | None = None
    num_sites: int | None = None
    released_rounds: int = 0
    _current: ArrayRecord | None = None
    _sent: list[Message] | None = None  # the last messages configured (their ids name a reply's site)

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

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
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

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        wait_for_nodes(grid, self.min_available_nodes, self.node_wait_timeout)  # type: ignore[attr-defined]
        messages = self._remember(super().configure_evaluate(server_round, arrays, config, grid))  # type: ignore[misc]
        config["server-round"] = server_round + self.round_offset
        return messages

    def _record(self, server_round: int, replies: list[Message], phase: str) -> None:
        rec = self.history.round(server_round + self.round_offset)
        nodes = self._sites_of(replies)
        for msg, node in zip(replies, nodes, strict=True):
            # Under SecAgg+ the train "replies" are the secure aggregate; their raw messages were logged
            # stage by stage by coordinator.secure.SecAggPlusGrid.
            if self.receipts is not None and not (self.secure and phase == "train"):
                self.receipts.received(server_round + self.round_offset, phase, msg, node=node)
            site = rec.site(node)
            if msg.has_error():
                site.no_result(phase, ERROR_NAMES.get(msg.error.code, "no-reply"), msg.error.reason)
                log.warning("round %d: site node %d sent no %s result: %s", server_round,
                            node, phase, msg.error.reason)
                continue
            if phase == "train":
                site.status, site.reason = "trained", None
            metrics = next(iter(msg.content.metric_records.values()), None)
            if metrics is not None:
                getattr(site, phase).update(dict(metrics))
        # Flower hands over only the replies that came; a site that stayed silent (e.g. killed mid-round
        # and back too late) must still show in the round, or the operator cannot tell who was missing.
        for nid in {m.metadata.dst_node_id for m in self._sent or []} - set(nodes):
            reason = f"no {phase} reply from site node {nid} before the round's timeout"
            rec.site(nid).no_result(phase, "no-reply", reason)
            log.warning("round %d: %s", server_round, reason)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._record(server_round, replies, "train")
        valid = [m for m in replies if not m.has_error()]
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
            self.receipts.aggregation(server_round + self.round_offset, replies, arrays, self.secure)
        if arrays is not None:
            self.released_rounds += 1
        self.history.round(server_round + self.round_offset).train = dict(metrics) if metrics is not None else {}
        return arrays, metrics

    def _aggregate_uniform(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
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

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self._record(server_round, replies, "evaluate")
        metrics = super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]
        self.history.round(server_round + self.round_offset).evaluate = dict(metrics) if metrics is not None else {}
        return metrics


def _fixed_denominator(current: ArrayRecord, mean: ArrayRecord, sampled: int, expected: float) -> ArrayRecord:
    """current + (sum of updates) / (expected number of sites): the Poisson DP-FedAvg estimator."""
    scale = sampled / expected
    return ArrayRecord({
        k: Array(np.asarray(current[k].numpy() + scale * (mean[k].numpy() - current[k].numpy()),
                            dtype=current[k].numpy().dtype))
        for k in current.keys()
    })


class RecordingFedAvg(_Recording, FedAvg):
    """FedAvg that keeps per-site metrics and declines."""


class RecordingFedProx(_Recording, FedProx):
    """FedProx that keeps per-site metrics and declines."""


class RecordingFedAdam(_Recording, FedAdam):
    """FedAdam that keeps per-site metrics and declines."""


def build_strategy(cfg: RunConfig, history: RunHistory) -> Strategy:
    """The strategy the run config asks for, recording into ``history``."""
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
    else:
        strategy = RecordingFedAdam(**common, eta=cfg.server_lr, eta_l=cfg.lr)
    strategy.history = history  # type: ignore[attr-defined]
    strategy.node_wait_timeout = cfg.round_timeout  # type: ignore[attr-defined]
    return strategy
