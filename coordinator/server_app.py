"""The Flower ServerApp the coordinator runs: thin wiring around :mod:`coordinator.federation`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coordinator.federation import run_federation
from medfed.settings import RunConfig


def build_app(base: RunConfig | None = None) -> ServerApp:
    """The ServerApp; ``base`` supplies run settings where Flower passes none (in-process simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_flower(context.run_config, base)
        run_federation(grid, cfg)

    return app


#: What `flwr run` / the SuperLink loads (pyproject: serverapp = "coordinator.server_app:app").
app = build_app()
