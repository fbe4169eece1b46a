"""The coordinator's Flower strategy, from the run config: FedAvg, FedProx, FedAdam, or a robust one
(FedMedian, FedTrimmedAvg, Krum, Bulyan).

Flower's own message-API strategies do the aggregation. What we add are
wrappers, each a :class:`Strategy` around the one it is given (the way Flower
adds differential privacy), composed by :func:`build_strategy` from the outside
in:

- :class:`Recording`: waits for the sites, screens every training reply before
  anything else sees it (:mod:`coordinator.screening`: a bad reply drops that
  site from the round, with its reason), and records each site's reply, its
  metrics or the reason it gave none (history, ``received.jsonl``), which
  Flower's strategies log but do not keep;
- Flower's site-level DP wrapper, when the run asks for one (:mod:`coordinator.site_dp`);
- :class:`AggregationReceipts`: what reached aggregation and what came out;
- :class:`PoissonSampling`: each site joins a round independently (site-level DP);
- :class:`UniformWeights`: every site weighs the same, whatever it claims;
- the Flower strategy itself.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Bulyan, FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy

from anonymization.audit.anchors import ANCHOR_RECORD, AnchorError, parse_anchor
from coordinator import site_dp
from coordinator.history import RoundRecord, RunHistory, SiteRound
from coordinator.receipts import Receipts, aggregation_inputs
from coordinator.screening import NUM_EXAMPLES, ReplyScreen, Screened
from medfed.protocol import ERROR_NAMES
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


def mean_by_examples(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """The evaluation figures weighted by each site's test-set size, whatever the training weight is.

    Uniform weights are for the model update (site-level DP); an AUC is still
    better estimated from every test example than from every site. The training
    weight ``weighted_by_key`` is no evaluation figure and is left out.
    """
    out = weighted_mean_ignoring_nan(records, NUM_EXAMPLES)
    return MetricRecord({k: v for k, v in out.items() if k == NUM_EXAMPLES or k != weighted_by_key})


class StrategyWrapper(Strategy):
    """A strategy that hands every step to the one it wraps; subclasses change the steps they are for."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


def innermost(strategy: Strategy) -> Strategy:
    """The Flower strategy inside the wrappers (each keeps the one it wraps as ``strategy``, as Flower's do)."""
    while isinstance(inner := getattr(strategy, "strategy", None), Strategy):
        strategy = inner
    return strategy


class UniformWeights(StrategyWrapper):
    """Every site weighs the same in the model update (1/m each), whatever ``num-examples`` it claims.

    A site's claim never sets its weight unless the run says so (docs/deployment.md,
    "A malicious site"), and site-level DP needs each clipped update to weigh 1/m.
    Every reply gets ``key`` = 1, which the wrapped strategy must weight by
    (evaluation figures stay weighted by examples: :func:`mean_by_examples`).
    """

    def __init__(self, strategy: Strategy, key: str = UNIFORM_KEY) -> None:
        base = innermost(strategy)
        if isinstance(base, FedAvg) and base.weighted_by_key != key:
            raise ValueError(f"UniformWeights sets {key!r}: build the strategy with weighted_by_key={key!r}, "
                             f"not {base.weighted_by_key!r}")
        super().__init__(strategy)
        self.key = key

    def summary(self) -> None:
        log.info("\t├──> Uniform site weights ('%s' = 1 for every site)", self.key)
        super().summary()

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, [self._weigh(m) for m in replies])

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, [self._weigh(m) for m in replies])

    def _weigh(self, msg: Message) -> Message:
        """The reply with weight 1 added to its metrics (its arrays kept as they are)."""
        metrics = None if msg.has_error() else next(iter(msg.content.metric_records.values()), None)
        if metrics is None:  # an error, or a reply Flower's own checks refuse
            return msg
        content = RecordDict({
            **dict(msg.content.array_records.items()),
            "metrics": MetricRecord({**dict(metrics), self.key: 1}),
        })
        return Message(content=content, metadata=msg.metadata)


class PoissonSampling(StrategyWrapper):
    """Each site joins a round with probability ``rate``, independently, and the round's model is the current
    one plus the sum of the updates over ``expected_sites`` (qN): the Poisson DP-FedAvg estimator that
    site-level Poisson accounting assumes (:mod:`coordinator.site_dp`).

    The wrapped strategy offers the round to every site (build it with fraction-train 1.0); this wrapper
    keeps each of its messages with probability ``rate``. ``rng`` makes the draw reproducible in tests.
    """

    def __init__(self, strategy: Strategy, rate: float, expected_sites: float,
                 rng: random.Random | None = None) -> None:
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"the Poisson sampling rate {rate} must be in (0, 1]")
        if expected_sites <= 0:
            raise ValueError(f"the expected number of sites {expected_sites} must be positive")
        base = innermost(strategy)
        if isinstance(base, FedAvg) and base.fraction_train != 1.0:
            raise ValueError(f"Poisson sampling draws from every site: build the strategy with fraction_train=1.0, "
                             f"not {base.fraction_train}")
        super().__init__(strategy)
        self.rate = rate
        self.expected_sites = expected_sites
        self._rng = rng if rng is not None else random.Random()
        self._current: ArrayRecord | None = None

    def summary(self) -> None:
        log.info("\t├──> Poisson sampling of sites: q=%g, mean over %g expected sites", self.rate,
                 self.expected_sites)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._current = arrays
        offered = list(self.strategy.configure_train(server_round, arrays, config, grid))
        sampled = [m for m in offered if self._rng.random() < self.rate]
        log.info("configure_train: Poisson-sampled %d of %d sites (q=%g)", len(sampled), len(offered), self.rate)
        return sampled

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        taken = sum(not m.has_error() for m in replies)
        if self._current is None:
            return self.strategy.aggregate_train(server_round, replies)
        if not taken:  # nobody sampled: the release is the current model (the DP wrapper adds its noise)
            return self._current, MetricRecord()
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = fixed_denominator(self._current, arrays, taken, self.expected_sites)
        return arrays, metrics


def fixed_denominator(current: ArrayRecord, mean: ArrayRecord, sampled: int, expected: float) -> ArrayRecord:
    """current + (sum of updates) / (expected number of sites), from the mean of ``sampled`` updates."""
    scale = sampled / expected
    return ArrayRecord({
        k: Array(np.asarray(current[k].numpy() + scale * (mean[k].numpy() - current[k].numpy()),
                            dtype=current[k].numpy().dtype))
        for k in current
    })


class AggregationReceipts(StrategyWrapper):
    """Writes what reached each round's aggregation and what came out (``aggregation.jsonl``).

    Under site-level DP it sits inside Flower's wrapper: the inputs are the clipped
    updates and the result is the mean before noise; a round the wrapper skipped
    aggregated nothing and has no line.
    """

    def __init__(self, strategy: Strategy, receipts: Receipts, *, secure: bool = False, round_offset: int = 0) -> None:
        super().__init__(strategy)
        self.receipts = receipts
        self.secure = secure
        self.round_offset = round_offset

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        inputs = aggregation_inputs(replies)  # before aggregating: FedMedian & co. pop the arrays they use
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        self.receipts.aggregation(server_round + self.round_offset, inputs, arrays, self.secure)
        return arrays, metrics


class Recording(StrategyWrapper):
    """The outermost layer: waits for the sites, screens every training reply, and records each site's reply.

    The screen comes before anything else sees a reply (Flower's DP wrappers subtract
    the global model from it: an array of another shape would raise there). What
    arrived is written to the history (metrics, or the reason a site gave none),
    to the receipts (``receipts``: ``received.jsonl``), and the rounds that
    produced a model are counted (``released_rounds``, for the site-level ε).
    ``round_offset`` is the number of rounds done before a resume: the sites and
    the history see the run's round, Flower's restarts at 1.
    """

    def __init__(self, strategy: Strategy, history: RunHistory, *, screen: ReplyScreen, min_available_nodes: int,
                 node_wait_timeout: float = 900.0, study: Study = DEFAULT_STUDY, receipts: Receipts | None = None,
                 secure: bool = False, round_offset: int = 0) -> None:
        super().__init__(strategy)
        self.history = history
        self.screen = screen
        self.min_available_nodes = min_available_nodes
        self.node_wait_timeout = node_wait_timeout
        self.study = study  # what the sites' evaluation counts are read against
        self.receipts = receipts
        self.secure = secure  # SecAgg+: the train replies are the secure aggregate (receipts come stage by stage)
        self.round_offset = round_offset
        self.released_rounds = 0
        self._current: ArrayRecord | None = None  # the global model the round's training messages carry
        self._sent: list[Message] = []  # the last messages configured (their ids name a reply's site)

    def run_round(self, server_round: int) -> int:
        """The run's round number of Flower's ``server_round``."""
        return server_round + self.round_offset

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        wait_for_nodes(grid, self.min_available_nodes, self.node_wait_timeout)
        self._current = arrays
        return self._sending(self.strategy.configure_train(server_round, arrays, config, grid), server_round, config)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        wait_for_nodes(grid, self.min_available_nodes, self.node_wait_timeout)
        return self._sending(self.strategy.configure_evaluate(server_round, arrays, config, grid), server_round,
                             config)

    def _sending(self, messages: Iterable[Message], server_round: int, config: ConfigRecord) -> list[Message]:
        self._sent = list(messages)
        config["server-round"] = self.run_round(server_round)  # the messages share ``config``: resumed or not
        return self._sent

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        screened = self.screen.screen(replies, self._current, self.run_round(server_round))
        self._record(server_round, screened, "train")
        arrays, metrics = self.strategy.aggregate_train(server_round, [s.message for s in screened])
        if arrays is not None:
            self.released_rounds += 1
        self.history.round(self.run_round(server_round)).train = dict(metrics) if metrics is not None else {}
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        pool = self._record(server_round, [Screened(m, m) for m in replies], "evaluate")
        rec = self.history.round(self.run_round(server_round))
        if pool:  # the consortium's figures from the summed noisy counts: post-processing of what was released
            rec.pooled = _pooled(pool, self.study)
        metrics = self.strategy.aggregate_evaluate(server_round, [_without_counts(m) for m in replies])
        rec.evaluate = dict(metrics) if metrics is not None else {}
        return metrics

    def _record(self, server_round: int, screened: list[Screened], phase: str) -> list[tuple[str | None, BinnedCounts]]:
        """Write each reply to the history and the receipts; return the evaluation counts to pool."""
        rec = self.history.round(self.run_round(server_round))
        nodes = reply_sites(self._sent, [s.message for s in screened])
        pool = []
        for item, node in zip(screened, nodes, strict=True):
            self._receipt(server_round, phase, item, node)
            counts = self._record_site(rec.site(node), item.message, phase, server_round, node)
            if counts is not None:
                pool.append(counts)
        self._record_silent(rec, nodes, phase, server_round)
        return pool

    def _receipt(self, server_round: int, phase: str, item: Screened, node: int) -> None:
        # Under SecAgg+ the train "replies" are the secure aggregate; their raw messages were logged
        # stage by stage by coordinator.secure.SecAggPlusGrid.
        if self.receipts is None or (self.secure and phase == "train"):
            return
        self.receipts.received(self.run_round(server_round), phase, item.original, node=node, verdict=item.verdict)

    def _record_site(self, site: SiteRound, msg: Message, phase: str, server_round: int,
                     node: int) -> tuple[str | None, BinnedCounts] | None:
        """One site's reply in the history; its evaluation counts, if it released any that fit the study."""
        _name_site(site, msg)
        if msg.has_error():
            site.no_result(phase, ERROR_NAMES.get(msg.error.code, "no-reply"), msg.error.reason)
            log.warning("round %d: site node %d sent no %s result: %s", server_round, node, phase, msg.error.reason)
            return None
        if phase == "train":
            site.status, site.reason = "trained", None
        metrics = next(iter(msg.content.metric_records.values()), None)
        if metrics is None:
            return None
        values = dict(metrics)
        getattr(site, phase).update({k: v for k, v in values.items() if k not in COUNT_KEYS})
        return self._site_counts(site, values) if phase == "evaluate" else None

    def _record_silent(self, rec: RoundRecord, nodes: list[int], phase: str, server_round: int) -> None:
        # Flower hands over only the replies that came; a site that stayed silent (e.g. killed mid-round
        # and back too late) must still show in the round, or the operator cannot tell who was missing.
        for nid in {m.metadata.dst_node_id for m in self._sent} - set(nodes):
            reason = f"no {phase} reply from site node {nid} before the round's timeout"
            rec.site(nid).no_result(phase, "no-reply", reason)
            log.warning("round %d: %s", server_round, reason)

    def _site_counts(self, site: SiteRound, values: dict[str, object]) -> tuple[str | None, BinnedCounts] | None:
        """Read a site's noisy counts against the study: its own per-class figures, and its share of the pool."""
        if not any(k in values for k in COUNT_KEYS):
            return None  # a site that released only scalars (an older site): it is in the mean, not in the pool
        try:
            counts = counts_from_reply(values, self.study)
        except ValueError as err:
            site.evaluate_error = f"its evaluation counts do not fit the study and were not pooled: {err}"
            log.warning("site %s: %s", site.name or "?", site.evaluate_error)
            return None
        site.metrics = metrics_from_counts(counts, self.study).to_json()
        return site.name, counts


def reply_sites(sent: list[Message], replies: list[Message]) -> list[int]:
    """The site each reply is about. The SuperLink answers for an unavailable node under its own id (1):
    such a reply names the message it answers, else it is one of the sites in ``sent`` that did not reply."""
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


def _pooled(pool: list[tuple[str | None, BinnedCounts]], study: Study) -> dict[str, object]:
    """The consortium's figures from the sum of the sites' counts, naming the sites pooled."""
    total: BinnedCounts = pool[0][1]
    for _, counts in pool[1:]:
        total = total + counts
    return {**metrics_from_counts(total, study).to_json(), "sites": [name or "?" for name, _ in pool]}


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


#: The Flower strategy each run-config ``strategy`` names.
STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg, "krum": Krum, "bulyan": Bulyan,
}


def flower_strategy(cfg: RunConfig, *, weighted_by_key: str, fraction_train: float) -> FedAvg:
    """The Flower strategy the run config names, with its own settings (no wrappers)."""
    extra: dict[str, Any] = {
        "fedprox": {"proximal_mu": cfg.proximal_mu},
        "fedadam": {"eta": cfg.server_lr, "eta_l": cfg.lr},
        "fedtrimmedavg": {"beta": cfg.trim_beta},
        "krum": {"num_malicious_nodes": cfg.num_malicious_sites},
        "bulyan": {"num_malicious_nodes": cfg.num_malicious_sites},
    }.get(cfg.strategy, {})
    return STRATEGIES[cfg.strategy](
        fraction_train=fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=cfg.min_evaluate_nodes,
        min_available_nodes=cfg.min_available_nodes,
        weighted_by_key=weighted_by_key,
        train_metrics_aggr_fn=weighted_mean_ignoring_nan,
        evaluate_metrics_aggr_fn=mean_by_examples,
        **extra,
    )


def build_strategy(cfg: RunConfig, history: RunHistory, study: Study | None = None, *,
                   receipts: Receipts | None = None, seen: dict[str, int] | None = None, round_offset: int = 0,
                   site_dp_plan: site_dp.SiteDPPlan | None = None) -> Recording:
    """The run's strategy: the Flower strategy ``cfg`` names inside the wrappers the run needs.

    ``history`` and ``receipts`` are written; ``study`` reads the evaluations; ``seen`` holds the
    update digests of the rounds before a resume (replays), ``round_offset`` their number;
    ``site_dp_plan`` (:func:`coordinator.site_dp.plan`) adds site-level DP.
    """
    # A site's own claim never sets its weight unless the run says so (docs/deployment.md, "A malicious site").
    uniform = cfg.site_weights == "uniform" or site_dp_plan is not None
    poisson = site_dp_plan if site_dp_plan is not None and site_dp_plan.sampling == "poisson" else None
    base = flower_strategy(cfg, weighted_by_key=UNIFORM_KEY if uniform else NUM_EXAMPLES,
                           fraction_train=1.0 if poisson else cfg.fraction_train)
    strategy = _wrapped(base, cfg, uniform=uniform, poisson=poisson, site_dp_plan=site_dp_plan, receipts=receipts,
                        round_offset=round_offset)
    return Recording(strategy, history, screen=ReplyScreen(base.arrayrecord_key, cfg.max_update_norm,
                                                           check_replay=not cfg.secagg, seen=dict(seen or {})),
                     min_available_nodes=cfg.min_available_nodes, node_wait_timeout=cfg.round_timeout,
                     study=study or DEFAULT_STUDY, receipts=receipts, secure=cfg.secagg, round_offset=round_offset)


def _wrapped(base: FedAvg, cfg: RunConfig, *, uniform: bool, poisson: site_dp.SiteDPPlan | None,
             site_dp_plan: site_dp.SiteDPPlan | None, receipts: Receipts | None, round_offset: int) -> Strategy:
    """``base`` inside the wrappers below :class:`Recording`, innermost first."""
    strategy: Strategy = UniformWeights(base) if uniform else base
    if poisson is not None:
        strategy = PoissonSampling(strategy, poisson.sample_rate, poisson.expected_sites)
    if receipts is not None:
        strategy = AggregationReceipts(strategy, receipts, secure=cfg.secagg, round_offset=round_offset)
    if site_dp_plan is not None:
        strategy = site_dp.wrap(strategy, cfg, site_dp_plan)
    return strategy
