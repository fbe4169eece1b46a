"""Anchoring the site's audit trail off-site: each train and evaluate reply carries the trail's head.

The coordinator keeps the anchors in the run's receipts, out of reach of anyone
at the site, so a trail rewritten and re-sealed with the site's own key fails
``medfed audit verify --anchors`` (see :mod:`anonymization.audit.anchors`).
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Message

from anonymization.audit import AuditTrail
from anonymization.audit.anchors import ANCHOR_RECORD, anchor_fields
from medfed.settings import SiteConfig


def anchor_reply(reply: Message, site: SiteConfig, audit: AuditTrail) -> dict[str, Any]:
    """Put the trail's head (its latest record before this reply's egress record) into ``reply``.

    Replaces any anchor record a handler put there, so only the guard's own leaves. SecAgg+ replies
    carry none: their records are fixed by the protocol.
    """
    seq, head = audit.head()
    fields = anchor_fields(site.name, seq, head)
    reply.content[ANCHOR_RECORD] = ConfigRecord(fields)
    return fields
