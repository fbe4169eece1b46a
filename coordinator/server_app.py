"""The Flower ServerApp the coordinator runs: thin wiring around :mod:`coordinator.federation`."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coordinator.federation import run_federation
from medfed.settings import RunConfig


def build_app(base: RunConfig | None = None) -> ServerApp:
    """The ServerApp; ``base`` supplies run settings where Flower passes none (in-process simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _progress_to_stderr()
        cfg = RunConfig.from_flower(context.run_config, base)
        run_federation(grid, cfg, resume=cfg.resume)

    return app


def _progress_to_stderr() -> None:
    """Round-by-round progress lines reach `flwr run --stream` (the ServerApp process has no logging set up)."""
    logger = logging.getLogger("coordinator")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s medfed: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


#: What `flwr run` / the SuperLink loads (pyproject: serverapp = "coordinator.server_app:app").
app = build_app()
