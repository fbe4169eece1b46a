"""Flower processes left behind in a folder are found by folder and name, and stopped even when they hang."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from medfed.processes import stop_processes_in

SLEEPER = "import signal, sys, time; {ignore}print('up', flush=True); time.sleep(120)"


def _start(cwd: Path, name: str, *, ignore_term: bool = False) -> subprocess.Popen[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    code = SLEEPER.format(ignore="signal.signal(signal.SIGTERM, signal.SIG_IGN); " if ignore_term else "")
    proc = subprocess.Popen([sys.executable, "-c", code, name], cwd=cwd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "up\n"  # its SIGTERM handling is in place
    return proc


def test_left_flower_processes_are_stopped_and_nothing_else(tmp_path: Path) -> None:
    state, other = tmp_path / "state", tmp_path / "other"
    polite = _start(state, "flwr-serverapp")
    hung = _start(state, "flower-superexec", ignore_term=True)  # as a ServerApp stuck retrying its SuperLink
    elsewhere = _start(other, "flwr-serverapp")  # another consortium's
    unrelated = _start(state, "nginx")  # not Flower's
    try:
        stopped = stop_processes_in(state, ("flower-superexec", "flwr-serverapp"), grace=1.0)
        assert sorted(stopped) == sorted([polite.pid, hung.pid])
        assert polite.wait(timeout=5) == -15 and hung.wait(timeout=5) == -9  # SIGTERM; SIGKILL after the grace
        assert elsewhere.poll() is None and unrelated.poll() is None
        assert stop_processes_in(state, ("flwr-serverapp",), grace=1.0) == []
    finally:
        for proc in (polite, hung, elsewhere, unrelated):
            proc.kill()
            proc.wait(timeout=10)
