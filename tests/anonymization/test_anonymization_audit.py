"""The audit trail's original contract: hash-chained records, sealed, safe for several processes.

The full set lives in tests/anonymization/test_audit_*.py (segments, seals, keys, tampering, report).
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from anonymization.audit import AuditTrail
from anonymization.audit.keys import AuditSigner
from tests.audit_factory import signer_file


def test_append_assigns_seq_time_and_chain(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit", signer=AuditSigner.generate())
    first = trail.append("deidentified", input_digest="ab" * 32, actions={"X": 3})
    second = trail.append("round_sent", arrays=2, bytes=1024)
    assert second["seq"] == first["seq"] + 1
    assert first["time"].endswith("+00:00")
    assert len(first["prev"]) == 64 and second["prev"] != first["prev"]
    assert [r["kind"] for r in trail.records()] == ["deidentified", "round_sent"]
    assert not trail.verify()  # not sealed yet
    trail.close()
    assert trail.verify()
    with pytest.raises(ValueError):
        trail.append("x", seq=5)


def test_tampering_is_detected(tmp_path: Path) -> None:
    with AuditTrail(tmp_path, signer=AuditSigner.generate()) as trail:
        for i in range(3):
            trail.append("event", n=i)
    assert trail.verify()
    lines = trail.path.read_text().splitlines()
    edited = json.loads(lines[2])
    edited["n"] = 99
    tampered = [*lines[:2], json.dumps(edited, separators=(",", ":")), *lines[3:]]
    trail.path.write_text("\n".join(tampered) + "\n")
    assert not trail.verify()
    trail.path.write_text("\n".join([*lines[:2], *lines[3:]]) + "\n")  # a record deleted
    assert not trail.verify()


def _appender(directory: str, key: str, worker: int) -> None:
    from anonymization.audit.keys import load_signing_key

    with AuditTrail(Path(directory), fsync=False, signer=load_signing_key(Path(key))) as trail:
        for i in range(25):
            trail.append("event", worker=worker, i=i)


def test_several_processes_append_safely(tmp_path: Path) -> None:
    key = tmp_path / "audit-signing.key"
    signer_file(key)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_appender, args=(str(tmp_path / "audit"), str(key), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    records = AuditTrail(tmp_path / "audit").records()
    assert len(records) == 100
    assert len({(r["worker"], r["i"]) for r in records}) == 100
    assert AuditTrail(tmp_path / "audit").verify()
