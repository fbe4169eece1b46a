"""A release the coordinator sends in a run's last message, kept at the site only if the consortium signed it.

The operator still distributes releases as files; this spares the sites the copy. The site checks the
release exactly as every command that loads one (models.release.verify_release), with the release key
from its own kit (``release-key`` in site.toml), never with anything the coordinator sends, and records
what it kept or refused in its audit trail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from medfed.protocol import RELEASE_RECORD
from medfed.settings import SiteConfig
from models.release import Release, ReleaseError, keep_release, public_key_of
from site_client.trail import audit_for

#: Where a site keeps the releases it verified (in its state folder), one folder each.
RELEASES_DIR = "releases"


class ReleaseNotKept(Exception):
    """The release sent was not kept; ``declined`` when the site takes none this way (no release key)."""

    def __init__(self, reason: str, *, declined: bool = False) -> None:
        super().__init__(reason)
        self.declined = declined


def keep_sent_release(site: SiteConfig, content: RecordDict, run: str) -> Path:
    """Verify the release in ``content`` with the site's own release key and keep it; its folder.

    Raises :class:`ReleaseNotKept` with the reason, which the audit trail also records.
    """
    audit = audit_for(site)
    try:
        release = _verified(site, content)
        audit.append("release_kept", run_id=run, name=str(release.card.get("name", "")), path=str(release.path),
                     weights_sha256=release.weights_sha256, key_id=release.key_id)
        return release.path
    except ReleaseNotKept as err:
        audit.append("release_declined" if err.declined else "release_refused", run_id=run, reason=str(err))
        raise
    finally:
        audit.close()


def _verified(site: SiteConfig, content: RecordDict) -> Release:
    if site.release_key is None:
        raise ReleaseNotKept(f"site {site.name} keeps no release sent by the coordinator: release-key is not set "
                             "in its site.toml (the kit's release-signing.pub)", declined=True)
    record = content.get(RELEASE_RECORD, None)
    try:
        if not isinstance(record, ConfigRecord):
            raise ReleaseError(f"the message holds no '{RELEASE_RECORD}' record of files")
        files: dict[str, Any] = dict(record.items())
        return keep_release(files, public_key_of(site.release_key), site.state_dir / RELEASES_DIR)
    except ReleaseError as err:
        raise ReleaseNotKept(f"site {site.name} refused the release sent: {err}") from None
