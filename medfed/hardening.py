"""Process hardening shared by every medfed process.

Flower phones home (telemetry, update check) and installs app dependencies at
run time unless told not to; a hospital node must do none of that (docs/design.md
invariant 6), so these variables are forced in every process we start and are
inherited by every child process (Ray workers, SuperNodes, SuperLinks).
"""

from __future__ import annotations

import os

FLOWER_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # Ray must not report usage statistics either.
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_USAGE_STATS": "1",
}


def apply() -> None:
    """Force the no-egress settings into this process's environment."""
    os.environ.update(FLOWER_ENV)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a subprocess: ours, hardened, plus ``extra``."""
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    if extra:
        env.update(extra)
    return env
