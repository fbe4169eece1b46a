"""Flower's `flower-supernode`, pulling for the coordinator's messages every half second.

Flower's SuperNode sleeps a fixed 3 s after every pull that finds no message
(``flwr.supernode.start_client_internal``), so each round of a deployment waits
up to 3 s per message before a site even sees it, however fast the site trains.
Flower offers no setting for it; this entry point runs Flower's own SuperNode
with that module's sleeps capped at :data:`POLL_SECONDS` (two small HTTPS
requests a second per site) and changes nothing else. If Flower stops using
``time.sleep`` there, the SuperNode simply keeps its own interval.
"""

from __future__ import annotations

import sys
import time as _time
from typing import Any

#: Longest wait between two pulls of the SuperNode (and between checks for the site's reply).
POLL_SECONDS = 0.5


class _CappedClock:
    """The ``time`` module, except that ``sleep`` waits at most :data:`POLL_SECONDS`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        _time.sleep(min(seconds, POLL_SECONDS))


def main() -> int:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    if getattr(start_client_internal, "time", None) is _time:
        start_client_internal.time = _CappedClock()  # type: ignore[assignment]
    sys.argv[0] = "flower-supernode"
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
