"""The run's Grid, asking the SuperLink for replies every fraction of a second.

Flower's HTTP grid sleeps 3 s between pulls in ``send_and_receive``, which adds up
to 3 s to every round and every SecAgg+ stage however fast the sites answer. A
pull is one small request to the SuperLink on the coordinator's own host, so this
wrapper polls every :data:`POLL_SECONDS` with Flower's own ``push_messages`` /
``pull_messages``; everything else is the wrapped grid's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message

#: Seconds between pulls for replies (loopback to the SuperLink).
POLL_SECONDS = 0.2


class PromptGrid:
    """A Grid whose ``send_and_receive`` collects replies as soon as they arrive."""

    def __init__(self, grid: Any, poll: float = POLL_SECONDS) -> None:
        self._grid = grid
        self._poll = poll

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self._poll)
        return replies
