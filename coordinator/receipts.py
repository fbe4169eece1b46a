"""What the coordinator received from the sites, and what reached aggregation.

Two append-only JSON-lines files in the run's out-dir, so that the privacy
claims can be checked from the coordinator's side too:

- ``received.jsonl``: every reply a site sent (the record names and types,
  array names and shapes, metric and config keys, bytes, and the SHA-256 of
  the arrays — the same digest the site's egress guard records), including
  every SecAgg+ stage;
- ``aggregation.jsonl``: per round, the digest of each set of arrays handed to
  the strategy's aggregation, whether it was a secure aggregate, and the
  digest of the result;
- ``anchors.jsonl``: per site reply that carried one, the anchor of the site's
  audit trail (site, run, round, record number and hash of the trail's head),
  which ``medfed audit verify DIR --anchors`` checks the site's trail against.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from anonymization.audit.anchors import ANCHOR_RECORD, ANCHORS_FILE, AnchorError, parse_anchor
from medfed.wire import summarize

log = logging.getLogger(__name__)

RECEIVED_FILE = "received.jsonl"
AGGREGATION_FILE = "aggregation.jsonl"


def arrays_digest(arrays: ArrayRecord) -> str:
    """SHA-256 over each array's name and serialized bytes, in order (as the site's egress guard hashes)."""
    return str(summarize(arrays)["digest"])


def describe(msg: Message, node: int | None = None) -> dict[str, Any]:
    """The shape of a reply, without its values (nothing here can identify a patient)."""
    out: dict[str, Any] = {"node": int(node if node is not None else msg.metadata.src_node_id),
                           "message_type": msg.metadata.message_type}
    if msg.has_error():
        out["error"] = {"code": int(msg.error.code), "reason": str(msg.error.reason)}
        return out
    records: dict[str, Any] = {}
    total = 0
    for name, rec in msg.content.items():
        if isinstance(rec, ArrayRecord):
            size = sum(len(a.data) for a in rec.values())
            total += size
            records[name] = {"type": "arrays", "arrays": [{"name": k, "shape": list(a.shape)} for k, a in rec.items()],
                             "bytes": size, "digest": arrays_digest(rec)}
        elif isinstance(rec, MetricRecord):
            records[name] = {"type": "metrics", "keys": sorted(rec.keys()),
                             "scalar": all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                           for v in rec.values())}
        elif isinstance(rec, ConfigRecord):
            size = sum(len(v) if isinstance(v, bytes) else
                       sum(len(b) for b in v if isinstance(b, bytes)) if isinstance(v, list) else 0
                       for v in rec.values())
            total += size
            records[name] = {"type": "config", "keys": sorted(rec.keys()), "bytes": size}
        else:  # pragma: no cover - Flower has no other record types
            records[name] = {"type": type(rec).__name__}
    out["records"] = records
    out["bytes"] = total
    out["wire_bytes"] = wire_bytes(msg)
    return out


def wire_bytes(msg: Message) -> int:
    """Bytes of the message as Flower serializes it for the wire (every nested object, deflated)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    try:
        return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())
    except Exception:  # noqa: BLE001 - a size for the record, never a reason to fail a round
        return -1


class Receipts:
    """Appends to received.jsonl, aggregation.jsonl and anchors.jsonl in ``out_dir``; ``run`` names the run
    as the sites key it (run-name, else Flower's run id)."""

    def __init__(self, out_dir: Path, run: str = "") -> None:
        self.out_dir = out_dir
        self.run = run
        self._lock = threading.Lock()

    def _append(self, name: str, record: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock, open(self.out_dir / name, "a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def received(self, server_round: int, phase: str, msg: Message, stage: str = "", node: int | None = None,
                 verdict: dict[str, Any] | None = None) -> None:
        """Record a reply; ``verdict`` is the coordinator's screen of a training reply (status, reason)."""
        self._append(RECEIVED_FILE, {"round": server_round, "phase": phase, "stage": stage, **describe(msg, node),
                                     **(verdict or {})})
        self._anchor(server_round, phase, msg, node)

    def _anchor(self, server_round: int, phase: str, msg: Message, node: int | None) -> None:
        """Keep the audit anchor a reply carried (SecAgg+ stages and error replies carry none)."""
        if msg.has_error() or ANCHOR_RECORD not in msg.content:
            return
        record = msg.content[ANCHOR_RECORD]
        try:
            if not isinstance(record, ConfigRecord):
                raise AnchorError(f"'{ANCHOR_RECORD}' is a {type(record).__name__}, not a ConfigRecord")
            site, seq, head = parse_anchor(dict(record))
        except AnchorError as err:
            log.warning("round %d: the audit anchor of site node %s is malformed and not kept: %s",
                        server_round, node if node is not None else msg.metadata.src_node_id, err)
            return
        self._append(ANCHORS_FILE, {
            "site": site, "run": self.run, "round": server_round, "phase": phase,
            "node": int(node if node is not None else msg.metadata.src_node_id), "seq": seq, "head": head,
        })

    def aggregation(self, server_round: int, inputs: list[dict[str, Any]], result: ArrayRecord | None,
                    secure: bool) -> None:
        """Record what went into a round's aggregation (:func:`aggregation_inputs`) and what came out."""
        self._append(AGGREGATION_FILE, {
            "round": server_round, "secure": secure, "inputs": inputs,
            "result": arrays_digest(result) if result is not None else None,
        })


def aggregation_inputs(replies: list[Message]) -> list[dict[str, Any]]:
    """Node and arrays digest of each reply that reaches aggregation (error replies do not)."""
    inputs = []
    for msg in replies:
        if msg.has_error():
            continue
        arrays = next(iter(msg.content.array_records.values()), None)
        inputs.append({"node": int(msg.metadata.src_node_id),
                       "digest": arrays_digest(arrays) if arrays is not None else None})
    return inputs


def train_digests(out_dir: Path) -> dict[str, int]:
    """Digest -> first round of every training update received.jsonl holds (a resumed run's replay memory)."""
    seen: dict[str, int] = {}
    for row in read_jsonl(out_dir / RECEIVED_FILE):
        if row.get("phase") != "train" or row.get("stage"):
            continue
        for rec in (row.get("records") or {}).values():
            if rec.get("type") == "arrays" and rec.get("digest"):
                seen.setdefault(rec["digest"], int(row["round"]))
    return seen


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
