"""Stopping the child processes medfed starts (SuperLink, nginx, SuperNode, the site's executor)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def stop_child(child: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    """Terminate ``child`` if it still runs, wait at most ``timeout`` seconds, then kill it."""
    if child is None or child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(timeout=timeout)


def processes_in(folder: Path, names: tuple[str, ...]) -> list[int]:
    """Pids of this user's processes working in ``folder`` whose command line names one of ``names``."""
    folder, proc = folder.resolve(), Path("/proc")
    found: list[int] = []
    if not proc.is_dir():  # not Linux: nothing to find this way
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) != folder:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, or another user's
            continue
        if any(name in cmdline for name in names):
            found.append(int(entry.name))
    return found


def stop_processes_in(folder: Path, names: tuple[str, ...], grace: float = 5.0) -> list[int]:
    """SIGTERM what :func:`processes_in` finds, then SIGKILL what is still there after ``grace`` seconds.

    Found again before the SIGKILL (folder and command line), so a pid reused meanwhile is never hit.
    """
    pids = processes_in(folder, names)
    left = _signal_and_wait([pid for pid in pids if _alive(pid)], signal.SIGTERM, grace)
    _signal_and_wait([pid for pid in processes_in(folder, names) if pid in left], signal.SIGKILL, grace)
    return pids


def _signal_and_wait(pids: list[int], sig: signal.Signals, grace: float) -> list[int]:
    """Send ``sig`` to ``pids``; the ones still alive after at most ``grace`` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    return [pid for pid in pids if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
