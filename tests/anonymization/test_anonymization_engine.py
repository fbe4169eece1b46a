"""The PS3.15 table, its resolution for our profile, and the engine that applies it."""

from __future__ import annotations

import datetime as dt
import io
import itertools

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from anonymization.engine import Deidentifier, is_well_known_uid
from anonymization.pseudonyms import Pseudonymizer
from anonymization.table import (
    Profile,
    default_profile,
    load_rows,
    resolve_compound,
)
from tests.dicom_factory import NAME_TO_USE, PHI_MARKERS, make_ct, uid

SECRET = b"\x07" * 32


def roundtrip(ds: Dataset) -> Dataset:
    """Write and read back, so elements are raw (as read from a real file)."""
    buf = io.BytesIO()
    ds.preamble = b"\x00" * 128
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def all_text(ds: Dataset) -> str:
    return "\n".join(f"{e.tag} {e.value!r}" for e in ds.iterall() if e.VR not in ("OB", "OW"))


@pytest.fixture()
def cleaned() -> tuple[Dataset, Dataset, Deidentifier]:
    original = roundtrip(make_ct())
    ds = roundtrip(make_ct())
    engine = Deidentifier(Pseudonymizer(SECRET))
    engine.deidentify(ds)
    return original, ds, engine


# ---- table ------------------------------------------------------------------------
def test_table_has_656_rows_including_patterns_and_unnamed_tags() -> None:
    rows = load_rows()
    assert len(rows) == 656
    assert sum(r.is_pattern for r in rows) == 4  # 50xx, 60xx,3000, 60xx,4000, private
    unnamed = [r for r in rows if r.keyword is None and not r.is_pattern]
    assert len(unnamed) >= 20
    assert keyword_for_tag(NAME_TO_USE) == ""  # pydicom does not know it...
    assert any(r.value == NAME_TO_USE for r in unnamed)  # ...the table does


def test_profile_resolution() -> None:
    p = default_profile()
    assert p.action_for(0x00100030) == "Z"  # birth date: basic Z, option column empty
    assert p.action_for(0x00080020) == "C"  # study date: option column says C (shift)
    assert p.action_for(0x00080018) == "U"
    assert p.action_for(0x00081140) == "U*"  # X/Z/U*: keep sequence, replace UIDs
    assert p.action_for(0x60023000) == "X" and p.action_for(0x601E4000) == "X"  # pattern rows
    assert p.action_for(0x50101234) == "X"
    assert p.action_for(0x00280010) is None  # Rows: not listed
    assert p.private_action == "X"
    basic = Profile(())
    assert basic.action_for(0x00080020) == "Z" and basic.action_for(0x00080023) == "D"  # Z/D, Type 1 in SR
    # Institution Name is Type 3 at the top level of every IOD (iod_types.json): removed;
    # inside a Person Identification Macro item it is 1C: a dummy.
    assert resolve_compound("X/Z/D", 0x00080080) == "X"
    assert resolve_compound("X/Z/D", 0x00080080, parent=0x00081072) == "D"
    assert resolve_compound("X/D", 0x00181030) == "X"
    assert resolve_compound("X/Z/D", 0x00181000) == "D"


# ---- engine -------------------------------------------------------------------------
def test_no_planted_value_survives(cleaned: tuple[Dataset, Dataset, Deidentifier]) -> None:
    _, ds, _ = cleaned
    text = all_text(ds).lower()
    for marker in PHI_MARKERS:
        assert marker.lower() not in text, marker


def test_private_overlay_curve_and_unknown_tag_removed(cleaned: tuple[Dataset, Dataset, Deidentifier]) -> None:
    original, ds, _ = cleaned
    assert any(e.tag.is_private for e in original.iterall())
    assert not any(e.tag.is_private for e in ds.iterall())
    assert 0x60003000 in original and NAME_TO_USE in original
    assert not any(0x6000 <= (e.tag >> 16) <= 0x601E for e in ds)  # whole overlay group gone
    assert not any(0x5000 <= (e.tag >> 16) <= 0x50FF for e in ds)
    assert NAME_TO_USE not in ds  # acted on by tag number


def test_uids_replaced_consistently_well_known_kept(cleaned: tuple[Dataset, Dataset, Deidentifier]) -> None:
    original, ds, engine = cleaned
    p = engine.pseudo
    for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "InstanceCreatorUID"):
        assert ds[kw].value == p.uid(original[kw].value), kw
    assert ds.SOPClassUID == CTImageStorage
    ref = ds.ReferencedImageSequence[0]
    assert ref.ReferencedSOPClassUID == CTImageStorage
    assert ref.ReferencedSOPInstanceUID == p.uid(original.ReferencedImageSequence[0].ReferencedSOPInstanceUID)
    deep = ds.AnatomicRegionSequence[0].DerivationCodeSequence[0]
    assert deep.CodingSchemeUID == "2.16.840.1.113883.6.96"
    assert deep[0x00081155].value == p.uid(uid(0, "deep"))
    for e in ds.iterall():
        if e.VR == "UI" and e.value:
            assert e.value.startswith("2.25.") or is_well_known_uid(e.value) or e.tag == 0x0008010C
            assert len(e.value) <= 64


def test_dates_shifted_by_patient_offset_times_kept(cleaned: tuple[Dataset, Dataset, Deidentifier]) -> None:
    original, ds, engine = cleaned
    offset = engine.pseudo.date_offset_days(original.PatientID)
    expected = (dt.date(2021, 3, 15) + dt.timedelta(days=offset)).strftime("%Y%m%d")
    for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate"):
        assert ds[kw].value == expected, kw
    assert ds.AcquisitionDateTime == expected + "101530.123456+0100"
    assert ds.StudyTime == original.StudyTime
    assert ds.AnatomicRegionSequence[0].DerivationCodeSequence[0][0x00080021].value == expected  # deep, by VR
    assert ds.PatientBirthDate in ("", None)  # table: Z (no option override)


def test_identifiers_become_pseudonyms_and_marks_are_set(cleaned: tuple[Dataset, Dataset, Deidentifier]) -> None:
    original, ds, engine = cleaned
    p = engine.pseudo
    assert ds.PatientID == p.patient_id(original.PatientID) == str(ds.PatientName)
    assert ds.AccessionNumber == p.accession(original.AccessionNumber)
    assert not ds.ReferringPhysicianName  # Z
    assert "OperatorsName" not in ds  # X/Z/D, Type 3 in a CT image -> X
    assert "RequestAttributesSequence" not in ds  # X, with PHI two levels deep
    # free text in an unlisted sequence: removed, or a dummy where the IOD requires it (1C here)
    assert ds.IssuerOfAccessionNumberSequence[0].get("LocalNamespaceEntityID") in (None, "ANONYMIZED")
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert {i.CodeValue for i in ds.DeidentificationMethodCodeSequence} == {"113100", "113107"}
    assert all(i.CodingSchemeDesignator == "DCM" for i in ds.DeidentificationMethodCodeSequence)
    assert "Modified Dates" in " ".join(ds.DeidentificationMethod)


def test_pixel_data_untouched_and_dataset_writable(cleaned: tuple[Dataset, Dataset, Deidentifier]) -> None:
    original, ds, _ = cleaned
    back = roundtrip(ds)
    assert (back.pixel_array == original.pixel_array).all()


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_unparsable_date_is_emptied_not_kept() -> None:
    ds = make_ct()
    ds.StudyDate = "15/03/2021"
    Deidentifier(Pseudonymizer(SECRET)).deidentify(ds)
    assert ds.StudyDate in ("", None)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "test-SR.dcm"])
def test_pydicom_test_files(name: str) -> None:
    path = get_testdata_file(name)
    original = pydicom.dcmread(path)
    ds = pydicom.dcmread(path)
    counts = Deidentifier(Pseudonymizer(SECRET)).deidentify(ds)
    assert counts["U"] >= 3
    assert not any(e.tag.is_private for e in ds.iterall())
    assert ds.SOPInstanceUID != original.SOPInstanceUID
    if original.get("PatientName"):
        assert str(original.PatientName) not in all_text(ds)
    for e in ds.iterall():
        if e.VR == "PN" and e.value and e.tag != 0x00100010:
            assert str(e.value) == "ANONYMIZED"
    roundtrip(ds)


def test_package_imports_stay_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys, anonymization.batch, anonymization.audit, anonymization.keys\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'flwr', 'ray', 'opacus', 'monai')]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _converted(ds: Dataset) -> Dataset:
    """``ds`` with every element converted by pydicom (so the engine cannot take a raw fast path)."""
    for _ in ds.iterall():
        pass
    return ds


def _snapshot(ds: Dataset) -> list[tuple[int, str, object]]:
    out = []
    for e in ds.iterall():
        value = e.value
        if e.VR == "SQ":
            value = len(value)
        elif isinstance(value, (list, pydicom.multival.MultiValue)):
            value = [str(v) for v in value]
        elif not isinstance(value, bytes):
            value = "" if value is None else str(value)
        out.append((int(e.tag), str(e.VR), value))
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "options",
    [{}, {"retain_longitudinal_modified_dates": False},
     {"retain_longitudinal_modified_dates": False, "retain_longitudinal_full_dates": True},
     {"retain_uids": True, "retain_device_identity": True}],
    ids=["default", "basic", "full-dates", "retain-uids"],
)
def test_raw_fast_paths_give_what_the_normal_path_gives(options: dict[str, bool]) -> None:
    """On every pydicom test file: the engine on raw elements (dates, UIDs, emptied and dummy
    values written without pydicom's conversion) and on fully converted elements agree."""
    from pathlib import Path

    from anonymization.policy import Policy

    engine = Deidentifier(Pseudonymizer(SECRET), policy=Policy(**options))
    compared = 0
    for path in sorted(Path(get_testdata_file("CT_small.dcm")).parent.rglob("*.dcm")):
        data = path.read_bytes()
        try:
            fast, slow = pydicom.dcmread(io.BytesIO(data)), _converted(pydicom.dcmread(io.BytesIO(data)))
        except Exception:  # noqa: BLE001 - files pydicom itself cannot read
            continue
        original = lambda data=data: pydicom.dcmread(io.BytesIO(data))  # noqa: E731
        fast_counts = engine.deidentify(fast, original=original)
        slow_counts = engine.deidentify(slow, original=original)
        assert _snapshot(fast) == _snapshot(slow), path.name
        assert fast_counts == slow_counts, path.name
        compared += 1
    assert compared > 60


# ---- the action table: one rule per PS3.15 code drives raw and decoded elements alike ------------
_COLUMNS = ("basic", "retain_safe_private", "retain_uids", "retain_device_identity", "retain_institution_identity",
            "retain_patient_characteristics", "retain_longitudinal_full_dates", "retain_longitudinal_modified_dates",
            "clean_descriptors", "clean_structured_content", "clean_graphics")
_ITEM_UID = "1.2.826.0.1.3680043.2.1125.77"
_VALUES: dict[str, object] = {
    "AE": "STATION7", "AS": "045Y", "CS": "COERCE", "DA": "20210315", "DS": "1.5", "DT": "20210315101112",
    "IS": "7", "LO": "Jane Doe's ward", "LT": "Seen by Dr Jane Doe", "PN": "Doe^Jane", "SH": "DOE-7",
    "ST": "Jane Doe", "TM": "101112", "UC": "Jane Doe", "UI": "1.2.826.0.1.3680043.2.1125.5", "UR": "http://doe.example",
    "UT": "Jane Doe", "AT": 0x00100010, "FL": 1.5, "FD": 2.5, "SL": -3, "SS": -2, "SV": -4, "UL": 3, "US": 2, "UV": 4,
    "OB": b"\x01\x02", "OD": b"\x00" * 8, "OF": b"\x00" * 4, "OL": b"\x00" * 4, "OV": b"\x00" * 8, "OW": b"\x01\x02",
}


def _table_codes(column: str) -> dict[str, list[int]]:
    """Code -> the data set tags (no patterns, command or meta groups) a column gives it, of a VR pydicom knows."""
    from pydicom.datadict import dictionary_VR

    by_code: dict[str, list[int]] = {}
    for row in load_rows():
        code = row.basic if column == "basic" else row.options.get(column)
        if not code or row.is_pattern or row.is_private_row or row.mask != 0xFFFFFFFF or row.value >> 16 in (0, 2):
            continue
        try:
            vr = dictionary_VR(row.value)
        except KeyError:
            continue
        if vr in _VALUES or vr == "SQ":
            by_code.setdefault(code, []).append(row.value)
    return by_code


def _unlisted() -> list[int]:
    """One attribute per VR that the table does not list (the rules by VR apply to it)."""
    from pydicom.datadict import DicomDictionary

    listed = set(default_profile().listed())
    by_vr: dict[str, int] = {}
    for tag, entry in sorted(DicomDictionary.items()):
        vr = entry[0]
        if tag in listed or tag >> 16 in (0, 2) or 0x5000 <= tag >> 16 <= 0x60FF or default_profile().raw_action(tag):
            continue
        if (vr in _VALUES or vr == "SQ") and vr not in by_vr:
            by_vr[vr] = tag
    return sorted(by_vr.values())


def _every_code() -> list[str]:
    """Every code of Table E.1-1 (any column), and "unlisted" for attributes it does not list."""
    return sorted({code for column in _COLUMNS for code in _table_codes(column)}) + ["unlisted"]


def _file_with(tags: list[int], implicit: bool) -> bytes:
    """A CT file carrying every tag in ``tags`` with a plausible, identifying value of its VR."""
    from pydicom.datadict import dictionary_VR
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ds = make_ct()
    for tag in tags:
        vr = dictionary_VR(tag)
        if vr == "SQ":
            item = Dataset()
            item.ReferencedSOPInstanceUID = _ITEM_UID
            item.CodeMeaning = "Jane Doe"
            item.add_new(0x0040A121, "DA", "20210315")  # Date
            item.add_new(0x0040A123, "PN", "Doe^Jane")  # Person Name
            item.add_new(0x0040A160, "UT", "Jane Doe")  # Text Value
            for short in _unlisted():  # short text, removed inside unlisted sequences
                if dictionary_VR(short) in ("SH", "LO"):
                    item.add_new(short, dictionary_VR(short), _VALUES[dictionary_VR(short)])
            ds.add_new(tag, vr, [item])
        else:
            ds.add_new(tag, vr, _VALUES[vr])
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _is_empty_value(elem: pydicom.DataElement) -> bool:
    return elem.value in (None, "", b"") or (elem.VR == "SQ" and len(elem.value) == 0)


def test_the_action_table_has_a_rule_for_every_code_of_ps3_15() -> None:
    """Every code Table E.1-1 uses in any column has a rule; compound codes resolve to codes with steps."""
    from anonymization.engine import ACTION_RULES
    from anonymization.table import RESOLVABLE_COMPOUNDS

    codes = set(_every_code()) - {"unlisted"}
    assert {"X", "Z", "D", "K", "C", "U", "X/Z", "X/D", "X/Z/D", "Z/D", "X/Z/U*"} <= codes
    for code in codes:
        rule = ACTION_RULES[code]
        assert rule.compound == (code in RESOLVABLE_COMPOUNDS), code
        for part in code.split("/"):
            resolved = ACTION_RULES[part]
            assert not resolved.compound and resolved.decoded is not None, (code, part)
    assert ACTION_RULES[None].raw is not None  # unlisted attributes: rules by VR, also on raw bytes


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("code", _every_code())
def test_raw_and_decoded_elements_get_the_same_action_for_each_code(code: str) -> None:
    """For each PS3.15 action code: every attribute the table gives that code (under each option column),
    read from explicit and implicit VR files, comes out the same whether the engine worked on the raw
    bytes or on pydicom's decoded values, and the outcome is the code's (X absent, Z empty, D non-empty,
    K unchanged, U replaced)."""
    from anonymization.policy import Policy

    checked = 0
    for column in _COLUMNS:
        tags = _unlisted() if code == "unlisted" else _table_codes(column).get(code)
        if not tags:
            continue
        for dates, implicit in itertools.product(_DATE_MODES, (False, True)):
            if column.startswith("retain_longitudinal") and column != dates:
                continue
            options = {**_DATE_MODES[dates], **({} if column == "basic" or column == dates else {column: True})}
            engine = Deidentifier(Pseudonymizer(SECRET), policy=Policy(**options))
            wanted = None if code == "unlisted" else code
            chosen = [tag for tag in tags if engine.profile.raw_action(tag) == wanted]  # (another option may win)
            if not chosen:
                continue
            data = _file_with(chosen, implicit)
            raw, decoded = pydicom.dcmread(io.BytesIO(data)), pydicom.dcmread(io.BytesIO(data))
            for _ in decoded.iterall():  # every value converted: no raw step can apply
                pass
            original = lambda data=data: pydicom.dcmread(io.BytesIO(data))  # noqa: E731
            raw_counts = engine.deidentify(raw, original=original)
            decoded_counts = engine.deidentify(decoded, original=original)
            where = f"{code} under {column}, {dates}, {'implicit' if implicit else 'explicit'} VR"
            assert _snapshot(raw) == _snapshot(decoded), where
            assert raw_counts == decoded_counts, where
            _assert_outcome(code, chosen, pydicom.dcmread(io.BytesIO(data)), raw, where)
            checked += len(chosen)
    assert checked, code


_DATE_MODES: dict[str, dict[str, bool]] = {
    "retain_longitudinal_modified_dates": {},
    "retain_longitudinal_full_dates": {
        "retain_longitudinal_modified_dates": False, "retain_longitudinal_full_dates": True},
    "dates removed": {"retain_longitudinal_modified_dates": False},
}
_SET_BY_ENGINE = frozenset({0x00100010, 0x00100020, 0x00080050, 0x00120062, 0x00120063, 0x00120064, 0x00280303})


def _assert_outcome(code: str, tags: list[int], before: Dataset, after: Dataset, where: str) -> None:
    """The resolved action's effect on each attribute (those the engine sets itself excepted)."""
    sop_class = str(before.SOPClassUID)
    for tag in tags:
        if tag in _SET_BY_ENGINE or code == "unlisted":
            continue
        action = resolve_compound(code, tag, sop_class)
        elem = after.get(tag)
        label = f"{pydicom.tag.Tag(tag)} {keyword_for_tag(tag)}: {code} -> {action} ({where})"
        if action == "X":
            assert elem is None, label
        elif action == "Z":
            assert elem is not None and _is_empty_value(elem), label
        elif action == "D":
            assert elem is not None and not _is_empty_value(elem), label
        elif action == "K" and elem is not None and elem.VR != "SQ":
            assert elem.value == before[tag].value, label
        elif action == "U" and not is_well_known_uid(str(before[tag].value)):
            assert elem is not None and elem.value != before[tag].value, label
