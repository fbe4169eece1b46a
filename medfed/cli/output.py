"""What every `medfed` command prints through: one console for results, one way to fail.

One place so every command's errors read the same ("error: ..." on stderr, exit code 2 for a wrong argument
unless the command says otherwise) and no command prints a traceback for a mistake a user can make.
"""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
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
