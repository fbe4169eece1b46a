"""The site policy file (TOML, pydantic) and the encrypted re-identification table."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from anonymization.audit.keys import AuditSigner
from anonymization.batch import DeidError, run_deid
from anonymization.policy import (
    DEFAULT_POLICY,
    Policy,
    PolicyError,
    example_policy_text,
    load_policy,
    parse_policy,
)
from anonymization.reid import (
    ReidError,
    ReidRecord,
    ReidTable,
    generate_officer_keys,
    load_private_key,
    load_public_key,
    lookup,
    open_line,
    read_table,
    seal,
)
from anonymization.table import DEFAULT_OPTIONS
from tests.dicom_factory import Patient, make_ct, write

PASSPHRASE = b"correct horse battery"
SITE_SIGNER = AuditSigner.generate()  # the site's audit signing key: it signs re-identification rows


# ---- policy -----------------------------------------------------------------------------
def test_default_policy_is_todays_behaviour() -> None:
    assert DEFAULT_POLICY.table_options == DEFAULT_OPTIONS
    assert DEFAULT_POLICY.applied_options == DEFAULT_OPTIONS
    assert load_policy(None) == DEFAULT_POLICY
    assert DEFAULT_POLICY.longitudinal_temporal_information == "MODIFIED"
    assert [c.value for c in DEFAULT_POLICY.method_codes()] == ["113100", "113107"]


def test_example_policy_is_documented_and_equals_the_default(tmp_path: Path) -> None:
    text = example_policy_text()
    data = tomllib.loads(text)
    fields = set(Policy.model_fields) - {"reid", "version", "limits"}
    for name in fields:
        assert f"\n{name} = " in text, f"{name} is not documented in the example policy"
    for name in Policy.model_fields["limits"].annotation.model_fields:  # the [limits] table
        assert f"\n{name} = " in text, f"limits.{name} is not documented in the example policy"
    assert parse_policy(data) == DEFAULT_POLICY
    # the commented-out [reid] section is valid when switched on
    enabled = text.replace("# [reid]", "[reid]").replace('# table = "', 'table = "').replace(
        '# officer_public_key = "', 'officer_public_key = "')
    path = tmp_path / "policy.toml"
    path.write_text(enabled)
    policy = load_policy(path)
    assert policy.reid is not None and policy.reid.officer_public_key == tmp_path / "privacy-officer.pub.pem"


@pytest.mark.parametrize(
    ("text", "field", "hint"),
    [
        ("retain_uids = 'maybe'", "retain_uids", "boolean"),
        ("retain_uid = true", "retain_uid", "unknown field"),
        ("retain_longitudinal_full_dates = true", "retain_longitudinal_full_dates", "mutually exclusive"),
        ("version = 2", "version", "1"),
        ("[reid]\ntable = 'x'", "reid.officer_public_key", "Field required"),
        ("clean_descriptors = 1.5", "clean_descriptors", "boolean"),
    ],
)
def test_errors_name_the_field(tmp_path: Path, text: str, field: str, hint: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text + "\n")
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    message = str(err.value)
    assert str(path) in message and hint in message
    assert f"`{field}`" in message or field in message


def test_unreadable_and_non_toml_policy(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("retain_uids = = true")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(bad)
    assert issubclass(PolicyError, DeidError)  # the CLI reports it like any argument error


def test_policy_check_command(tmp_path: Path) -> None:
    from medfed.cli import app

    path = tmp_path / "p.toml"
    path.write_text("clean_descriptors = true\nretain_longitudinal_modified_dates = false\n")
    result = CliRunner().invoke(app, ["deid", "policy-check", str(path)])
    assert result.exit_code == 0, result.output
    assert "113105" in result.output and "REMOVED" in result.output
    path.write_text("clean_descriptor = true\n")
    result = CliRunner().invoke(app, ["deid", "policy-check", str(path)])
    assert result.exit_code == 2 and "clean_descriptor" in result.output


@pytest.mark.integration
def test_run_deid_applies_the_policy_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(make_ct(Patient(3)), src / "a.dcm")
    policy = tmp_path / "policy.toml"
    policy.write_text("retain_institution_identity = true\nretain_longitudinal_modified_dates = false\n")
    summary = run_deid(src, tmp_path / "dst", tmp_path / "site.key", policy=policy, progress=False)
    assert summary.deidentified == 1
    out = pydicom.dcmread(next((tmp_path / "dst" / "images").rglob("*.dcm")))
    assert out.InstitutionName == "PHIINST Saint Mercy Hospital"
    assert out.StudyDate in ("", None) and out.LongitudinalTemporalInformationModified == "REMOVED"
    assert {i.CodeValue for i in out.DeidentificationMethodCodeSequence} == {"113100", "113112"}
    state = json.loads((tmp_path / "dst" / "deid.json").read_text())
    assert state["profile"] == ["retain_institution_identity"]


# ---- re-identification table ----------------------------------------------------------------
@pytest.fixture()
def officer(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "officer" / "officer.key.pem", tmp_path / "site" / "officer.pub.pem"
    generate_officer_keys(private, public, PASSPHRASE)
    return private, public


RECORD = ReidRecord(
    patient_pseudonym="PABCDEFGHIJKLMNOPQRST",
    patient_id="PHIPID-837261-9",
    accession_pseudonym="AABCDEFGHIJKLMNO",
    accession_number="PHIACC9918291",
    study_uid_pseudonym="2.25.1234",
    study_uid="1.2.826.0.1.3680043.8.498.4242",
)


def test_keys_private_encrypted_and_0600(officer: tuple[Path, Path]) -> None:
    private, public = officer
    assert (private.stat().st_mode & 0o777) == 0o600
    stored = json.loads(private.read_bytes())  # scrypt-encrypted, never in clear
    assert stored["kdf"] == "scrypt" and stored["n"] >= 2**15
    with pytest.raises(ReidError, match="wrong passphrase"):
        load_private_key(private, b"not the passphrase")
    with pytest.raises(ReidError, match="already exists"):
        generate_officer_keys(private, public, PASSPHRASE)
    with pytest.raises(ReidError, match="not a PEM public key"):
        load_public_key(private)


def test_table_never_holds_an_identifier_in_clear_and_the_officer_reads_it(
    officer: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = officer
    path = tmp_path / "reid.jsonl"
    with ReidTable(path, load_public_key(public), SITE_SIGNER) as table:
        assert table.add("k1", seal(RECORD, table.public_key, "k1"))
        assert not table.add("k1", seal(RECORD, table.public_key, "k1"))  # no duplicate row
    raw = path.read_bytes()
    for value in (RECORD.patient_id, RECORD.accession_number, RECORD.study_uid, "PHIPID", "837261", "4242",
                  RECORD.patient_pseudonym, RECORD.study_uid_pseudonym):
        assert value.encode() not in raw
    assert (path.stat().st_mode & 0o777) == 0o600
    key = load_private_key(private, PASSPHRASE)
    assert list(read_table(path, key)) == [RECORD]
    assert lookup(path, key, RECORD.patient_pseudonym) == [RECORD]
    assert lookup(path, key, RECORD.accession_pseudonym) == [RECORD]
    assert lookup(path, key, "P-nobody") == []


def test_other_keys_cannot_read_and_tampering_is_detected(officer: tuple[Path, Path], tmp_path: Path) -> None:
    private, public = officer
    path = tmp_path / "reid.jsonl"
    with ReidTable(path, load_public_key(public), SITE_SIGNER) as table:
        table.add("k", seal(RECORD, table.public_key, "k"))
    intruder_private, intruder_public = tmp_path / "i.key", tmp_path / "i.pub"
    generate_officer_keys(intruder_private, intruder_public, PASSPHRASE)
    intruder = load_private_key(intruder_private, PASSPHRASE)
    with pytest.raises(ReidError, match="another officer key"):
        list(read_table(path, intruder))
    line = path.read_text().splitlines()[1]
    with pytest.raises(ReidError):
        open_line(line, intruder)  # forging the header would not help
    row = json.loads(line)
    row["ct"] = row["ct"][:-4] + ("AAAA" if not row["ct"].endswith("AAAA") else "BBBB")
    with pytest.raises(ReidError):
        open_line(json.dumps(row), load_private_key(private, PASSPHRASE))
    with pytest.raises(ReidError, match="another officer key"):
        ReidTable(path, load_public_key(intruder_public))


@pytest.mark.integration
def test_run_deid_writes_sealed_rows_and_cli_looks_them_up(officer: tuple[Path, Path], tmp_path: Path) -> None:
    from medfed.cli import app

    private, public = officer
    src = tmp_path / "src"
    patients = [Patient(5), Patient(6)]
    originals = {}
    for p in patients:
        for instance in (0, 1):
            ds = make_ct(p, instance=instance)
            originals[p.patient_id] = (ds.AccessionNumber, ds.StudyInstanceUID)
            write(ds, src / f"{p.index}-{instance}.dcm")
    policy = tmp_path / "site" / "policy.toml"
    policy.write_text('[reid]\ntable = "../reid/table.jsonl"\nofficer_public_key = "officer.pub.pem"\n')
    runner = CliRunner()
    result = runner.invoke(app, ["deid", "run", str(src), str(tmp_path / "dst"), "--key", str(tmp_path / "site.key"),
                                 "--policy", str(policy), "--no-progress"])
    assert result.exit_code == 0, result.output
    table = tmp_path / "reid" / "table.jsonl"
    lines = table.read_text().splitlines()
    assert len(lines) == 1 + 2  # header + one row per (patient, study), not per file
    raw = table.read_bytes()
    for pid, (acc, study) in originals.items():
        assert pid.encode() not in raw and acc.encode() not in raw and study.encode() not in raw
    out = pydicom.dcmread(next((tmp_path / "dst" / "images").rglob("*.dcm")))
    env = {**os.environ, "MEDFED_REID_PASSPHRASE": PASSPHRASE.decode()}
    result = runner.invoke(app, ["deid", "reid-lookup", str(table), str(out.PatientID), "--officer-key", str(private)],
                           env=env)
    assert result.exit_code == 0, result.output
    original_pid = next(pid for pid in originals if pid in result.output)
    assert originals[original_pid][0] in result.output
    # a second run over the same files appends nothing
    run_deid(src, tmp_path / "dst", tmp_path / "site.key", policy=load_policy(policy), progress=False)
    assert len(table.read_text().splitlines()) == 3
    # the table must stay out of the store, and --reid-table needs the officer's key
    with pytest.raises(DeidError, match="inside the destination"):
        run_deid(src, tmp_path / "dst", tmp_path / "site.key", policy=load_policy(policy),
                 reid_table=tmp_path / "dst" / "t.jsonl", progress=False)
    with pytest.raises(DeidError, match="officer's public key"):
        run_deid(src, tmp_path / "dst", tmp_path / "site.key", reid_table=tmp_path / "t.jsonl", progress=False)


def test_reid_keygen_and_lookup_commands(tmp_path: Path) -> None:
    from medfed.cli import app

    runner = CliRunner()
    env = {**os.environ, "MEDFED_REID_PASSPHRASE": PASSPHRASE.decode()}
    private, public = tmp_path / "o.key.pem", tmp_path / "o.pub.pem"
    result = runner.invoke(app, ["deid", "reid-keygen", "--private", str(private), "--public", str(public)], env=env)
    assert result.exit_code == 0, result.output
    table = tmp_path / "t.jsonl"
    with ReidTable(table, load_public_key(public), SITE_SIGNER) as writer:
        writer.add("k", seal(RECORD, writer.public_key, "k"))
    result = runner.invoke(app, ["deid", "reid-lookup", str(table), "--all", "--officer-key", str(private)], env=env)
    assert result.exit_code == 0 and RECORD.patient_id in result.output
    result = runner.invoke(app, ["deid", "reid-lookup", str(table), "nobody", "--officer-key", str(private)], env=env)
    assert result.exit_code == 1
    bad_env = {**env, "MEDFED_REID_PASSPHRASE": "wrong passphrase"}
    result = runner.invoke(
        app, ["deid", "reid-lookup", str(table), "--all", "--officer-key", str(private)], env=bad_env
    )
    assert result.exit_code == 2 and "wrong" in result.output and "passphrase" in result.output


# ---- CID 7050: the exact code of each option ---------------------------------------------------
CID7050 = {  # PS3.16 CID 7050 De-identification Method: option -> (Code Value, Code Meaning); scheme DCM
    "clean_pixel_data": ("113101", "Clean Pixel Data Option"),
    "clean_graphics": ("113103", "Clean Graphics Option"),
    "clean_structured_content": ("113104", "Clean Structured Content Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "retain_longitudinal_full_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain_longitudinal_modified_dates": (
        "113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
}
BASIC = ("113100", "DCM", "Basic Application Confidentiality Profile")


@pytest.mark.parametrize("option", sorted(CID7050))
def test_each_option_writes_its_cid7050_code(option: str) -> None:
    from anonymization.engine import Deidentifier
    from anonymization.pseudonyms import Pseudonymizer

    ds = make_ct()
    Deidentifier(Pseudonymizer(b"\x01" * 32), policy=Policy.from_options([option])).deidentify(ds)
    items = [(i.CodeValue, i.CodingSchemeDesignator, i.CodeMeaning) for i in ds.DeidentificationMethodCodeSequence]
    value, meaning = CID7050[option]
    assert items == [BASIC, (value, "DCM", meaning)]
    method = list(ds.DeidentificationMethod)
    assert len(method) == 2 and method[1] == meaning
    assert ds.PatientIdentityRemoved == "YES"


def test_shipped_codes_are_pydicoms_cid7050() -> None:
    """The codes are written out (importing pydicom.sr is slow); they must be the standard's."""
    from pydicom.sr.codedict import codes

    from anonymization.policy import _CODES, BASIC_PROFILE_CODE

    standard = {c.value: c for c in (getattr(codes.cid7050, name) for name in codes.cid7050.dir())}
    for code in (BASIC_PROFILE_CODE, *_CODES.values()):
        theirs = standard[code.value]
        assert (code.scheme_designator, code.meaning) == (theirs.scheme_designator, theirs.meaning), code
    assert {name: (c.value, c.meaning) for name, c in _CODES.items()} == CID7050
    # every CID 7050 code but Clean Recognizable Visual Features (no such option here) is used
    assert set(standard) - {c.value for c in _CODES.values()} - {BASIC_PROFILE_CODE.value} == {"113102"}
