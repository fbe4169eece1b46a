"""What every `medfed` command prints through: one console for results, one way to fail.

One place so every command's errors read the same ("error: ..." on stderr, exit code 2 for a wrong argument
unless the command says otherwise) and no command prints a traceback for a mistake a user can make.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

#: Results, tables and notes (stdout).
console = Console()
#: Errors (stderr), never wrapped, so a long path in a message can be copied whole.
_errors = Console(stderr=True, soft_wrap=True, highlight=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """Say what was wrong (and what to do) on stderr and exit with ``code``: no traceback.

    The message is printed as plain text (no rich markup), so a path or option holding brackets prints as written.
    """
    _errors.print(Text.assemble(("error:", "bold red"), " ", message))
    raise typer.Exit(code)


def figure(value: object) -> str:
    """A metric as tables print it: three decimals, or n/a when it is missing or undefined (NaN)."""
    return "n/a" if not isinstance(value, int | float) or value != value else f"{value:.3f}"


def round_table(rounds: Sequence[Mapping[str, Any]], title: str) -> Table:
    """The global model per round from metrics.json: one table for the demo, a simulation and a deployed run."""
    table = Table(title=title)
    for col in ("round", "AUC (macro)", "accuracy", "sites trained", "seconds"):
        table.add_column(col, justify="right")
    for r in rounds:
        trained = sum(1 for v in r["sites"].values() if v["status"] == "trained")
        seconds = r.get("seconds")
        table.add_row(str(r["round"]), figure(r.get("auc")), figure((r.get("evaluate") or {}).get("accuracy")),
                      f"{trained}/{len(r['sites'])}", figure(seconds) if seconds is None else f"{seconds:.1f}")
    return table

