"""medfed: federated learning for a consortium of hospitals.

Importing any medfed package applies the process hardening of
:mod:`medfed.hardening` first (docs/design.md invariant 6: no traffic but to the coordinator).
"""

from medfed import hardening as _hardening

_hardening.apply()


def _version() -> str:
    """The version, stated once: ``[project] version`` in pyproject.toml (Flower's FAB needs it there).

    A source checkout or a FAB reads it from the pyproject.toml beside the packages; an
    installed medfed from its package metadata (which setuptools wrote from that file).
    """
    import tomllib
    from importlib import metadata
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text("utf-8")).get("project", {})
        if project.get("name") == "medfed":
            return str(project["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        pass
    try:
        return metadata.version("medfed")
    except metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = _version()
