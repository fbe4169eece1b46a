"""`medfed audit verify` catches every kind of tampering, naming the first record where the trail breaks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from anonymization.audit import AuditTrail, segment_files
from anonymization.audit.keys import AuditSigner, b64
from medfed.cli.audit import audit_app as app
from tests.audit_factory import forge_append, lines_of, locate, rechain, record, sealed_trail, signer_file, write_lines

runner = CliRunner()


@pytest.fixture()
def trail(tmp_path: Path) -> tuple[Path, AuditSigner, Path]:
    """A sealed trail of 3+ segments, its signer, and the exported public key file."""
    signer = signer_file(tmp_path / "keys" / "audit-signing.key")
    directory = tmp_path / "audit"
    sealed_trail(directory, signer)
    pub = tmp_path / "site-audit.pub"
    pub.write_bytes(signer.public_pem())
    return directory, signer, pub


def verify(directory: Path, pub: Path | None = None) -> tuple[int, str]:
    args = ["verify", str(directory)] + (["--public-key", str(pub)] if pub else [])
    result = runner.invoke(app, args)
    return result.exit_code, result.output


def test_untouched_trail_verifies_with_one_line_summary(trail: tuple[Path, AuditSigner, Path]) -> None:
    directory, signer, pub = trail
    assert len([p for _n, p in segment_files(directory)]) >= 3
    code, out = verify(directory, pub)
    assert code == 0, out
    assert out.count("\n") == 1 and out.startswith("OK:") and f"anchored to the given public key {signer.key_id}" in out


def test_edited_record_is_caught(trail: tuple[Path, AuditSigner, Path]) -> None:
    directory, _s, pub = trail
    path, i = locate(directory, 10)
    lines = lines_of(path)
    lines[i] = lines[i].replace(b'"n":', b'"n":1')  # the value 7 becomes 17
    write_lines(path, lines)
    code, out = verify(directory, pub)
    assert code == 1 and "BROKEN" in out
    assert f"record #10 ({path.name} line {i + 1}) was altered" in out


def test_edited_record_with_chain_recomputed_is_caught_by_the_seal(trail: tuple[Path, AuditSigner, Path]) -> None:
    directory, _s, pub = trail
    path, i = locate(directory, 10)
    lines = lines_of(path)
    lines[i] = lines[i].replace(b'"n":', b'"n":1')
    write_lines(path, lines)
    rechain(directory)
    code, out = verify(directory, pub)
    assert code == 1 and "does not verify with key" in out
    first_seal = next(s for s in range(11, 99) if record(directory, s)["kind"] == "seal")
    assert f"seal #{first_seal} " in out  # the first seal after the edit


def test_deleted_record_is_caught(trail: tuple[Path, AuditSigner, Path]) -> None:
    directory, _s, pub = trail
    path, i = locate(directory, 12)
    lines = lines_of(path)
    del lines[i]
    write_lines(path, lines)
    code, out = verify(directory, pub)
    assert code == 1 and f"record #12 is missing: {path.name} line {i + 1} holds #13" in out


def test_two_records_swapped_are_caught(trail: tuple[Path, AuditSigner, Path]) -> None:
    directory, _s, pub = trail
    path, i = locate(directory, 12)
    lines = lines_of(path)
    assert json.loads(lines[i + 1])["seq"] == 13
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    write_lines(path, lines)
    code, out = verify(directory, pub)
    assert code == 1 and "records #12 and #13 are swapped" in out


def test_records_cut_off_the_end_missing_seal(trail: tuple[Path, AuditSigner, Path]) -> None:
    directory, _s, pub = trail
    active = directory / "audit.jsonl"
    lines = lines_of(active)
    assert json.loads(lines[-1])["kind"] == "seal" and json.loads(lines[-2])["kind"] != "seal"
    write_lines(active, lines[:-1])  # the final seal cut off
    last = json.loads(lines[-2])["seq"]
    code, out = verify(directory, pub)
    assert code == 3 and "INCOMPLETE" in out
    assert f"to #{last} " in out and "are not sealed" in out


def test_records_cut_off_the_end_short_seal(trail: tuple[Path, AuditSigner, Path]) -> None:
    directory, _s, pub = trail
    active = directory / "audit.jsonl"
    data = active.read_bytes()
    active.write_bytes(data[:-40])  # the seal's line cut short, signature and all
    n = len(lines_of(active))
    code, out = verify(directory, pub)
    assert code == 3 and f"the last line (audit.jsonl line {n}" in out and "is torn" in out


def test_records_cut_back_to_a_periodic_seal_are_caught(trail: tuple[Path, AuditSigner, Path]) -> None:
    """Cut exactly after a periodic seal: every remaining seal checks, but the run's end is gone."""
    directory, _s, pub = trail
    active = directory / "audit.jsonl"
    lines = lines_of(active)
    periodic = [i for i, raw in enumerate(lines) if json.loads(raw).get("reason") == "periodic"]
    assert periodic and periodic[-1] < len(lines) - 2
    cut = periodic[-1]
    write_lines(active, lines[: cut + 1])
    seq = json.loads(lines[cut])["seq"]
    code, out = verify(directory, pub)
    assert code == 3 and "INCOMPLETE" in out
    assert f"ends with periodic seal #{seq} (audit.jsonl line {cut + 1})" in out and "cut off" in out


def test_active_segment_emptied_is_caught(trail: tuple[Path, AuditSigner, Path]) -> None:
    """Every record of the active segment cut off: the trail would end at the last roll-over seal."""
    directory, _s, pub = trail
    (directory / "audit.jsonl").write_bytes(b"")
    last_closed = [p for _n, p in segment_files(directory) if p.name != "audit.jsonl"][-1]
    code, out = verify(directory, pub)
    assert code == 3 and "the active segment audit.jsonl holds no records after roll-over seal" in out
    assert f"({last_closed.name} line {len(lines_of(last_closed))})" in out


def test_seal_with_its_signature_stripped_is_caught(trail: tuple[Path, AuditSigner, Path]) -> None:
    directory, _s, pub = trail
    active = directory / "audit.jsonl"
    lines = lines_of(active)
    seal = json.loads(lines[-1])
    lines[-1] = lines[-1].split(b',"sig":')[0] + b"}"
    write_lines(active, lines)
    code, out = verify(directory, pub)
    assert code == 1 and f"seal #{seal['seq']} (audit.jsonl line {len(lines)}) carries no signature" in out


def test_forged_key_rotation_is_caught(trail: tuple[Path, AuditSigner, Path], tmp_path: Path) -> None:
    """A forger "rotates" to their own key, without the retiring key's endorsement, and seals with it."""
    directory, signer, pub = trail
    forger = AuditSigner.generate(tmp_path / "forger.key")
    last = json.loads(lines_of(directory / "audit.jsonl")[-1])["seq"]
    forge_append(directory, [
        {"kind": "event", "n": 999},
        {"kind": "key_rotated", "key_id": forger.key_id, "algorithm": "Ed25519", "public_key": b64(forger.public_raw),
         "previous_key_id": signer.key_id, "endorsement": forger.sign(b"whatever").hex()},
        {"kind": "seal", "key_id": forger.key_id, "reason": "end of run"},
    ], forger)
    assert record(directory, last + 2)["kind"] == "key_rotated"
    code, out = verify(directory, pub)
    assert (
        code == 1 and f"key rotation #{last + 2} (audit.jsonl line" in out and "not endorsed by the retiring key" in out
    )


def test_forged_seal_signature_is_caught(trail: tuple[Path, AuditSigner, Path]) -> None:
    directory, _s, pub = trail
    seal_seq = next(s for s in range(1, 99) if record(directory, s)["kind"] == "seal")
    path, i = locate(directory, seal_seq)
    lines = lines_of(path)
    sig = json.loads(lines[i])["sig"]
    forged = ("0" if sig[5] != "0" else "1").join((sig[:5], sig[6:]))
    lines[i] = lines[i].replace(sig.encode(), forged.encode())
    write_lines(path, lines)
    code, out = verify(directory, pub)
    assert code == 1 and f"seal #{seal_seq} ({path.name} line {i + 1}) does not verify" in out


def test_appending_with_the_sites_own_key_verifies(trail: tuple[Path, AuditSigner, Path]) -> None:
    """Control for the forgeries below: the same surgery, signed with the site's key, verifies."""
    directory, signer, pub = trail
    forge_append(directory, [{"kind": "event", "n": 999}, {"kind": "seal", "key_id": signer.key_id,
                                                           "reason": "end of run"}], signer)
    code, out = verify(directory, pub)
    assert code == 0, out


def test_seal_signed_by_an_unknown_key_is_caught(trail: tuple[Path, AuditSigner, Path], tmp_path: Path) -> None:
    """A forger appends records and a seal of their own key, never introduced in the trail."""
    directory, _s, pub = trail
    forger = AuditSigner.generate(tmp_path / "forger.key")
    forge_append(directory, [{"kind": "event", "n": 999}, {"kind": "seal", "key_id": forger.key_id,
                                                           "reason": "end of run"}], forger)
    code, out = verify(directory, pub)
    assert code == 1 and f"is signed by key {forger.key_id}, which no earlier record introduces: a forged seal" in out


def test_seal_by_a_key_smuggled_into_the_trail_is_caught(
    trail: tuple[Path, AuditSigner, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forger appends records, introduces their own key and seals with it."""
    directory, _s, pub = trail
    (directory / "trail.json").unlink()
    # Our writer refuses a second key (it reads the key from the records); a forger's tool would not.
    monkeypatch.setattr(AuditTrail, "_scan_key_id", lambda self: "")
    forger = AuditSigner.generate(tmp_path / "forger.key")
    with AuditTrail(directory, signer=forger) as forged:
        forged.append("event", n=999)
    code, out = verify(directory)
    assert code == 1 and f"introduces signing key {forger.key_id}" in out and "without a rotation" in out


def test_trail_rewritten_under_another_key_fails_against_the_sites_public_key(
    trail: tuple[Path, AuditSigner, Path], tmp_path: Path
) -> None:
    """Rewritten from scratch and re-signed: self-consistent, so only the site's public key exposes it."""
    _directory, _s, pub = trail
    fake = tmp_path / "fake"
    sealed_trail(fake, AuditSigner.generate(tmp_path / "forger.key"))
    assert verify(fake)[0] == 0  # self-consistent
    code, out = verify(fake, pub)
    assert code == 1 and "is not among the trail's signing keys" in out


def test_segment_removed_from_the_middle_is_caught(trail: tuple[Path, AuditSigner, Path]) -> None:
    directory, _s, pub = trail
    (directory / "audit-000002.jsonl").unlink()
    code, out = verify(directory, pub)
    assert code == 1 and "segment audit-000002.jsonl is missing" in out


def test_last_closed_segment_removed_is_caught(trail: tuple[Path, AuditSigner, Path]) -> None:
    directory, _s, pub = trail
    closed = [p for _n, p in segment_files(directory) if p.name != "audit.jsonl"]
    closed[-1].unlink()
    code, out = verify(directory, pub)
    assert code == 1 and f"segment {closed[-1].name} is missing" in out


def test_active_segment_removed_is_caught(trail: tuple[Path, AuditSigner, Path]) -> None:
    directory, _s, pub = trail
    (directory / "audit.jsonl").unlink()
    code, out = verify(directory, pub)
    assert code == 1 and "the active segment audit.jsonl" in out and "is missing" in out


def test_torn_last_line_is_reported_then_recovered(trail: tuple[Path, AuditSigner, Path]) -> None:
    """A crash mid-write leaves a torn line: reported, never dropped; the next run accounts for it."""
    directory, signer, pub = trail
    active = directory / "audit.jsonl"
    with active.open("ab") as fh:
        fh.write(b'{"seq":61,"time":"2026-01-01T00:00:00.000+00:00","kind":"ev')
    n = len(lines_of(active))
    code, out = verify(directory, pub)
    assert code == 3 and f"the last line (audit.jsonl line {n}, " in out and "torn" in out

    with AuditTrail(directory, signer=signer) as again:
        again.append("event", n=1000)
    code, out = verify(directory, pub)
    assert code == 0, out
    assert f"a torn line at audit.jsonl line {n} (a crash) is accounted for" in out


def test_garbage_line_in_the_middle_is_caught(trail: tuple[Path, AuditSigner, Path]) -> None:
    directory, _s, pub = trail
    path, i = locate(directory, 12)
    lines = lines_of(path)
    lines.insert(i, b"not json at all")
    write_lines(path, lines)
    code, out = verify(directory, pub)
    assert code == 1 and f"{path.name} line {i + 1} is not an audit record" in out


def test_empty_or_missing_trail_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, out = verify(tmp_path / "empty")
    # its own code and words: an empty folder (the wrong one, most likely) is not a tampered trail (1)
    assert code == 4 and out.startswith("NO TRAIL:") and "holds no audit segments" in out
    result = runner.invoke(app, ["verify", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not a folder" in result.output
