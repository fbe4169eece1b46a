"""Which site this node is: its data folder, privacy cap and state folder.

In a deployment the SuperNode's ``node_config`` says so (``site-config`` = a
`site.toml`, or the keys themselves); in the simulation the partition id picks
one of the hospitals `medfed demo` prepared under ``demo-dir``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medfed.settings import ConfigError, RunConfig, SiteConfig

SITE_KEYS = ("name", "data-dir", "state-dir", "audit-dir", "release-key", "epsilon-cap", "epsilon-cap-per-run",
             "delta", "evaluation-noise", "size-bucket", "max-model-abs")


def demo_site_dirs(demo_dir: Path) -> list[Path]:
    """The demo's site folders, in partition order (sorted by name)."""
    sites = demo_dir / "sites"
    if not sites.is_dir():
        raise ConfigError(f"{sites} does not exist; run `medfed demo` (or set demo-dir) first")
    return sorted(p for p in sites.iterdir() if (p / "site.toml").is_file())


def resolve_site(node_config: Mapping[str, Any], run_config: RunConfig) -> SiteConfig:
    """Work out this node's :class:`SiteConfig` from Flower's node and run config."""
    if "site-config" in node_config:
        return SiteConfig.from_toml(Path(str(node_config["site-config"])))
    if "data-dir" in node_config:
        values = {k: node_config[k] for k in SITE_KEYS if k in node_config}
        return SiteConfig.from_mapping(values, "the SuperNode's --node-config")
    if "partition-id" in node_config and run_config.demo_dir:
        dirs = demo_site_dirs(Path(run_config.demo_dir))
        pid = int(node_config["partition-id"])
        if pid >= len(dirs):
            raise ConfigError(
                f"simulation node {pid} has no site: {run_config.demo_dir} holds {len(dirs)} sites; "
                "use as many SuperNodes as sites"
            )
        return SiteConfig.from_toml(dirs[pid] / "site.toml")
    raise ConfigError(
        "this node does not know which site it is: start the SuperNode with "
        "--node-config \"site-config='/path/site.toml'\" (or data-dir/state-dir/epsilon-cap), "
        "or, in a simulation, set demo-dir in the run config"
    )
