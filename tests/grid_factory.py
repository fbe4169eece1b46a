"""Just enough of a Flower Grid for a strategy's configure steps, outside Flower's runtime."""

from __future__ import annotations


class Sites:
    """A Grid on which the sites ``nodes`` are connected (messages need ``task_identity``: tests/conftest.py)."""

    def __init__(self, *nodes: int) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)
