"""One logging set-up for every medfed command: rich to the terminal, stdlib underneath."""

from __future__ import annotations

import logging
import os

from rich.logging import RichHandler


def setup(verbose: bool = False) -> None:
    """Route stdlib logging through rich; quiet Flower and Ray unless verbose."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(rich_tracebacks=False, show_path=False)],
        force=True,
    )
    # Flower logs through its own console handler; keep it from printing twice
    # through ours, and keep its per-round dumps out of an operator's terminal.
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    for handler in flwr_logger.handlers:
        handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
    os.environ["FLWR_LOG_LEVEL"] = "DEBUG" if verbose else "WARNING"  # Ray workers set theirs from this
    if not verbose:
        for noisy in ("ray", "filelock", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
