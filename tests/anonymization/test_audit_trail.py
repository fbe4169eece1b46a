"""The trail's writer: segments, seals, many processes, keys (location, one key per trail, rotation)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from anonymization.audit import AuditKeyError, AuditTrail, open_trail, read_meta, segment_files
from anonymization.audit.keys import SIGNING_KEY_NAME, AuditSigner, load_public_key, load_signing_key
from anonymization.audit.verify import verify_trail
from medfed.cli.audit import audit_app as app
from tests.audit_factory import sealed_trail, signer_file

runner = CliRunner()


def kinds(directory: Path) -> list[str]:
    return [r["kind"] for r in AuditTrail(directory).records(everything=True)]


def test_segments_roll_over_sealed_and_chained(tmp_path: Path) -> None:
    signer = signer_file(tmp_path / "k" / SIGNING_KEY_NAME)
    sealed_trail(tmp_path / "audit", signer, events=60, seal_every=1000, segment_records=20)
    files = segment_files(tmp_path / "audit")
    assert [p.name for _n, p in files][:2] == ["audit-000001.jsonl", "audit-000002.jsonl"]
    assert files[-1][1].name == "audit.jsonl"
    for _n, path in files[:-1]:
        last = json.loads(path.read_bytes().splitlines()[-1])
        assert (last["kind"], last["reason"], last["segment"]) == ("seal", "rollover", _n)
    for _n, path in files[1:]:
        assert json.loads(path.read_bytes().splitlines()[0]) ["kind"] == "segment_opened"
    records = AuditTrail(tmp_path / "audit").records(everything=True)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert [r["n"] for r in AuditTrail(tmp_path / "audit").records()] == list(range(60))
    assert verify_trail(tmp_path / "audit", public_key=signer.public_raw).ok


def seal_reasons(directory: Path) -> list[str]:
    return [r["reason"] for r in AuditTrail(directory).records(everything=True) if r["kind"] == "seal"]


def test_periodic_seals_by_count_and_time(tmp_path: Path) -> None:
    signer = AuditSigner.generate()
    trail = AuditTrail(tmp_path / "a", signer=signer, seal_every=3, fsync=False)
    for i in range(7):
        trail.append("event", n=i)
    assert kinds(tmp_path / "a").count("seal") == 2 and seal_reasons(tmp_path / "a") == ["periodic"] * 2
    assert verify_trail(tmp_path / "a").status == "incomplete"  # still running: not ended
    trail.close()
    assert seal_reasons(tmp_path / "a") == ["periodic", "periodic", "end of run"]
    assert verify_trail(tmp_path / "a").ok

    timed = AuditTrail(tmp_path / "b", signer=signer, seal_every=10_000, seal_seconds=0.05, fsync=False)
    timed.append("event", n=0)
    time.sleep(0.06)
    timed.append("event", n=1)
    assert kinds(tmp_path / "b") == ["key_created", "event", "event", "seal"]
    assert seal_reasons(tmp_path / "b") == ["periodic"]
    # A run whose last append was sealed periodically still ends with its own end-of-run seal.
    timed.close()
    timed.close()  # nothing new: no third seal
    assert kinds(tmp_path / "b") == ["key_created", "event", "event", "seal", "seal"]
    assert seal_reasons(tmp_path / "b") == ["periodic", "end of run"]
    assert verify_trail(tmp_path / "b", public_key=signer.public_raw).ok


def test_records_hides_the_trails_own_records_and_reserved_names(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path, signer=AuditSigner.generate())
    first = trail.append("deidentified", input_digest="ab" * 32, actions={"X": 3})
    trail.close()
    assert first["seq"] == 2 and first["time"].endswith("+00:00")  # 1 is key_created
    assert [r["kind"] for r in trail.records()] == ["deidentified"]
    with pytest.raises(ValueError, match="reserved"):
        trail.append("x", seq=5)
    with pytest.raises(ValueError, match="reserved"):
        trail.append("seal")


def _appender(directory: str, key: str, worker: int) -> None:
    trail = open_trail(Path(directory), audit_key=Path(key), default_key=Path(key), fsync=False,
                       seal_every=9, segment_records=40)
    for i in range(60):
        trail.append("event", worker=worker, i=i)
    trail.close()


def test_many_processes_append_roll_over_and_seal_safely(tmp_path: Path) -> None:
    key = tmp_path / "keys" / SIGNING_KEY_NAME
    signer_file(key)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_appender, args=(str(tmp_path / "audit"), str(key), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    events = AuditTrail(tmp_path / "audit").records()
    assert len(events) == 240 and len({(r["worker"], r["i"]) for r in events}) == 240
    for w in range(4):  # each writer's records stay in its own order
        assert [r["i"] for r in events if r["worker"] == w] == list(range(60))
    everything = AuditTrail(tmp_path / "audit").records(everything=True)
    assert [r["seq"] for r in everything] == list(range(1, len(everything) + 1))
    assert kinds(tmp_path / "audit").count("key_created") == 1
    assert len(segment_files(tmp_path / "audit")) >= 5
    result = verify_trail(tmp_path / "audit", public_key=load_public_key_pem(key, tmp_path))
    assert result.ok, result.problem


def _append_until_killed(directory: str, key: str, ready: Any) -> None:
    trail = open_trail(Path(directory), audit_key=Path(key), default_key=Path(key), fsync=False, seal_every=50)
    i = 0
    while True:
        trail.append("event", i=i, pad="x" * 4000)  # long lines, so a kill may well land mid-write
        i += 1
        if i == 300:
            ready.set()


def test_a_writer_killed_mid_run_leaves_an_incomplete_trail_that_the_next_run_seals(tmp_path: Path) -> None:
    """A real crash (SIGKILL): verification says incomplete, never OK or silently shorter; nothing is lost."""
    key = tmp_path / "keys" / SIGNING_KEY_NAME
    signer = signer_file(key)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_append_until_killed, args=(str(tmp_path / "audit"), str(key), ready))
    proc.start()
    try:
        assert ready.wait(60), "the writer did not start"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    result = verify_trail(tmp_path / "audit", public_key=signer.public_raw)
    assert result.status == "incomplete" and result.exit_code == 3, result.summary()
    assert any(s in result.problem for s in ("are not sealed", "is torn", "ends with periodic seal")), result.problem
    written = AuditTrail(tmp_path / "audit").records()
    assert [r["i"] for r in written] == list(range(len(written))) and len(written) >= 300

    with open_trail(tmp_path / "audit", audit_key=key, default_key=key) as again:
        again.append("event", i=-1)
    result = verify_trail(tmp_path / "audit", public_key=signer.public_raw)
    assert result.ok, result.problem
    assert AuditTrail(tmp_path / "audit").records()[: len(written)] == written  # nothing dropped


def load_public_key_pem(key: Path, tmp_path: Path) -> bytes:
    pub = tmp_path / "pub.pem"
    pub.write_bytes(load_signing_key(key).public_pem())
    return load_public_key(pub)


def test_key_is_created_0600_outside_the_trail_and_recorded(tmp_path: Path) -> None:
    key = tmp_path / "secrets" / SIGNING_KEY_NAME
    with open_trail(tmp_path / "audit", audit_key=None, default_key=key) as trail:
        trail.append("event")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    meta = read_meta(tmp_path / "audit")
    assert meta["signing_key"] == str(key.resolve()) and meta["key_id"] == load_signing_key(key).key_id
    assert kinds(tmp_path / "audit")[0] == "key_created"
    with pytest.raises(AuditKeyError, match="lies inside"):
        open_trail(tmp_path / "audit2", audit_key=tmp_path / "audit2" / "k.key", default_key=key)
    with pytest.raises(AuditKeyError, match="lies inside"):
        open_trail(tmp_path / "audit3", audit_key=None, default_key=tmp_path / "deid" / "k.key",
                   forbidden=(tmp_path / "deid",))
    os.chmod(key, 0o644)
    with pytest.raises(AuditKeyError, match="chmod 600"):
        open_trail(tmp_path / "audit", audit_key=None, default_key=key)


def test_second_writer_finds_the_same_key_through_the_trail(tmp_path: Path) -> None:
    """De-identification (key next to the site secret) and the site client (state folder) share one key."""
    deid_default = tmp_path / "keys" / SIGNING_KEY_NAME
    site_default = tmp_path / "state" / SIGNING_KEY_NAME
    with open_trail(tmp_path / "audit", audit_key=None, default_key=deid_default) as t:
        t.append("deid_run", files=1)
    with open_trail(tmp_path / "audit", audit_key=None, default_key=site_default) as t:
        t.append("round_trained", server_round=1)
    assert not site_default.exists()
    assert kinds(tmp_path / "audit").count("key_created") == 1
    assert verify_trail(tmp_path / "audit", public_key=load_signing_key(deid_default).public_raw).ok


def test_another_key_is_refused_with_what_to_do(tmp_path: Path) -> None:
    with open_trail(tmp_path / "audit", audit_key=None, default_key=tmp_path / "a.key") as t:
        t.append("event")
    other = signer_file(tmp_path / "b.key")
    with pytest.raises(AuditKeyError, match="is sealed with key .* holds key " + other.key_id):
        open_trail(tmp_path / "audit", audit_key=tmp_path / "b.key", default_key=tmp_path / "x.key")
    (tmp_path / "a.key").unlink()
    with pytest.raises(AuditKeyError, match="does not exist; restore that file"):
        open_trail(tmp_path / "audit", audit_key=None, default_key=tmp_path / "x.key")
    assert not (tmp_path / "x.key").exists()  # no stray key created


def test_rotate_and_export_key_through_the_cli(tmp_path: Path) -> None:
    key = tmp_path / "keys" / SIGNING_KEY_NAME
    with open_trail(tmp_path / "audit", audit_key=key, default_key=key) as t:
        t.append("event", n=1)
    old_pub = tmp_path / "old.pem"
    result = runner.invoke(app, ["export-key", str(tmp_path / "audit"), "--out", str(old_pub)])
    assert result.exit_code == 0, result.output
    old_id = load_signing_key(key).key_id

    result = runner.invoke(app, ["rotate-key", str(tmp_path / "audit")])
    assert result.exit_code == 0, result.output
    new_id = load_signing_key(key).key_id
    assert f"{old_id} -> {new_id}" in result.output and stat.S_IMODE(key.stat().st_mode) == 0o600
    with open_trail(tmp_path / "audit", audit_key=None, default_key=tmp_path / "unused") as t:
        t.append("event", n=2)  # the rotated key seals from now on
    assert kinds(tmp_path / "audit") == ["key_created", "event", "seal", "key_rotated", "seal", "event", "seal"]

    result = runner.invoke(app, ["export-key", "--audit-key", str(key)])
    assert result.exit_code == 0 and result.output.startswith("-----BEGIN PUBLIC KEY-----")
    new_pub = tmp_path / "new.pem"
    new_pub.write_text(result.output)
    for pub in (old_pub, new_pub):  # either end of the rotation anchors the trail
        result = runner.invoke(app, ["verify", str(tmp_path / "audit"), "--public-key", str(pub)])
        assert result.exit_code == 0, result.output
        assert old_id in result.output and new_id in result.output


def test_retired_key_cannot_seal_after_rotation(tmp_path: Path) -> None:
    key = tmp_path / "k" / SIGNING_KEY_NAME
    stale = open_trail(tmp_path / "audit", audit_key=key, default_key=key)
    stale.append("event")
    old_signer = stale.signer
    with AuditTrail(tmp_path / "audit", signer=load_signing_key(key)) as t:
        t.rotate_key()
    stale.append("event")
    stale.close()  # follows the rotation: reloads the key file instead of signing with the old key
    assert stale.signer is not None and stale.signer.key_id != old_signer.key_id  # type: ignore[union-attr]
    assert verify_trail(tmp_path / "audit").ok


def test_medfed_mounts_the_audit_commands() -> None:
    from medfed.cli import app as medfed

    result = runner.invoke(medfed, ["audit", "--help"])
    assert result.exit_code == 0
    for name in ("verify", "report", "export-key", "rotate-key"):
        assert name in result.output


def test_audit_commands_import_no_torch_or_flower(tmp_path: Path) -> None:
    """An outside auditor verifies on a plain machine: the commands must not drag in the ML stack."""
    import subprocess
    import sys

    signer = signer_file(tmp_path / "k.key")
    sealed_trail(tmp_path / "audit", signer, events=5)
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom medfed.cli import app\n"
        f"r = CliRunner().invoke(app, ['audit', 'verify', {str(tmp_path / 'audit')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'flwr', 'monai', 'ray') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]


def test_deid_refuses_an_audit_key_inside_the_store(tmp_path: Path) -> None:
    from anonymization.batch import DeidError, run_deid
    from tests.dicom_factory import make_ct, write

    write(make_ct(), tmp_path / "src" / "a.dcm")
    with pytest.raises(DeidError, match="lies inside"):
        run_deid(tmp_path / "src", tmp_path / "deid", tmp_path / "site.key", audit_key=tmp_path / "deid" / "a.key",
                 progress=False)
    assert not (tmp_path / "deid" / "a.key").exists()
