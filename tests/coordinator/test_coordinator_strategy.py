"""The coordinator's strategy records what each site did in a round, whatever code its reply carries."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from coordinator.history import RunHistory
from coordinator.strategy import build_strategy
from medfed.protocol import EGRESS_BLOCKED, ERROR_NAMES, SITE_DECLINED, SITE_FAILED, SITE_REFUSED
from medfed.settings import RunConfig

NODES = [11, 22, 33]


class _Grid:
    """What configure_train asks of Flower's Grid: the connected nodes."""

    def get_node_ids(self) -> list[int]:
        return list(NODES)


def _round(code: int, strategy_name: str = "fedavg") -> tuple[RunHistory, ArrayRecord | None]:
    """One round: node 11 trains, node 22 answers with ``code``, node 33 trains; return the history."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    history = RunHistory()
    cfg = RunConfig().with_overrides(strategy=strategy_name, min_train_nodes=3, min_available_nodes=3)
    strategy = build_strategy(cfg, history)
    current = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    sent = list(strategy.configure_train(1, current, ConfigRecord({"lr": 0.1}), _Grid()))
    assert sorted(m.metadata.dst_node_id for m in sent) == NODES
    replies = []
    for msg in sent:
        node = msg.metadata.dst_node_id
        if node == 22:
            reply = Message(Error(code, f"site 22 says {ERROR_NAMES[code]}"), reply_to=msg)
        else:
            update = ArrayRecord({"w": Array(np.full(4, 0.1, np.float32))})
            reply = Message(RecordDict({"arrays": update, "metrics": MetricRecord({"num-examples": 10})}),
                            reply_to=msg)
        replies.append(reply)
    arrays, _ = strategy.aggregate_train(1, replies)
    return history, arrays


@pytest.mark.parametrize("code", [SITE_DECLINED, SITE_FAILED, SITE_REFUSED, EGRESS_BLOCKED])
def test_a_site_that_sent_no_update_is_never_recorded_as_trained(code: int) -> None:
    history, arrays = _round(code)
    sites = history.round(1).sites
    assert sites["22"].status == ERROR_NAMES[code] != "trained"
    assert sites["22"].reason == f"site 22 says {ERROR_NAMES[code]}"
    assert sites["22"].train == {}
    assert sites["11"].status == sites["33"].status == "trained"
    assert arrays is not None  # the two updates that came were aggregated: the run goes on
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(4, 0.1, np.float32))


def test_a_decline_is_recorded_by_a_robust_strategy_too() -> None:
    history, _ = _round(SITE_DECLINED, "fedmedian")
    assert history.round(1).sites["22"].status == "declined"
