"""One logging set-up for every medfed command: rich to the terminal, stdlib underneath."""

from __future__ import annotations

import logging

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
    if not verbose:
        for noisy in ("flwr", "ray", "filelock", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
