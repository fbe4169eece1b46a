"""Hostile DICOM content: decompression bombs, forged re-identification rows, unclean "C" values.

Every attack here is a file or table row an adversary can hand the site; each test
fails if the defence it covers is removed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

from anonymization import limits
from anonymization.batch import run_deid
from anonymization.policy import DEFAULT_MAX_INFLATED_BYTES, DEFAULT_MAX_PIXEL_BYTES, Policy, parse_policy
from tests import dicom_factory as factory

pytestmark = pytest.mark.adversarial

ROOT = Path(__file__).resolve().parents[2]
BOMB_SIDE = 16384  # an RLE header declaring 16384 x 16384 x 16 bits: 512 MiB from under a kilobyte
INFLATED_ZEROS = 300 * 1024 * 1024  # the deflated bomb's run of zeros, inflated


# ---- the bombs -------------------------------------------------------------------------
def rle_bomb(path: Path) -> Path:
    """An RLE Lossless CT whose header declares 16384 x 16384 16-bit pixels, with two tiny segments."""
    ds = factory.make_ct()
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.Rows = ds.Columns = BOMB_SIDE
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    segment = bytes([0x81, 0x00]) * 4  # four runs of 128 zero bytes: 8 bytes of a 256 MiB segment
    header = struct.pack("<16L", 2, 64, 64 + len(segment), *([0] * 13))
    ds.PixelData = encapsulate([header + segment + segment])
    ds["PixelData"].VR = "OB"
    factory.write(ds, path)
    assert path.stat().st_size < 4096
    return path


def deflate_bomb(path: Path, zeros: int = INFLATED_ZEROS) -> Path:
    """A Deflated Explicit VR Little Endian CT whose deflated data set ends in ``zeros`` zero bytes.

    The zeros are Data Set Trailing Padding (FFFC,FFFC), which any reader accepts; the
    stream is built a megabyte at a time, so the test never holds the inflated file.
    """
    ds = factory.make_ct()
    body = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    pydicom.dcmwrite(body, ds, enforce_file_format=True)
    small = body.getvalue()
    meta_end = 132 + 12 + struct.unpack("<L", small[132 + 8:132 + 12])[0]  # after (0002,0000) and its group
    meta_ds = pydicom.dcmread(io.BytesIO(small), stop_before_pixels=True)
    meta_ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(out, meta_ds.file_meta, enforce_standard=True)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out.write(deflater.compress(small[meta_end:]))
    out.write(deflater.compress(struct.pack("<HH2sHL", 0xFFFC, 0xFFFC, b"OB", 0, zeros)))
    chunk = bytes(1 << 20)
    for _ in range(zeros // len(chunk)):
        out.write(deflater.compress(chunk))
    out.write(deflater.compress(bytes(zeros % len(chunk))) + deflater.flush())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue())
    assert path.stat().st_size < 1024 * 1024
    return path


def quarantine_reasons(summary) -> list[str]:
    log = summary.quarantine_dir / "quarantine.jsonl"
    return [json.loads(line)["reason"] for line in log.read_text().splitlines()] if log.exists() else []


# ---- decompression bombs ------------------------------------------------------------------
def test_rle_bomb_is_quarantined_before_decoding(tmp_path: Path) -> None:
    rle_bomb(tmp_path / "src" / "bomb.dcm")
    summary = run_deid(tmp_path / "src", tmp_path / "out", tmp_path / "k.key", progress=False)
    assert quarantine_reasons(summary) == [limits.REASON_PIXEL_LIMIT]
    assert not list((tmp_path / "out").rglob("*.dcm"))


def test_rle_bomb_under_the_limit_is_refused_by_the_rle_ratio(tmp_path: Path) -> None:
    """A bomb declaring less than the limit still cannot decode to it: RLE expands at most 64 times."""
    rle_bomb(tmp_path / "src" / "bomb.dcm")
    policy = parse_policy({"limits": {"max_pixel_bytes": 2**40}})
    summary = run_deid(tmp_path / "src", tmp_path / "out", tmp_path / "k.key", progress=False, policy=policy)
    assert quarantine_reasons(summary) == [limits.REASON_RLE_SHORT]


def test_deflate_bomb_is_quarantined_before_inflating(tmp_path: Path) -> None:
    deflate_bomb(tmp_path / "src" / "bomb.dcm")
    summary = run_deid(tmp_path / "src", tmp_path / "out", tmp_path / "k.key", progress=False)
    assert quarantine_reasons(summary) == [limits.REASON_INFLATE_LIMIT]
    assert not list((tmp_path / "out").rglob("*.dcm"))


def test_deflated_file_under_the_limit_is_still_deidentified(tmp_path: Path) -> None:
    """The bound is a limit, not a ban: a deflated file that inflates to little goes through."""
    deflate_bomb(tmp_path / "src" / "small.dcm", zeros=1024)
    summary = run_deid(tmp_path / "src", tmp_path / "out", tmp_path / "k.key", progress=False)
    assert quarantine_reasons(summary) == []
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 1


def test_limits_come_from_the_site_policy(tmp_path: Path) -> None:
    """A site with larger images raises the limit; a smaller one quarantines an ordinary CT."""
    policy = parse_policy({"limits": {"max_pixel_bytes": 1024}})
    factory.write(factory.make_ct(), tmp_path / "src" / "ct.dcm")
    summary = run_deid(tmp_path / "src", tmp_path / "out", tmp_path / "k.key", progress=False, policy=policy)
    assert quarantine_reasons(summary) == [limits.REASON_PIXEL_LIMIT]
    assert Policy().limits.max_pixel_bytes == DEFAULT_MAX_PIXEL_BYTES
    assert Policy().limits.max_inflated_bytes == DEFAULT_MAX_INFLATED_BYTES
    with pytest.raises(Exception, match="limits.max_pixel_bytes"):
        parse_policy({"limits": {"max_pixel_bytes": 0}})
    with pytest.raises(Exception, match="limits.max_pixels"):
        parse_policy({"limits": {"max_pixels": 10}})


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forked copy of the (large) pytest process
# across exec, while VmHWM is the peak of this program's own memory.
_PEAK = """
import re, sys
from pathlib import Path
from anonymization.batch import run_deid
out = Path(sys.argv[1])
summary = run_deid(out / "src", out / "out", out / "k.key", progress=False)
status = Path("/proc/self/status").read_text()
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) // 1024)
"""


@pytest.mark.parametrize("bomb", [rle_bomb, deflate_bomb], ids=["rle", "deflate"])
def test_peak_memory_of_a_run_stays_bounded(tmp_path: Path, bomb) -> None:
    """A whole `deid run` on a bomb peaks far below what the bomb declares (RSS, in its own process)."""
    bomb(tmp_path / "src" / "bomb.dcm")
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_mib = int(proc.stdout.strip().splitlines()[-1])
    assert peak_mib < 250, f"peak RSS {peak_mib} MiB"


# ---- clean ("C") actions keep only values that have their attribute's form -------------------
def _deidentify(ds, *, converted: bool, policy: Policy | None = None):
    """Through a file and the engine: raw elements (fast paths) or converted ones (normal path)."""
    from anonymization.engine import Deidentifier
    from anonymization.pseudonyms import Pseudonymizer

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    read = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    if converted:
        for _ in read:  # converts every raw element: the engine's normal path
            pass
    Deidentifier(Pseudonymizer(b"s" * 32), policy=policy or Policy()).deidentify(read)
    return read


@pytest.mark.parametrize("converted", [False, True], ids=["raw", "converted"])
@pytest.mark.parametrize(
    ("keyword", "value", "kept"),
    [
        ("TimezoneOffsetFromUTC", "Zelda Phiname", False),  # free text in an SH "+HHMM": removed (basic X)
        ("TimezoneOffsetFromUTC", "+2500", False),  # no such offset
        ("TimezoneOffsetFromUTC", "-0500", True),
        ("StudyTime", "see Zelda", False),  # free text in a TM: emptied (basic Z)
        ("StudyTime", "101530.25", True),
    ],
)
def test_clean_action_drops_values_without_their_form(keyword: str, value: str, kept: bool, converted: bool) -> None:
    ds = factory.make_ct()
    ds.add_new(pydicom.datadict.tag_for_keyword(keyword), pydicom.datadict.dictionary_VR(keyword), value)
    out = _deidentify(ds, converted=converted)
    result = str(out.get(keyword, "") or "")
    if kept:
        assert result == value
    else:
        assert "Zelda" not in result and result != value


@pytest.mark.parametrize("converted", [False, True], ids=["raw", "converted"])
def test_clean_action_on_a_malformed_date_does_not_keep_it(converted: bool) -> None:
    """Under Modified Dates, a Study Date that is not a DA is not kept (nor shifted into something)."""
    ds = factory.make_ct()
    ds.StudyDate = "Zelda 1961"
    out = _deidentify(ds, converted=converted)
    assert str(out.get("StudyDate", "") or "") == ""


# ---- the re-identification table: rows are signed, the officer's key is scrypt-encrypted ---------
PASSPHRASE = b"correct horse battery"


@pytest.fixture(scope="module")
def officer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from anonymization.reid import generate_officer_keys

    folder = tmp_path_factory.mktemp("officer")
    private, public = folder / "officer.key.pem", folder / "officer.pub.pem"
    generate_officer_keys(private, public, PASSPHRASE)
    return private, public


def _record(patient: str) -> object:
    from anonymization.reid import ReidRecord

    return ReidRecord(patient_pseudonym="P-SAME", patient_id=patient, accession_pseudonym="A1",
                      accession_number="ACC", study_uid_pseudonym="2.25.1", study_uid="1.2.3")


def _signed_table(path: Path, public: Path, signer) -> Path:
    from anonymization.reid import ReidTable, load_public_key, seal

    with ReidTable(path, load_public_key(public), signer) as table:
        table.add("k1", seal(_record("REAL-PATIENT"), table.public_key, "k1"))
    return path


def test_a_row_forged_with_the_officer_public_key_is_refused(officer, tmp_path: Path) -> None:
    """The attack: append a row sealed to the officer's public key; a lookup must not return it."""
    from anonymization.audit.keys import AuditSigner
    from anonymization.reid import ReidError, fingerprint, load_private_key, load_public_key, lookup, seal, sign_line

    private, public = officer
    site = AuditSigner.generate()
    table = _signed_table(tmp_path / "t.jsonl", public, site)
    key = load_private_key(private, PASSPHRASE)
    assert [r.patient_id for r in lookup(table, key, "P-SAME")] == ["REAL-PATIENT"]
    genuine = table.read_text()
    forged = seal(_record("OTHER-PATIENT"), load_public_key(public), "k2")

    table.write_text(genuine + forged + "\n")  # unsigned
    with pytest.raises(ReidError, match="line 3 .* not signed by the site"):
        lookup(table, key, "P-SAME")

    attacker = AuditSigner.generate()  # signed, but with the attacker's own key
    table.write_text(genuine + sign_line(forged, fingerprint(load_public_key(public)), attacker) + "\n")
    with pytest.raises(ReidError, match="not a site key you trust"):
        lookup(table, key, "P-SAME")

    row = json.loads(genuine.splitlines()[1])  # a genuine row's signature on forged content
    forged_row = json.loads(forged)
    forged_row.update(kid=row["kid"], sig=row["sig"])
    table.write_text(genuine + json.dumps(forged_row) + "\n")
    with pytest.raises(ReidError, match="does not verify"):
        lookup(table, key, "P-SAME")


def test_a_rewritten_header_does_not_fool_an_officer_who_pins_the_site_key(officer, tmp_path: Path) -> None:
    from anonymization.audit.keys import AuditSigner
    from anonymization.reid import ReidError, load_private_key, lookup

    private, public = officer
    site, attacker = AuditSigner.generate(), AuditSigner.generate()
    table = _signed_table(tmp_path / "t.jsonl", public, attacker)  # the whole table re-made by the attacker
    key = load_private_key(private, PASSPHRASE)
    with pytest.raises(ReidError, match="not a site key you trust"):
        lookup(table, key, "P-SAME", site_keys=[site.public_raw])
    genuine = _signed_table(tmp_path / "g.jsonl", public, site)
    assert len(lookup(genuine, key, "P-SAME", site_keys=[site.public_raw])) == 1


def test_deid_run_signs_rows_and_the_cli_refuses_a_forged_one(officer, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from anonymization.reid import load_public_key, seal
    from medfed.cli import app

    private, public = officer
    factory.write(factory.make_ct(), tmp_path / "src" / "ct.dcm")
    policy = parse_policy({"reid": {"table": str(tmp_path / "reid.jsonl"), "officer_public_key": str(public)}})
    run_deid(tmp_path / "src", tmp_path / "out", tmp_path / "k.key", progress=False, policy=policy)
    table = tmp_path / "reid.jsonl"
    rows = [json.loads(line) for line in table.read_text().splitlines()[1:]]
    assert len(rows) == 1 and rows[0]["sig"] and rows[0]["kid"]
    export = tmp_path / "site.pub.pem"
    runner = CliRunner()
    env = {"MEDFED_REID_PASSPHRASE": PASSPHRASE.decode()}
    result = runner.invoke(app, ["audit", "export-key", str(tmp_path / "out" / "audit"), "--out", str(export)])
    assert result.exit_code == 0, result.output
    pseudonym = pydicom.dcmread(next((tmp_path / "out").rglob("*.dcm"))).PatientID
    args = ["deid", "reid-lookup", str(table), str(pseudonym), "--officer-key", str(private), "--site-key", str(export)]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0 and factory.Patient().patient_id in result.output, result.output
    forged = dataclasses.replace(_record("OTHER-PATIENT"), patient_pseudonym=str(pseudonym))
    with table.open("a") as fh:
        fh.write(seal(forged, load_public_key(public), "k-forged") + "\n")
    result = runner.invoke(app, args, env=env)
    said = " ".join(result.output.split())  # the console wraps long messages
    assert result.exit_code == 2 and "not signed by the site" in said and "OTHER-PATIENT" not in said
    assert "Traceback" not in result.output


def test_officer_key_uses_scrypt_and_an_old_key_is_migrated(officer, tmp_path: Path) -> None:
    """The key file's KDF is scrypt (n >= 2**15); an old PKCS#8 key (PBKDF2, 2,048 rounds) still opens, re-keyed."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from anonymization.reid import ReidError, is_legacy_private_key, load_private_key, rekey_officer_key

    private, _ = officer
    stored = json.loads(private.read_text())
    assert stored["kdf"] == "scrypt" and stored["n"] >= 2**15 and "BEGIN" not in private.read_text()
    old = X25519PrivateKey.generate()
    legacy = tmp_path / "legacy.key.pem"
    legacy.write_bytes(old.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(PASSPHRASE)))
    legacy.chmod(0o600)
    assert is_legacy_private_key(legacy)
    rekey_officer_key(legacy, PASSPHRASE)
    assert not is_legacy_private_key(legacy) and json.loads(legacy.read_text())["kdf"] == "scrypt"
    assert (legacy.stat().st_mode & 0o777) == 0o600
    assert load_private_key(legacy, PASSPHRASE).public_key().public_bytes_raw() == old.public_key().public_bytes_raw()
    with pytest.raises(ReidError, match="wrong passphrase"):
        load_private_key(legacy, b"not it at all")
    hostile = json.loads(legacy.read_text())
    hostile["n"] = 2**30  # a key file must not make the officer's machine allocate 1 TiB
    legacy.write_text(json.dumps(hostile))
    with pytest.raises(ReidError, match="not an officer key"):
        load_private_key(legacy, PASSPHRASE)


def test_an_unsigned_format_1_table_is_read_only_on_request_and_never_appended(officer, tmp_path: Path) -> None:
    from anonymization.audit.keys import AuditSigner
    from anonymization.reid import (
        UNSIGNED_VERSION,
        ReidError,
        ReidTable,
        fingerprint,
        load_private_key,
        load_public_key,
        read_table,
        seal,
    )

    private, public = officer
    pub = load_public_key(public)
    table = tmp_path / "old.jsonl"
    table.write_text(json.dumps({"medfed_reid": UNSIGNED_VERSION, "officer_key": fingerprint(pub)}) + "\n"
                     + seal(_record("OLD-PATIENT"), pub, "k") + "\n")
    key = load_private_key(private, PASSPHRASE)
    with pytest.raises(ReidError, match="not signed.*--accept-unsigned"):
        list(read_table(table, key))
    assert [r.patient_id for r in read_table(table, key, accept_unsigned=True)] == ["OLD-PATIENT"]
    with pytest.raises(ReidError, match="Move it aside"):
        ReidTable(table, pub, AuditSigner.generate())


def test_cli_notes_an_old_officer_key_and_rekeys_it(officer, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from typer.testing import CliRunner

    from anonymization.audit.keys import AuditSigner
    from anonymization.reid import ReidTable, seal
    from medfed.cli import app

    old = X25519PrivateKey.generate()
    legacy = tmp_path / "legacy.key.pem"
    legacy.write_bytes(old.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(PASSPHRASE)))
    legacy.chmod(0o600)
    with ReidTable(tmp_path / "t.jsonl", old.public_key(), AuditSigner.generate()) as table:
        table.add("k", seal(_record("REAL-PATIENT"), old.public_key(), "k"))
    runner, env = CliRunner(), {"MEDFED_REID_PASSPHRASE": PASSPHRASE.decode()}
    lookup_args = ["deid", "reid-lookup", str(tmp_path / "t.jsonl"), "--all", "--officer-key", str(legacy)]
    result = runner.invoke(app, lookup_args, env=env)
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "REAL-PATIENT" in said and "reid-rekey" in said, result.output
    result = runner.invoke(app, ["deid", "reid-rekey", "--officer-key", str(legacy)], env=env)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, lookup_args, env=env)
    assert result.exit_code == 0 and "REAL-PATIENT" in result.output and "reid-rekey" not in result.output
