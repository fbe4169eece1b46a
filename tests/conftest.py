"""Fixtures shared by the test packages."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.dicom_peers import Orthanc, Pki, make_pki, start_orthanc, stop


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


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Callable[[dict[str, list]], Orthanc]]:
    """Start Debian's Orthanc on loopback with its own storage in tmp_path; modalities given by the test."""
    procs: list[subprocess.Popen[bytes]] = []
    yield lambda modalities: start_orthanc(tmp_path / "orthanc", modalities, procs)
    stop(procs)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """The hospital's CA (server + client certificates) and a rogue CA's client certificate."""
    return make_pki(tmp_path / "pki")
