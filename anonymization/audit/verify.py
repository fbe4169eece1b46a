"""Check an audit trail from its files alone: the hash chain, the segments, every seal.

Needs no site secret: seals are checked with the public keys the trail records,
and with ``public_key`` (exported by ``medfed audit export-key``) the verifier
also insists that the trail is signed by that key or by keys it endorsed, so a
trail rewritten and re-signed by someone else fails. The first problem found is
named with the record and the file line where the trail breaks.

A finished run ends with an end-of-run seal, so a trail cut back to one of its
periodic seals is reported as incomplete. What it cannot see on its own: a trail
cut back to an earlier run's end, with whole runs removed, still verifies.
Compare the summary's last seal (number, time, head hash) with what an earlier
verification printed to catch that, or check the trail against the anchors the
coordinator kept (``anchors``, see :mod:`anonymization.audit.anchors`): they
also catch a trail rewritten and re-sealed with the site's own key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anonymization.audit.anchors import Anchor, anchored_site, first_mismatch
from anonymization.audit.keys import key_id, verify_signature
from anonymization.audit.records import (
    AUDIT_FILE,
    GENESIS,
    KIND_KEY_CREATED,
    KIND_KEY_ROTATED,
    KIND_SEAL,
    KIND_SEGMENT,
    KIND_TORN,
    SEAL_DOMAIN,
    SEAL_PERIODIC,
    SEAL_ROLLOVER,
    SEGMENT_NAME,
    SIG_RE,
    line_hash,
    parse_line,
    read_segments,
    rotation_message,
)

STATUS_OK = "ok"
STATUS_BROKEN = "broken"  # evidence of tampering or damage
STATUS_INCOMPLETE = "incomplete"  # intact so far, but the end is not sealed (crash, or records cut off)
STATUS_EMPTY = "empty"
STATUS_UNANCHORED = "unanchored"  # anchors were asked for, but the receipts hold none of this site

#: Exit codes of ``medfed audit verify``.
#: 2 is the command line's own (a usage error); an empty folder is not a tampered trail, so it has its own code.
EXIT_CODES = {STATUS_OK: 0, STATUS_BROKEN: 1, STATUS_EMPTY: 4, STATUS_UNANCHORED: 1, STATUS_INCOMPLETE: 3}


@dataclass
class VerifyResult:
    """What :func:`verify_trail` found; ``problem`` names the first break."""

    directory: Path
    status: str = STATUS_OK
    problem: str = ""
    records: int = 0
    seals: int = 0
    segments: int = 0
    keys: list[str] = field(default_factory=list)
    anchored: str = ""  # key id of the given public key, when one was given and it checks
    last_seal_seq: int = 0
    last_seal_time: str = ""
    head: str = GENESIS
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    anchor_sites: list[str] = field(default_factory=list)  # sites whose anchors were checked
    anchors_matched: int = 0
    last_anchor: Anchor | None = None

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    def summary(self) -> str:
        """One line for the command line and the report."""
        if self.status == STATUS_EMPTY:
            return f"NO TRAIL: {self.problem}"
        if self.status == STATUS_UNANCHORED:
            return f"NOT ANCHORED: {self.problem}"
        if not self.ok:
            label = "BROKEN" if self.status == STATUS_BROKEN else "INCOMPLETE"
            return f"{label}: {self.problem}"
        keys = ", ".join(self.keys) or "none"
        trust = (
            f"anchored to the given public key {self.anchored}"
            if self.anchored
            else "checked against keys recorded in the trail (pass --public-key for an independent check)"
        )
        notes = f"; {len(self.notes)} note(s): {' '.join(self.notes)}" if self.notes else ""
        anchors = ""
        if self.last_anchor is not None:
            anchors = (f"; {self.anchors_matched} anchor(s) of site {', '.join(self.anchor_sites)} from the "
                       f"coordinator's receipts match, the latest of the {self.last_anchor.describe(with_site=False)}")
        return (
            f"OK: {self.records} records in {self.segments} segment(s), hash chain intact, {self.seals} seals "
            f"verified with key(s) {keys}, {trust}; last seal #{self.last_seal_seq} at {self.last_seal_time}, "
            f"head {self.head[:16]}{anchors}{notes}"
        )


class _Break(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def _decode_key(value: Any) -> bytes | None:
    try:
        raw = base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


class _Verifier:
    """Walks the trail once, line by line; raises :class:`_Break` at the first problem."""

    def __init__(self, result: VerifyResult, anchor: bytes | None, wanted: frozenset[int] = frozenset()) -> None:
        self.result = result
        self.anchor = anchor
        self.wanted = wanted  # record numbers the coordinator's anchors name
        self.hashes: dict[int, str] = {}
        self.sites: list[str] = []  # site names the trail's egress records anchored as
        self.keys: dict[str, bytes] = {}
        self.active_key: str | None = None
        self.retired: set[str] = set()
        self.expected = 1
        self.prev = GENESIS
        self.prev_where = ""
        self.last_kind = ""
        self.last_seal_reason = ""

    def run(self, segments: list[tuple[int, Path, bytes]]) -> None:
        result = self.result
        if not segments:
            raise _Break(STATUS_EMPTY, f"{result.directory} holds no audit segments (audit.jsonl, audit-NNNNNN.jsonl)")
        expected_segment = 1
        for index, (number, path, data) in enumerate(segments):
            is_active = path.name == AUDIT_FILE
            is_last_file = index == len(segments) - 1
            if number != expected_segment:
                missing = ", ".join(SEGMENT_NAME.format(n) for n in range(expected_segment, number))
                raise _Break(
                    STATUS_BROKEN,
                    f"segment {missing} is missing: {path.name} follows "
                    f"{segments[index - 1][1].name if index else 'nothing'} (after record #{self.expected - 1})",
                )
            expected_segment = number + 1
            result.segments += 1
            self._segment(number, path, data, is_active=is_active, is_last_file=is_last_file)
            if not is_active and is_last_file:
                raise _Break(
                    STATUS_BROKEN,
                    f"the active segment {AUDIT_FILE} that follows {path.name} is missing "
                    f"(after record #{self.expected - 1}): it was removed, or a crash hit the roll-over",
                )
        if self.last_kind != KIND_SEAL:
            raise _Break(
                STATUS_INCOMPLETE,
                f"records #{result.last_seal_seq + 1} to #{self.expected - 1} (to {self.prev_where}) are not sealed: "
                "the run that wrote them has not finished (still running, crash or interrupt), or the end of the "
                "trail, with its seal, was cut off",
            )
        if self.last_seal_reason == SEAL_ROLLOVER:
            raise _Break(
                STATUS_INCOMPLETE,
                f"the active segment {AUDIT_FILE} holds no records after roll-over seal #{result.last_seal_seq} "
                f"({self.prev_where}): its records were cut off, or a crash hit the roll-over",
            )
        if self.last_seal_reason == SEAL_PERIODIC:
            raise _Break(
                STATUS_INCOMPLETE,
                f"the trail ends with periodic seal #{result.last_seal_seq} ({self.prev_where}), not with the seal "
                "that ends a run: the run that wrote it has not finished (still running, or crashed), or the "
                "records after that seal were cut off",
            )
        if self.anchor is not None:
            anchor_id = key_id(self.anchor)
            if anchor_id not in self.keys:
                raise _Break(
                    STATUS_BROKEN,
                    f"the given public key {anchor_id} is not among the trail's signing keys "
                    f"({', '.join(self.keys) or 'none'}): the trail was re-signed by another key, or this is "
                    "another site's key",
                )
            if self.keys[anchor_id] != self.anchor:
                raise _Break(STATUS_BROKEN, f"the trail records another public key under id {anchor_id}")
            result.anchored = anchor_id
        result.keys = list(self.keys)

    def _segment(self, number: int, path: Path, data: bytes, *, is_active: bool, is_last_file: bool) -> None:
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        pending_torn: tuple[bytes, str] | None = None
        last_record: dict[str, Any] | None = None
        for i, raw in enumerate(lines):
            where = f"{path.name} line {i + 1}"
            rec = parse_line(raw)
            if rec is None or not isinstance(rec.get("seq"), int) or isinstance(rec.get("seq"), bool):
                if is_last_file and i == len(lines) - 1:
                    raise _Break(
                        STATUS_INCOMPLETE,
                        f"the last line ({where}, {len(raw)} bytes) is torn: a write was cut short (crash, full disk) "
                        f"or the end of the trail was cut off; records up to #{self.expected - 1} verify",
                    )
                if pending_torn is not None:
                    raise _Break(STATUS_BROKEN, f"{pending_torn[1]} is not an audit record (edited or corrupted)")
                pending_torn = (raw, where)
                continue
            if pending_torn is not None:
                digest = hashlib.sha256(pending_torn[0]).hexdigest()
                if rec.get("kind") != KIND_TORN or rec.get("torn_sha256") != digest:
                    raise _Break(
                        STATUS_BROKEN,
                        f"{pending_torn[1]} is not an audit record (edited or corrupted), and no recovery record "
                        "accounts for it",
                    )
                self.result.notes.append(
                    f"a torn line at {pending_torn[1]} (a crash) is accounted for by record #{rec['seq']}."
                )
                pending_torn = None
            self._record(rec, raw, where, number=number, first=last_record is None, lookahead=lines[i + 1 : i + 2])
            last_record = rec
        if not is_active and (
            last_record is None
            or last_record.get("kind") != KIND_SEAL
            or last_record.get("reason") != SEAL_ROLLOVER
            or last_record.get("segment") != number
        ):
            raise _Break(
                STATUS_BROKEN,
                f"segment {path.name} does not end with its closing seal (last record "
                f"#{self.expected - 1}): records were cut off its end, or segments were renamed",
            )

    def _record(
        self, rec: dict[str, Any], raw: bytes, where: str, *, number: int, first: bool, lookahead: list[bytes]
    ) -> None:
        seq, kind = rec["seq"], rec.get("kind")
        # Segment boundaries first: they explain a break better than the chain does.
        if kind == KIND_SEGMENT:
            if not first or rec.get("segment") != number:
                opened = rec.get("segment")
                if isinstance(opened, int) and opened > number and first:
                    missing = ", ".join(SEGMENT_NAME.format(n) for n in range(number, opened))
                    raise _Break(
                        STATUS_BROKEN, f"segment {missing} is missing: record #{seq} ({where}) opens segment {opened}"
                    )
                raise _Break(STATUS_BROKEN, f"record #{seq} ({where}) opens segment {opened} in the wrong place")
        elif first and number > 1:
            raise _Break(
                STATUS_BROKEN,
                f"record #{seq} ({where}) should open segment {number}: the segment's first records were removed",
            )
        if seq != self.expected:
            if seq > self.expected:
                after = parse_line(lookahead[0]) if lookahead else None
                if after is not None and after.get("seq") == self.expected:
                    raise _Break(
                        STATUS_BROKEN,
                        f"records #{self.expected} and #{seq} are swapped: {where} holds #{seq} "
                        f"where #{self.expected} belongs",
                    )
                raise _Break(
                    STATUS_BROKEN,
                    f"record #{self.expected} is missing: {where} holds #{seq} (records deleted or reordered)",
                )
            raise _Break(
                STATUS_BROKEN, f"record #{seq} at {where} is out of order or repeated (expected #{self.expected})"
            )
        if rec.get("prev") != self.prev:
            if seq == 1:
                raise _Break(
                    STATUS_BROKEN, f"record #1 ({where}) does not start the chain: its prev is not the genesis value"
                )
            raise _Break(
                STATUS_BROKEN,
                f"record #{seq - 1} ({self.prev_where}) was altered: record #{seq} ({where}) holds a different hash "
                "for it",
            )
        if kind == KIND_SEAL:
            self._seal(rec, raw, where, number)
        elif kind == KIND_KEY_CREATED:
            self._key_created(rec, where)
        elif kind == KIND_KEY_ROTATED:
            self._key_rotated(rec, where)
        self.prev, self.prev_where = line_hash(raw), where
        if seq in self.wanted:
            self.hashes[seq] = self.prev
        site = anchored_site(rec)
        if site is not None and site not in self.sites:
            self.sites.append(site)
        self.expected += 1
        self.last_kind = str(kind)
        self.result.records += 1
        self.result.head = self.prev

    def _seal(self, rec: dict[str, Any], raw: bytes, where: str, number: int) -> None:
        seq = rec["seq"]
        kid = str(rec.get("key_id", ""))
        match = SIG_RE.search(raw)
        if match is None:
            raise _Break(STATUS_BROKEN, f"seal #{seq} ({where}) carries no signature where one belongs")
        if kid not in self.keys:
            raise _Break(
                STATUS_BROKEN,
                f"seal #{seq} ({where}) is signed by key {kid or '?'}, which no earlier record introduces: "
                "a forged seal",
            )
        if kid in self.retired:
            raise _Break(STATUS_BROKEN, f"seal #{seq} ({where}) is signed by key {kid}, retired by an earlier rotation")
        if kid != self.active_key:
            raise _Break(
                STATUS_BROKEN,
                f"seal #{seq} ({where}) is signed by key {kid}, not by the key in force {self.active_key}",
            )
        body = raw[: match.start()] + b"}"
        if not verify_signature(self.keys[kid], bytes.fromhex(match.group(1).decode("ascii")), SEAL_DOMAIN + body):
            since = f"seal #{self.result.last_seal_seq}" if self.result.last_seal_seq else "the start"
            raise _Break(
                STATUS_BROKEN,
                f"seal #{seq} ({where}) does not verify with key {kid}: the seal was forged or edited, or records "
                f"since {since} were altered and the chain recomputed",
            )
        if rec.get("reason") == SEAL_ROLLOVER and rec.get("segment") != number:
            raise _Break(
                STATUS_BROKEN, f"seal #{seq} ({where}) closes segment {rec.get('segment')} inside segment {number}"
            )
        self.result.seals += 1
        self.last_seal_reason = str(rec.get("reason", ""))
        self.result.last_seal_seq = seq
        self.result.last_seal_time = str(rec.get("time", ""))

    def _key_created(self, rec: dict[str, Any], where: str) -> None:
        public = _decode_key(rec.get("public_key"))
        kid = str(rec.get("key_id", ""))
        if public is None or key_id(public) != kid:
            raise _Break(STATUS_BROKEN, f"record #{rec['seq']} ({where}) introduces a key whose id does not match it")
        if self.active_key is None:
            self.keys[kid] = public
            self.active_key = kid
        elif kid != self.active_key:
            raise _Break(
                STATUS_BROKEN,
                f"record #{rec['seq']} ({where}) introduces signing key {kid} while key {self.active_key} is in force, "
                "without a rotation endorsed by it: the trail may have been re-signed by someone else",
            )

    def _key_rotated(self, rec: dict[str, Any], where: str) -> None:
        seq = rec["seq"]
        public = _decode_key(rec.get("public_key"))
        kid = str(rec.get("key_id", ""))
        previous = str(rec.get("previous_key_id", ""))
        if public is None or key_id(public) != kid:
            raise _Break(STATUS_BROKEN, f"key rotation #{seq} ({where}) names a key whose id does not match it")
        if self.active_key is None or previous != self.active_key:
            raise _Break(
                STATUS_BROKEN, f"key rotation #{seq} ({where}) starts from {previous}, not from the key in force"
            )
        try:
            endorsement = bytes.fromhex(str(rec.get("endorsement", "")))
        except ValueError:
            endorsement = b""
        if not verify_signature(self.keys[previous], endorsement, rotation_message(previous, public)):
            raise _Break(
                STATUS_BROKEN,
                f"key rotation #{seq} ({where}) is not endorsed by the retiring key {previous}: a forged rotation",
            )
        self.keys[kid] = public
        self.retired.add(previous)
        self.active_key = kid


def verify_trail(
    directory: Path,
    *,
    public_key: bytes | None = None,
    anchors: Sequence[Anchor] | None = None,
    site: str | None = None,
) -> VerifyResult:
    """Verify the trail in ``directory``; ``public_key`` (raw Ed25519 bytes) anchors the signing keys.

    With ``anchors`` (the coordinator's, :func:`~anonymization.audit.anchors.load_anchors`), every anchor of
    ``site`` must name a record of the trail with that exact hash. ``site`` defaults to the names the
    trail's egress records say its replies carried, else to the only site in ``anchors``.
    """
    directory = Path(directory)
    result = VerifyResult(directory=directory)
    start = time.perf_counter()
    verifier = _Verifier(result, public_key, frozenset(a.seq for a in anchors or ()))
    try:
        verifier.run(read_segments(directory))
    except _Break as err:
        result.status = err.status
        result.problem = str(err)
        result.keys = list(verifier.keys)
    if anchors is not None and result.status in (STATUS_OK, STATUS_INCOMPLETE):
        _check_anchors(result, verifier, anchors, site)
    result.seconds = time.perf_counter() - start
    return result


def _check_anchors(result: VerifyResult, verifier: _Verifier, anchors: Sequence[Anchor], site: str | None) -> None:
    """Hold the walked trail against the anchors of its site; a mismatch is tampering, whatever else."""
    held = sorted({a.site for a in anchors})
    if site is not None:
        sites = [site]
    elif verifier.sites:
        sites = verifier.sites
    elif len(held) == 1:
        sites = held
    else:
        _unanchored(result, f"the trail's egress records name no site and the receipts hold anchors of several "
                            f"sites ({', '.join(held) or 'none'}); pass --site NAME")
        return
    mine = [a for a in anchors if a.site in sites]
    if not mine:
        named = "" if site is not None else " (the name the trail's egress records give)"
        _unanchored(result, f"the receipts hold no anchors of site {', '.join(sites)}{named}; they hold anchors of "
                            f"{', '.join(held) or 'no site'}. Pass the receipts of a run this site took part in, or "
                            "--site NAME with the site's name as the coordinator recorded it")
        return
    problem = first_mismatch(mine, verifier.hashes, verifier.expected - 1)
    if problem is not None:
        result.status, result.problem = STATUS_BROKEN, problem
        return
    result.anchor_sites = sites
    result.anchors_matched = len(mine)
    result.last_anchor = max(mine, key=lambda a: a.seq)


def _unanchored(result: VerifyResult, problem: str) -> None:
    """No anchor of the site to check: never OK; an unsealed end keeps its own status and says so too."""
    if result.status == STATUS_OK:
        result.status, result.problem = STATUS_UNANCHORED, problem
    else:
        result.problem += f"; and {problem}"
