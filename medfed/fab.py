"""The Flower app bundle (FAB) of this medfed release, and the SHA-256 that names a FAB.

The coordinator submits a FAB with every run; a site runs only a FAB whose hash its
privacy officer approved, by default exactly the FAB of the release installed at the
site. Flower's own builder (`flwr build`) is reproducible, and pyproject.toml's
``fab-include`` keeps the bundle to the product's packages, so the same release gives
the same bytes at the coordinator and at every site.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from pathlib import Path


class FabError(Exception):
    """A FAB or app folder cannot be read or built; the message says which and what to do."""


def installed_app_dir() -> Path | None:
    """The folder of the installed medfed app (holding pyproject.toml's [tool.flwr.app]), if there is one."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def fab_sha256(content: bytes) -> str:
    """A FAB's identity: the SHA-256 of its bytes, as Flower names it."""
    return hashlib.sha256(content).hexdigest()


def build_fab(app: Path) -> bytes:
    """The FAB Flower's `flwr run` / `flwr build` would make from the app folder ``app``."""
    from flwr.cli.build import build_fab_from_disk

    if not (app / "pyproject.toml").is_file():
        raise FabError(f"{app} holds no pyproject.toml: pass a Flower app folder or a .fab file")
    try:
        with warnings.catch_warnings():
            # Flower's builder uses pathspec's deprecated pattern name; not ours to fix, and not the user's news.
            warnings.filterwarnings("ignore", message="GitWildMatchPattern", category=DeprecationWarning)
            return build_fab_from_disk(app)
    except (ValueError, OSError) as err:
        raise FabError(f"cannot build a FAB from {app}: {err}") from None


def read_fab(path: Path) -> bytes:
    """A FAB's bytes from a .fab file, or built from an app folder."""
    if path.is_dir():
        return build_fab(path)
    try:
        content = path.read_bytes()
    except OSError as err:
        raise FabError(f"cannot read {path}: {err.strerror}; pass an app folder or a .fab file") from None
    if not content.startswith(b"PK"):
        raise FabError(f"{path} is not a FAB (a zip made by `flwr build`); pass an app folder or a .fab file")
    return content


@functools.lru_cache(maxsize=1)
def release_fab_sha256() -> str | None:
    """SHA-256 of the FAB of the installed release (cached: built once per process), or None without one."""
    app = installed_app_dir()
    return None if app is None else fab_sha256(build_fab(app))
