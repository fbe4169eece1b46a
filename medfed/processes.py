"""Stopping the child processes medfed starts (SuperLink, nginx, SuperNode, the site's executor)."""

from __future__ import annotations

import subprocess


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
