"""Which app bundles (FABs) this site runs: the privacy officer's approval list.

The coordinator ships a FAB with every run and could ship anything. A site runs a
FAB only when its SHA-256 is approved here; by default that is exactly the FAB of the
medfed release installed at the site (:func:`medfed.fab.release_fab_sha256`). The
list lives in the site's kit folder (``approvals.json``), written only by
`medfed site approve`, never by anything that arrives over the network.
"""

from __future__ import annotations

import getpass
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from medfed.fab import FabError, fab_sha256, read_fab, release_fab_sha256
from medfed.files import write_file

APPROVALS_FILE = "approvals.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ApprovalError(Exception):
    """The approval list cannot be read or changed as asked; the message says what to do."""


@dataclass(frozen=True)
class Approval:
    """One approved FAB."""

    sha256: str
    source: str
    approved_at: str
    approved_by: str
    release: bool = False  # the installed release: approved by installing it, not listed in the file


def _path(kit: Path) -> Path:
    return kit / APPROVALS_FILE


def listed(kit: Path) -> list[Approval]:
    """The approvals `medfed site approve` wrote (not the installed release)."""
    path = _path(kit)
    if not path.exists():
        return []
    try:
        raw = json.loads(path.read_text())
        items = [Approval(**{k: str(v) for k, v in item.items()}) for item in raw["approved"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ApprovalError(f"{path} is unreadable ({err}); restore it from backup or re-approve the apps "
                            f"(`medfed site approve {kit} --app ...`). Until then this site runs no app.") from None
    bad = [a.sha256 for a in items if not _SHA256.match(a.sha256)]
    if bad:
        raise ApprovalError(f"{path} lists {bad[0]!r}, not a SHA-256; fix or remove that entry")
    return items


def approvals(kit: Path) -> list[Approval]:
    """Every FAB this site runs: the installed release first, then the listed ones."""
    out = []
    release = release_fab_sha256()
    if release is not None:
        out.append(Approval(release, "the medfed release installed at this site", "", "", release=True))
    return out + [a for a in listed(kit) if a.sha256 != release]


def approved_hashes(kit: Path) -> frozenset[str]:
    """The SHA-256 of every FAB this site runs."""
    return frozenset(a.sha256 for a in approvals(kit))


def approve(kit: Path, app: Path) -> Approval:
    """Approve the FAB of ``app`` (a .fab file or an app folder, built as `flwr run` builds it)."""
    if not kit.is_dir():
        raise ApprovalError(f"{kit} is not a folder: pass this site's kit folder")
    try:
        digest = fab_sha256(read_fab(app))
    except FabError as err:
        raise ApprovalError(str(err)) from None
    items = listed(kit)
    found = next((a for a in items if a.sha256 == digest), None)
    if found is not None:
        return found
    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = "unknown"
    entry = Approval(digest, str(app.resolve()), datetime.now(UTC).isoformat(timespec="seconds"), who)
    items.append(entry)
    body = {"approved": [{k: v for k, v in a.__dict__.items() if k != "release"} for a in items]}
    write_file(_path(kit), (json.dumps(body, indent=2) + "\n").encode(), mode=0o644)
    return entry
