"""`python -m medfed.cli ...` runs the `medfed` command (tests and benches start it this way)."""

from medfed.cli import app

app()
