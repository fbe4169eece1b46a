"""Copies of the installed medfed app, to build FABs a hostile coordinator might submit."""

from __future__ import annotations

import shutil
from pathlib import Path

from medfed.fab import installed_app_dir

#: The packages pyproject.toml's fab-include ships.
PACKAGES = ("medfed", "anonymization", "models", "site_client", "coordinator")


def copy_app(dst: Path) -> Path:
    """A copy of the installed app's FAB sources (what `flwr run` ships), to change and submit."""
    app = installed_app_dir()
    assert app is not None, "medfed is not installed from a source folder"
    dst.mkdir(parents=True)
    shutil.copy(app / "pyproject.toml", dst / "pyproject.toml")
    for pkg in PACKAGES:
        shutil.copytree(app / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def plant_marker(app: Path, marker: Path) -> None:
    """One line added to the ClientApp module: it writes ``marker`` as soon as anyone imports it."""
    module = app / "site_client" / "client_app.py"
    module.write_text(module.read_text() + f"\nopen({str(marker)!r}, 'w').write('imported')\n")
