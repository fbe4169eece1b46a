"""Opening the site's audit trail, without importing torch.

Kept apart from :mod:`site_client.task` so that the ClientApp's egress guard can
record the SecAgg+ key-exchange stages (which never train) without loading
torch, Opacus and MONAI in every short-lived ClientApp process.
"""

from __future__ import annotations

from anonymization.audit import AuditTrail, open_trail
from anonymization.audit.keys import SIGNING_KEY_NAME
from medfed.settings import SiteConfig


def audit_for(site: SiteConfig) -> AuditTrail:
    """The site's audit trail, sealed with the same key de-identification uses for it.

    Key: ``audit-key`` from site.toml, else the key the trail records, else STATE/audit-signing.key.
    """
    return open_trail(site.audit_path, audit_key=site.audit_key, default_key=site.state_dir / SIGNING_KEY_NAME)
