"""The one `medfed` command. Each subcommand imports only what it needs.

`medfed deid ...` in particular never imports torch or Flower, so it runs on
the PACS-side machine that has neither. Each module of this package holds one
group of commands; this one assembles them into ``app`` (the console script).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from medfed import logs


def _keep_argument_help() -> None:
    """Typer 0.20 sets an argument's help before calling click's Parameter.__init__, which (click 8.3+) resets it
    to None: every positional argument would show no help. Set it again after."""
    from typer.core import TyperArgument

    init = TyperArgument.__init__
    if getattr(init, "keeps_help", False):
        return

    @functools.wraps(init)
    def __init__(self: TyperArgument, *args: object, help: str | None = None, **kwargs: object) -> None:  # noqa: A002
        init(self, *args, help=help, **kwargs)  # type: ignore[arg-type]
        self.help = help

    __init__.keeps_help = True  # type: ignore[attr-defined]
    TyperArgument.__init__ = __init__  # type: ignore[method-assign]


_keep_argument_help()

# Every command module is light at import: torch, Flower, Opacus and MONAI are imported inside the commands.
from medfed.cli.audit import audit_app  # noqa: E402
from medfed.cli.data import register_data_commands  # noqa: E402
from medfed.cli.deid import deid_app  # noqa: E402
from medfed.cli.demo import register_demo_commands  # noqa: E402
from medfed.cli.deploy import register_deploy_commands  # noqa: E402
from medfed.cli.model import model_app, send_results  # noqa: E402
from medfed.cli.model import predict as predict_command  # noqa: E402
from medfed.cli.privacy import privacy_app  # noqa: E402
from medfed.cli.study import register_study_commands  # noqa: E402

app = typer.Typer(
    name="medfed",
    help="Federated learning for a consortium of hospitals: de-identify DICOM at each site, "
    "train with differential privacy, aggregate with Flower.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# The order here is the order `medfed --help` lists them in.
app.add_typer(deid_app, name="deid")
app.add_typer(audit_app, name="audit")
app.add_typer(privacy_app, name="privacy")
register_deploy_commands(app)
register_study_commands(app)
app.add_typer(model_app, name="model")
app.command("predict")(predict_command)
app.command("send")(send_results)
register_data_commands(app)
register_demo_commands(app)


def _version(value: bool) -> None:
    if value:
        from medfed import __version__

        typer.echo(f"medfed {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print medfed's version and exit.")] = False,
) -> None:
    logs.setup(verbose)


def _absolute(value: object) -> object:
    if isinstance(value, Path):
        return Path(os.path.abspath(value.expanduser()))
    if isinstance(value, list | tuple) and value and all(isinstance(v, Path) for v in value):
        return [Path(os.path.abspath(v.expanduser())) for v in value]
    return value


def paths_from_cwd(func: Callable[..., object]) -> Callable[..., object]:
    """Every path a user types means what it means where they typed it: made absolute before the command runs.

    So no command depends on the current folder later (a child process with another cwd, a path handed to
    Flower or nginx, a file name printed back).
    """

    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> object:
        return func(*(_absolute(a) for a in args), **{k: _absolute(v) for k, v in kwargs.items()})

    wrapper.paths_from_cwd = True  # type: ignore[attr-defined]
    return wrapper


def every_command(typer_app: typer.Typer) -> list[typer.models.CommandInfo]:
    found = list(typer_app.registered_commands)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            found.extend(every_command(group.typer_instance))
    return found


for _command in every_command(app):
    if _command.callback is not None and not getattr(_command.callback, "paths_from_cwd", False):
        _command.callback = paths_from_cwd(_command.callback)

__all__ = ["app", "paths_from_cwd"]
