"""Fixtures shared by the test packages."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def task_identity() -> Iterator[None]:
    """The run and task ids Flower sets for a running task, so a Message can be built outside Flower's runtime."""
    from flwr.supercore.task_identity import TaskIdentity

    names = ("_run_id", "_task_id", "_node_id")
    old = {n: getattr(TaskIdentity, n) for n in names}
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
    yield
    for n, v in old.items():
        setattr(TaskIdentity, n, v)
