"""The audit trail: generic, hash-chained, safe for several processes appending."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from anonymization.audit import AuditTrail


def test_append_assigns_seq_time_and_chain(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit")
    first = trail.append("deidentified", input_digest="ab" * 32, actions={"X": 3})
    second = trail.append("round_sent", arrays=2, bytes=1024)
    assert (first["seq"], second["seq"]) == (1, 2)
    assert first["time"].endswith("+00:00")
    assert first["prev"] == "0" * 64 and second["prev"] != first["prev"]
    assert [r["kind"] for r in trail.records()] == ["deidentified", "round_sent"]
    assert trail.verify()
    with pytest.raises(ValueError):
        trail.append("x", seq=5)


def test_tampering_is_detected(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path)
    for i in range(3):
        trail.append("event", n=i)
    lines = trail.path.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["n"] = 99
    lines[1] = json.dumps(edited, separators=(",", ":"))
    trail.path.write_text("\n".join(lines) + "\n")
    assert not trail.verify()
    trail.path.write_text("\n".join([lines[0], lines[2]]) + "\n")  # a record deleted
    assert not trail.verify()


def _appender(directory: str, worker: int) -> None:
    trail = AuditTrail(Path(directory), fsync=False)
    for i in range(25):
        trail.append("event", worker=worker, i=i)


def test_several_processes_append_safely(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_appender, args=(str(tmp_path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    records = AuditTrail(tmp_path).records()
    assert [r["seq"] for r in records] == list(range(1, 101))
    assert len({(r["worker"], r["i"]) for r in records}) == 100
    assert AuditTrail(tmp_path).verify()
