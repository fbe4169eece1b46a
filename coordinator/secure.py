"""Secure aggregation (Flower's SecAgg+) under our Message-API strategies.

Flower 1.41 ships SecAgg+ as a workflow (`flwr.server.workflow.SecAggPlusWorkflow`)
written against the legacy Strategy API; the Message-API strategies
(`flwr.serverapp.strategy`) have no secure-aggregation option. Rather than
re-implementing the protocol, :class:`SecAggPlusGrid` wraps the run's Grid:
the strategy builds its training messages as usual, and when it sends them
the grid runs Flower's own SecAgg+ workflow (setup, share keys, collect
masked vectors, unmask) with those sites and that model. What comes back to
the strategy is one reply per site that carries the *securely aggregated*
(example-weighted mean) model and the site's own scalar metrics — never a
site's individual update. FedAvg/FedProx of identical arrays is that mean;
FedAdam applies its server step to it; Flower's client-side-clipping DP
wrapper adds its noise to it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from medfed.protocol import ARRAY_NAMES_KEY, SITE_FAILED

log = logging.getLogger(__name__)


@dataclass
class _Proxy:
    """What the SecAgg+ workflow needs of a legacy ClientProxy: the node id."""

    node_id: int
    cid: str = ""


@dataclass
class _Shim:
    """A legacy Strategy stand-in: selects the sites the Message-API strategy chose, keeps the result."""

    node_ids: list[int]
    fitins: FitIns
    results: list[tuple[Any, Any]] = field(default_factory=list)
    failures: list[Any] = field(default_factory=list)

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[_Proxy, FitIns]]:
        return [(_Proxy(nid, str(nid)), self.fitins) for nid in self.node_ids]

    def aggregate_fit(self, server_round: int, results: list[tuple[Any, Any]], failures: list[Any]) -> tuple[Any, dict]:
        self.results, self.failures = list(results), list(failures)
        return (results[0][1].parameters if results else None), {}


class _ListeningGrid:
    """The real grid, with every reply of every SecAgg+ stage shown to ``listener`` first."""

    def __init__(self, grid: Any, listener: Callable[[str, Message, int], None]) -> None:
        self._grid = grid
        self._listener = listener

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        msgs = list(messages)
        stage = ""
        if msgs and RECORD_KEY_CONFIGS in msgs[0].content.config_records:
            stage = str(msgs[0].content.config_records[RECORD_KEY_CONFIGS].get("stage", ""))
        replies = list(self._grid.send_and_receive(msgs, timeout=timeout))
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs if m.metadata.message_id}
        for r in replies:
            # the SuperLink answers for an unavailable node under its own id; name the node it was sent to
            self._listener(stage, r, sent.get(r.metadata.reply_to_message_id, r.metadata.src_node_id))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class SecAggPlusGrid:
    """A Grid whose training round runs Flower's SecAgg+ protocol; everything else passes through.

    ``on_reply(server_round, stage, message, node)`` sees every raw reply a site sent
    during the protocol (public keys, encrypted shares, masked vectors), so the
    coordinator can record what it received.
    """

    def __init__(self, grid: Any, *, num_shares: float, threshold: float, clipping_range: float,
                 max_weight: float, timeout: float | None,
                 on_reply: Callable[[int, str, Message, int], None] | None = None) -> None:
        self._grid = grid
        self.num_shares = int(num_shares) if num_shares > 1 else float(num_shares)
        self.threshold = int(threshold) if threshold > 1 else float(threshold)
        self.clipping_range = clipping_range
        self.max_weight = max_weight
        self.timeout = timeout
        self.on_reply = on_reply

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        msgs = list(messages)
        if msgs and all(m.metadata.message_type == MessageType.TRAIN for m in msgs):
            return self.secure_train(msgs, timeout if timeout is not None else self.timeout)
        return list(self._grid.send_and_receive(msgs, timeout=timeout))

    def secure_train(self, msgs: list[Message], timeout: float | None) -> list[Message]:
        """One SecAgg+ training round for the sites ``msgs`` address; one reply per site."""
        first = msgs[0].content
        arrays = next(iter(first.array_records.values()))
        config = next(iter(first.config_records.values()))
        server_round = int(config.get("server-round", 0))
        names = list(arrays.keys())
        shapes = {k: tuple(a.shape) for k, a in arrays.items()}
        dtypes = {k: a.numpy().dtype for k, a in arrays.items()}
        fit_config = dict(config)
        fit_config[ARRAY_NAMES_KEY] = names
        fitins = FitIns(compat.arrayrecord_to_parameters(arrays, keep_input=True), fit_config)  # type: ignore[arg-type]
        node_ids = [m.metadata.dst_node_id for m in msgs]
        shim = _Shim(node_ids, fitins)

        errors: dict[int, Error] = {}

        def listen(stage: str, reply: Message, nid: int) -> None:
            if reply.has_error() and nid not in errors:
                errors[nid] = reply.error
            if self.on_reply is not None:
                self.on_reply(server_round, stage, reply, nid)

        base = Context(run_id=msgs[0].metadata.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
        ctx = LegacyContext(base, strategy=shim)  # type: ignore[arg-type]
        ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
        ctx.state.array_records[MAIN_PARAMS_RECORD] = arrays
        workflow = SecAggPlusWorkflow(self.num_shares, self.threshold, max_weight=self.max_weight,
                                      clipping_range=self.clipping_range, timeout=timeout)
        log.info("round %d: secure aggregation (SecAgg+) with %d sites", server_round, len(node_ids))
        workflow(_ListeningGrid(self._grid, listen), ctx)  # type: ignore[arg-type]

        by_node = {proxy.node_id: fitres for proxy, fitres in shim.results}
        aggregate: ArrayRecord | None = None
        if shim.results:
            nds = parameters_to_ndarrays(shim.results[0][1].parameters)
            aggregate = ArrayRecord({
                k: Array(np.asarray(v, dtype=dtypes[k]).reshape(shapes[k])) for k, v in zip(names, nds, strict=True)
            })
        replies: list[Message] = []
        for m in msgs:
            nid = m.metadata.dst_node_id
            fitres = by_node.get(nid)
            if fitres is not None and aggregate is not None:
                metrics = MetricRecord({k: v for k, v in fitres.metrics.items()
                                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
                replies.append(Message(content=RecordDict({"arrays": aggregate, "metrics": metrics}), reply_to=m))
            else:
                err = errors.get(nid) or Error(
                    code=SITE_FAILED,
                    reason=f"site node {nid} did not complete secure aggregation (dropped out or too few sites)")
                replies.append(Message(error=err, reply_to=m))
        if not shim.results:
            log.warning("round %d: secure aggregation did not complete; no update this round", server_round)
        return replies
