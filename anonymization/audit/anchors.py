"""Anchors of a site's audit trail, kept off-site by the coordinator, and checking a trail against them.

A seal proves who signed a trail, not that it was never rewritten: anyone with
the site account holds the site's key, and can delete a record, re-chain and
re-seal. So with each train and evaluate reply a site also sends its trail's
*head*: the sequence number of its latest record and the SHA-256 of that
record's line (what the next record's ``prev`` holds). The coordinator writes
each anchor to the run's receipts (``anchors.jsonl``), where nobody at the site
can change it. A rewritten trail no longer holds the anchored records, and
``medfed audit verify DIR --anchors RECEIPTS`` names the first anchor that
does not match. Every check of an anchor covers the whole chain before it.

Light to import (standard library only): the site's egress guard, the
coordinator's receipts and the audit CLI all use it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Name of the reply's record that carries the anchor (a Flower ConfigRecord; MetricRecords hold only numbers).
ANCHOR_RECORD = "audit"
#: Exactly these keys, nothing else: the site's name, the head's sequence number and hash.
ANCHOR_KEYS = frozenset({"site", "seq", "head"})
#: The coordinator's receipts file of anchors, one line per site reply, in the run's out-dir.
ANCHORS_FILE = "anchors.jsonl"
#: A line hash: SHA-256, lowercase hex.
HEAD_RE = re.compile(r"[0-9a-f]{64}")
#: A site name as site.toml allows it (letters, digits, '.', '_', '-'), bounded so it carries nothing else.
SITE_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
#: Field of an ``egress`` record that keeps the anchor the reply carried.
EGRESS_ANCHOR_FIELD = "anchor"


class AnchorError(ValueError):
    """An anchor, or a receipts file of anchors, is malformed; the message says which and where."""


@dataclass(frozen=True)
class Anchor:
    """One anchor as the coordinator received it: which site, which reply, which record of its trail."""

    site: str
    seq: int
    head: str
    run: str = ""
    round: int = 0
    phase: str = ""
    source: str = ""  # receipts file and line, for messages

    def describe(self, with_site: bool = True) -> str:
        site = f"site {self.site}, " if with_site else ""
        run = f"run {self.run}, " if self.run else ""
        phase = f" {self.phase}" if self.phase else ""
        return f"{site}{run}round {self.round}{phase} reply (record #{self.seq})"


def anchor_fields(site: str, seq: int, head: str) -> dict[str, Any]:
    """What a reply's anchor record holds (the egress allow-list checks it with :func:`parse_anchor`)."""
    return {"site": site, "seq": seq, "head": head}


def parse_anchor(values: Mapping[str, Any]) -> tuple[str, int, str]:
    """(site, seq, head) of an anchor record, or :class:`AnchorError` saying what is wrong with it."""
    keys = set(values.keys())
    if keys != ANCHOR_KEYS:
        raise AnchorError(f"anchor keys {sorted(keys)} differ from the allowed {sorted(ANCHOR_KEYS)}")
    site, seq, head = values["site"], values["seq"], values["head"]
    if not isinstance(site, str) or not SITE_RE.fullmatch(site):
        raise AnchorError("anchor 'site' must be a site name (letters, digits, '.', '_', '-'; at most 128)")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise AnchorError("anchor 'seq' must be a record number (an integer from 1)")
    if not isinstance(head, str) or not HEAD_RE.fullmatch(head):
        raise AnchorError("anchor 'head' must be a SHA-256 line hash (64 lowercase hex digits)")
    return site, seq, head


def _receipt_files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(path.rglob(ANCHORS_FILE))
        if not found:
            raise AnchorError(f"{path} holds no {ANCHORS_FILE}; pass the run's receipts folder (the coordinator's "
                              f"out-dir, e.g. coordinator/runs/RUN) or its {ANCHORS_FILE}")
        return found
    if path.is_file():
        return [path]
    raise AnchorError(f"{path} does not exist; pass the run's receipts folder or its {ANCHORS_FILE}")


def load_anchors(paths: Iterable[Path]) -> list[Anchor]:
    """Every anchor in the given receipts files, or folders searched for ``anchors.jsonl``."""
    out: list[Anchor] = []
    for given in paths:
        for path in _receipt_files(Path(given)):
            try:
                text = path.read_text("utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise AnchorError(f"cannot read {path}: {err}") from None
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                where = f"{path} line {number}"
                try:
                    value = json.loads(line)
                    if not isinstance(value, dict):
                        raise AnchorError("not a JSON object")
                    site, seq, head = parse_anchor({k: value.get(k) for k in ANCHOR_KEYS})
                    rnd = value.get("round", 0)
                    if isinstance(rnd, bool) or not isinstance(rnd, int):
                        raise AnchorError("'round' must be an integer")
                except (ValueError, AnchorError) as err:
                    raise AnchorError(f"{where} is not an anchor receipt ({err}); is this the coordinator's "
                                      f"{ANCHORS_FILE}?") from None
                out.append(Anchor(site=site, seq=seq, head=head, run=str(value.get("run", "")), round=rnd,
                                  phase=str(value.get("phase", "")), source=where))
    return out


def anchored_site(record: Mapping[str, Any]) -> str | None:
    """The site name an ``egress`` record says its reply anchored the trail as, if any."""
    anchor = record.get(EGRESS_ANCHOR_FIELD)
    if record.get("kind") == "egress" and isinstance(anchor, dict) and isinstance(anchor.get("site"), str):
        return str(anchor["site"])
    return None


def first_mismatch(anchors: Iterable[Anchor], hashes: Mapping[int, str], last_seq: int) -> str | None:
    """Why the first anchor (by record number) that the trail does not hold fails, or None if all hold.

    ``hashes`` maps record numbers to their line hashes (at least those anchored); ``last_seq`` is the
    trail's last record.
    """
    for anchor in sorted(anchors, key=lambda a: (a.seq, a.source)):
        got = hashes.get(anchor.seq)
        if got == anchor.head:
            continue
        where = f" ({anchor.source})" if anchor.source else ""
        if got is None:
            found = (f"the trail has no record #{anchor.seq}: it ends at #{last_seq}, so records were cut off "
                     "its end (or it was cut back and re-sealed)")
        else:
            found = (f"record #{anchor.seq} of the trail hashes to {got[:16]}, not {anchor.head[:16]}: the trail "
                     f"was rewritten after that reply left the site (records deleted, altered or inserted up to "
                     f"#{anchor.seq}, then re-chained and re-sealed)")
        return f"anchor of the {anchor.describe()}{where} does not match: {found}"
    return None
