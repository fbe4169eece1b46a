"""The coordinator's Flower strategy: FedAvg, FedProx or FedAdam, from the run config.

Flower's own message-API strategies do the aggregation; we only add a thin
layer that records each site's scalar metrics and every decline with its
reason, which Flower's strategies log but do not keep.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from coordinator.history import RunHistory
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


class _Recording:
    """Mixin: remember each site's reply (metrics, or the reason it gave none)."""

    history: RunHistory
    round_offset: int = 0  # rounds already done before a resume
    node_wait_timeout: float = 900.0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        wait_for_nodes(grid, self.min_available_nodes, self.node_wait_timeout)  # type: ignore[attr-defined]
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        wait_for_nodes(grid, self.min_available_nodes, self.node_wait_timeout)  # type: ignore[attr-defined]
        return super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]

    def _record(self, server_round: int, replies: list[Message], phase: str) -> None:
        rec = self.history.round(server_round + self.round_offset)
        for msg in replies:
            site = rec.site(msg.metadata.src_node_id)
            if msg.has_error():
                code = msg.error.code
                site.status = ERROR_NAMES.get(code, "no-reply") if phase == "train" else site.status
                site.reason = msg.error.reason
                log.warning("round %d: site node %d sent no %s result: %s", server_round,
                            msg.metadata.src_node_id, phase, msg.error.reason)
                continue
            if phase == "train":
                site.status, site.reason = "trained", None
            metrics = next(iter(msg.content.metric_records.values()), None)
            if metrics is not None:
                getattr(site, phase).update(dict(metrics))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._record(server_round, replies, "train")
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        self.history.round(server_round + self.round_offset).train = dict(metrics) if metrics is not None else {}
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self._record(server_round, replies, "evaluate")
        metrics = super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]
        self.history.round(server_round + self.round_offset).evaluate = dict(metrics) if metrics is not None else {}
        return metrics


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
