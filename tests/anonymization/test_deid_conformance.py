"""Every row of PS3.15 Table E.1-1 (656, edition 2026c), applied by tag number.

For each row the attribute is planted with an identifying value, at the top level of
a CT image and two items deep in sequences the table does not list, written and read
back (explicit VR, and implicit VR where the 25 tags pydicom does not know arrive as
UN), de-identified, and checked against what the table says for the policy: the
Basic Profile alone, the default policy (+ Modified Dates), and every option at once
(+ Full Dates). The expected action is computed here from the shipped JSON and the
IOD Types, independently of the engine's own lookup code.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from importlib import resources
from typing import Any

import pydicom
import pytest
from pydicom.datadict import dictionary_has_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from anonymization.dates import shift_da, shift_dt
from anonymization.engine import Deidentifier, _parse_un_sequence
from anonymization.iod import load_iod_types
from anonymization.policy import Policy
from anonymization.pseudonyms import Pseudonymizer
from anonymization.table import OPTION_COLUMNS
from anonymization.writer import encode_file

PYDICOM_INPUT_WARNINGS = [  # pydicom reading deliberately odd or broken inputs: expected
    pytest.mark.filterwarnings("ignore:VR lookup failed:UserWarning"),
    pytest.mark.filterwarnings("ignore:The value length:UserWarning"),
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
]
pytestmark = PYDICOM_INPUT_WARNINGS

SECRET = b"\x05" * 32
PATIENT_ID = "PHIPID-4711"
PATIENT_NAME = "Phiname^Zelda"
NAME_WORDS = ("PHINAME", "ZELDA")
ANATOMIC_REGION = 0x00082218  # unlisted sequences used to nest a row two items deep
ANATOMIC_MODIFIER = 0x00082220
UNLISTED_PN = 0x00140104  # a PN the table does not list: emptied by VR inside kept sequences

RAW_ROWS: list[dict[str, Any]] = json.loads(
    resources.files("anonymization").joinpath("data", "ps3.15_table_e1_1.json").read_text("utf-8")
)
SINGLE_ROWS = [r for r in RAW_ROWS if not r["is_pattern"]]

POLICIES: dict[str, Policy] = {
    "basic": Policy(retain_longitudinal_modified_dates=False),
    "default": Policy(),
    "all-options": Policy(
        retain_safe_private=True,
        retain_uids=True,
        retain_device_identity=True,
        retain_institution_identity=True,
        retain_patient_characteristics=True,
        retain_longitudinal_full_dates=True,
        retain_longitudinal_modified_dates=False,
        clean_descriptors=True,
        clean_structured_content=True,
        clean_graphics=True,
        clean_pixel_data=True,
    ),
}
SPECIAL = {0x00100020, 0x00080050}  # Patient ID, Accession Number: keyed pseudonyms everywhere


def tag_of(row: dict[str, Any]) -> int:
    return int(row["tag"][1:5] + row["tag"][6:10], 16)


def vr_of(row: dict[str, Any]) -> str:
    """The row's VR; for the tags pydicom does not know, what the name says."""
    vr = row["vr"]
    if vr:
        return vr.split(" or ")[0]
    name = row["name"]
    if name.endswith("Sequence"):
        return "SQ"
    if "DateTime" in name:
        return "DT"
    if "UID" in name:
        return "UI"
    return "LO"


def planted(vr: str, tag: int) -> Any:
    """An identifying value of the VR (text mentions the patient, for the Clean options)."""
    if tag == 0x00080201:  # Timezone Offset From UTC: SH of the form "+HHMM" (any other text is not kept)
        return "+0100"
    return {
        "AE": "PHIAETITLE",
        "AS": "045Y",
        "CS": "PHICS",
        "DA": "20210315",
        "DT": "20210315101530",
        "TM": "101530",
        "DS": "12.5",
        "IS": "42",
        "PN": "Phiother^Person",
        "UI": f"1.2.826.0.1.3680043.8.498.{tag}",
        "UR": "http://phi.example/zelda",
        "OB": b"PHIBYTES",
        "OW": b"PHIBYTES",
        "UN": b"PHIBYTES",
        "US": 42,
        "SS": 42,
        "UL": 42,
        "SL": 42,
        "FL": 4.5,
        "FD": 4.5,
    }.get(vr, "Zelda Phiname 61")  # <= 16 characters: valid for SH too


def code_item() -> Dataset:
    item = Dataset()
    item.CodeValue = "T-D3000"
    item.CodingSchemeDesignator = "SRT"
    item.CodeMeaning = "Chest"
    item.add_new(UNLISTED_PN, "PN", "Phideep^Inner")
    item.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.777"
    return item


def base_ct() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.PatientID = PATIENT_ID
    ds.PatientName = PATIENT_NAME
    ds.Modality = "CT"
    return ds


def encode(ds: Dataset, implicit: bool) -> bytes:
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.preamble = b"\x00" * 128
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def roundtrip(ds: Dataset, implicit: bool) -> Dataset:
    return pydicom.dcmread(io.BytesIO(encode(ds, implicit)))


def written(ds: Dataset, source: bytes) -> Dataset:
    """``ds`` as the product writes it (raw elements copied from ``source``), read back."""
    meta = {
        "MediaStorageSOPClassUID": str(ds.SOPClassUID),
        "MediaStorageSOPInstanceUID": str(ds.SOPInstanceUID),
        "TransferSyntaxUID": str(ds.file_meta.TransferSyntaxUID),
        "ImplementationClassUID": "2.25.1",
        "ImplementationVersionName": "TEST",
    }
    return pydicom.dcmread(io.BytesIO(encode_file(ds, meta, source)))


def place(row: dict[str, Any], nested: bool) -> tuple[Dataset, int, Any, str]:
    """A CT with the row's attribute planted; returns (dataset, tag, value, vr)."""
    ds = base_ct()
    tag, vr = tag_of(row), vr_of(row)
    value: Any = Sequence([code_item()]) if vr == "SQ" else planted(vr, tag)
    if tag == 0x00100020:
        value = PATIENT_ID
    if nested:
        inner = Dataset()
        inner.add_new(tag, vr, value)
        middle = Dataset()
        middle.add_new(ANATOMIC_MODIFIER, "SQ", Sequence([inner]))
        ds.add_new(ANATOMIC_REGION, "SQ", Sequence([middle]))
    elif tag not in (0x00100010, 0x00100020):
        ds.add_new(tag, vr, value)
    return ds, tag, value, vr


def container(ds: Dataset, nested: bool) -> Dataset:
    return ds[ANATOMIC_REGION].value[0][ANATOMIC_MODIFIER].value[0] if nested else ds


def expected_action(row: dict[str, Any], policy: Policy, parent: int | None) -> str:
    """What Table E.1-1 says for this row under ``policy``, compound actions resolved."""
    action = row["basic"]
    for column in OPTION_COLUMNS:
        if getattr(policy, column) and row.get(column):
            action = row[column]
    return resolve(action, tag_of(row), parent)


def resolve(action: str, tag: int, parent: int | None) -> str:
    parts = action.split("/")
    if len(parts) == 1:
        return action
    if "U*" in parts:
        return "U*"
    need = load_iod_types().requirement(tag, CTImageStorage, parent)
    if need == "1":  # a dummy keeps a Type 1 attribute valid
        return "D" if "D" in parts else "Z"
    if need == "2":  # an empty value keeps a Type 2 attribute valid
        return "Z"
    return "X" if "X" in parts else "Z"  # optional: the weakest the row allows


def as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1").strip("\x00 ")
    if isinstance(value, (list, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def is_empty(elem: Any) -> bool:
    return elem.value in (None, "", b"") or (elem.VR == "SQ" and len(elem.value) == 0)


def check_item_cleaned(seq: Any) -> None:
    for item in seq:
        if UNLISTED_PN in item:
            assert is_empty(item[UNLISTED_PN]), "PN inside a kept sequence survived"


def where_of(row: dict[str, Any]) -> str:
    return f"{row['tag']} {row['name']}"


def check(
    row: dict[str, Any], policy: Policy, after: Dataset, tag: int, value: Any, vr: str, action: str,
    pseudo: Pseudonymizer, offset: int, implicit_unknown: bool,
) -> None:
    where = f"{row['tag']} {row['name']} ({row['basic']} -> {action})"
    present = tag in after
    if action == "C" and not cleanable(policy, tag, vr, after, value):
        # C where the value cannot be cleaned (opaque bytes, UN text, a free-text code):
        # the Basic Profile's own action applies.
        action = resolve(row["basic"], tag, None)
        where += f" (cannot clean: basic {action})"
    if tag in SPECIAL:
        assert present and as_text(after[tag].value) in (
            pseudo.patient_id(PATIENT_ID),
            pseudo.accession(as_text(value)),
        ), where
        return
    if action == "X":
        assert not present, where
        return
    assert present, where
    elem = after[tag]
    got = elem.value
    if action == "Z":
        assert is_empty(elem), where
    elif action == "K":
        if vr == "SQ":
            assert elem.VR == "SQ", where  # a UN-encoded sequence is parsed so it can be cleaned
            check_item_cleaned(got)
        else:
            assert as_text(got) == as_text(value), where
    elif action == "U":
        if policy.retain_uids:
            assert as_text(got) == as_text(value), where
        else:
            assert as_text(got) == pseudo.uid(as_text(value)), where
    elif action == "U*":
        assert vr == "SQ" and len(got) == 1, where
        assert got[0].ReferencedSOPInstanceUID == pseudo.uid("1.2.826.0.1.3680043.8.498.777"), where
    elif action == "D":
        assert not is_empty(elem), where
        if vr == "SQ":
            assert elem.VR == "SQ", where
            check_item_cleaned(got)
        elif vr == "UI":
            assert as_text(got) == pseudo.uid(as_text(value)), where
        elif vr in ("DA", "DT") and policy.retain_longitudinal_modified_dates:
            shifter = shift_da if vr == "DA" else shift_dt
            assert as_text(got) == shifter(as_text(value), offset), where
        else:
            assert as_text(got) != as_text(value), where
    elif action == "C":
        check_clean(row, policy, after, tag, value, vr, elem, pseudo, offset, implicit_unknown, where)
    else:
        raise AssertionError(f"unexpected action {action} for {where}")


def cleanable(policy: Policy, tag: int, vr: str, after: Dataset, value: Any) -> bool:
    """Whether C can keep this value: dates, times, sequences, AE titles and scrubbable text."""
    actual = after[tag].VR if tag in after else None
    if vr in ("DA", "DT", "TM") or tag == 0x00080201:
        return True
    if vr == "SQ" or actual == "SQ":
        return True
    return bool(actual in ("AE", "LO", "SH", "ST", "LT", "UT", "UC") and isinstance(value, str))


def check_clean(
    row: dict[str, Any], policy: Policy, after: Dataset, tag: int, value: Any, vr: str, elem: Any,
    pseudo: Pseudonymizer, offset: int, implicit_unknown: bool, where: str,
) -> None:
    got = elem.value
    actual_vr = elem.VR
    if vr in ("DA", "DT") and policy.retain_longitudinal_modified_dates:
        shifter = shift_da if vr == "DA" else shift_dt
        assert as_text(got) == shifter(as_text(value), offset), where
    elif vr in ("DA", "DT"):
        assert as_text(got) == as_text(value), where  # Full Dates: kept
    elif vr == "TM" or tag == 0x00080201:
        assert as_text(got) == as_text(value), where
    elif actual_vr == "SQ":
        check_item_cleaned(got)
    elif actual_vr == "AE":
        assert len(as_text(got)) == 16 and as_text(got) != as_text(value), where
    else:
        text = as_text(got).upper()
        assert text and not any(w in text for w in NAME_WORDS), where


@pytest.mark.parametrize("policy_name", list(POLICIES))
@pytest.mark.parametrize("row", SINGLE_ROWS, ids=[r["tag"] for r in SINGLE_ROWS])
def test_row_top_level_and_nested(row: dict[str, Any], policy_name: str) -> None:
    policy = POLICIES[policy_name]
    pseudo = Pseudonymizer(SECRET)
    engine = Deidentifier(pseudo, policy=policy)
    offset = pseudo.date_offset_days(PATIENT_ID)
    tag = tag_of(row)
    for nested in (False, True):
        for implicit in (False, True):
            if tag >> 16 in (0x0000, 0x0002) and implicit:
                continue  # command/meta groups are not written into a data set's body
            ds, tag, value, vr = place(row, nested)
            source = encode(ds, implicit) if tag >> 16 not in (0x0000, 0x0002) else None
            ds = pydicom.dcmread(io.BytesIO(source)) if source is not None else ds
            implicit_unknown = implicit and not dictionary_has_tag(tag)
            # as the worker calls it: raw elements take the engine's fast paths
            engine.deidentify(
                ds, original=(lambda source=source: pydicom.dcmread(io.BytesIO(source))) if source else None
            )
            parent = ANATOMIC_MODIFIER if nested else None
            action = expected_action(row, policy, parent)
            # as cleaned in memory, and as written to the output file and read back
            for result in (ds, written(ds, source)) if source is not None else (ds,):
                holder = container(result, nested)
                if implicit_unknown and vr == "SQ" and tag in holder and holder[tag].VR == "UN":
                    # implicit VR again: a sequence pydicom does not know reads back as UN
                    assert _parse_un_sequence(holder[tag]), where_of(row)
                if tag == 0x00100010 and not nested:
                    assert str(result.PatientName) == pseudo.patient_id(PATIENT_ID)
                    continue
                check(row, policy, container(result, nested), tag, value, vr, action, pseudo, offset,
                      implicit_unknown)


def test_table_is_the_2026c_table() -> None:
    assert len(RAW_ROWS) == 656
    patterns = [r["tag"] for r in RAW_ROWS if r["is_pattern"]]
    assert patterns == ["(50XX,XXXX)", "(60XX,3000)", "(60XX,4000)", "(gggg,eeee) where gggg is odd"]
    assert sum(1 for r in SINGLE_ROWS if not dictionary_has_tag(tag_of(r))) == 25


@pytest.mark.parametrize("policy_name", list(POLICIES))
@pytest.mark.parametrize("group", [0x5000, 0x5002, 0x501E, 0x50FE])
def test_curve_pattern_row(group: int, policy_name: str) -> None:
    ds = base_ct()
    ds.add_new((group << 16) | 0x0005, "US", 1)
    ds.add_new((group << 16) | 0x3000, "OB", b"PHICURVE")
    ds.add_new((group << 16) | 0x2500, "LO", "PHICURVE Zelda")
    item = Dataset()
    item.add_new((group << 16) | 0x2500, "LO", "PHICURVE deep")
    ds.add_new(ANATOMIC_REGION, "SQ", Sequence([item]))
    Deidentifier(Pseudonymizer(SECRET), policy=POLICIES[policy_name]).deidentify(ds)
    assert not any(e.tag.group == group for e in ds.iterall())


@pytest.mark.parametrize("policy_name", list(POLICIES))
@pytest.mark.parametrize("group", [0x6000, 0x6002, 0x601E])
def test_overlay_pattern_rows(group: int, policy_name: str) -> None:
    """Overlay Data and Comments are removed (even under Clean Graphics: bitmaps cannot be
    cleaned), and with them the rest of the overlay group, at any depth."""
    ds = roundtrip(base_ct(), implicit=False)
    for target in (ds, None):
        holder = Dataset() if target is None else target
        holder.add_new((group << 16) | 0x0010, "US", 8)
        holder.add_new((group << 16) | 0x0011, "US", 8)
        holder.add_new((group << 16) | 0x3000, "OW", b"\xff\x00" * 4)
        holder.add_new((group << 16) | 0x4000, "LT", "PHIOVERLAY Zelda")
        if target is None:
            ds.add_new(ANATOMIC_REGION, "SQ", Sequence([holder]))
    Deidentifier(Pseudonymizer(SECRET), policy=POLICIES[policy_name]).deidentify(ds)
    assert not any(e.tag.group == group for e in ds.iterall())


@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_private_row(policy_name: str) -> None:
    """Private attributes go, with their creators, at any depth; under Retain Safe Private
    only those the safe list names for their creator stay."""
    policy = POLICIES[policy_name]
    ds = base_ct()
    safe_block = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
    safe_block.add_new(0x04, "DS", "0.5")  # Cell Spacing: K in the safe list
    safe_block.add_new(0x02, "SL", 7)  # listed, but not K
    safe_block.add_new(0x77, "LO", "PHIPRIVATE Zelda")  # not listed at all
    other = ds.private_block(0x0019, "ACME_UNKNOWN", create=True)
    other.add_new(0x04, "DS", "0.5")  # same element number, unknown creator
    nested = Dataset()
    nested.private_block(0x0029, "PHIVENDOR", create=True).add_new(0x01, "LO", "PHIPRIVATE deep")
    ds.add_new(ANATOMIC_REGION, "SQ", Sequence([nested]))
    ds = roundtrip(ds, implicit=False)
    Deidentifier(Pseudonymizer(SECRET), policy=policy).deidentify(ds)
    private = {int(e.tag) for e in ds.iterall() if e.tag.is_private}
    if policy.retain_safe_private:
        creator = next(int(e.tag) for e in ds if e.tag.is_private and e.value == "GEMS_ACQU_01")
        kept = {(t & 0xFFFF) & 0xFF for t in private if (t & 0xFFFF) >= 0x1000}
        assert kept == {0x04}
        assert private == {creator, (0x0019 << 16) | ((creator & 0xFF) << 8) | 0x04}
    else:
        assert not private


def test_uids_in_references_consistent_across_files() -> None:
    """X/Z/U*: a derived image's reference to its source is the source's new SOP Instance UID."""
    pseudo = Pseudonymizer(SECRET)
    engine = Deidentifier(pseudo)
    source, derived = base_ct(), base_ct()
    derived.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    refs = [Dataset(), Dataset()]
    for ref in refs:
        ref.ReferencedSOPClassUID = CTImageStorage
        ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    derived.SourceImageSequence = Sequence([refs[0]])
    derived.ReferencedImageSequence = Sequence([refs[1]])
    engine.deidentify(source)
    engine.deidentify(derived)
    for seq in (derived.SourceImageSequence, derived.ReferencedImageSequence):
        assert seq[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert seq[0].ReferencedSOPClassUID == CTImageStorage


def test_dates_shift_by_patient_offset_only() -> None:
    pseudo = Pseudonymizer(SECRET)
    ds = base_ct()
    ds.StudyDate = "20210315"
    Deidentifier(pseudo).deidentify(ds)
    expected = dt.date(2021, 3, 15) + dt.timedelta(days=pseudo.date_offset_days(PATIENT_ID))
    assert ds.StudyDate == expected.strftime("%Y%m%d")


def _instance_uids(ds: Dataset, prefix: str = "") -> dict[str, str]:
    """Every UI value that is not a registered UID (a class, transfer syntax...), by its path in the data set."""
    from pydicom._uid_dict import UID_dictionary

    out: dict[str, str] = {}
    for elem in ds:
        path = f"{prefix}{elem.tag:08X}"
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                out.update(_instance_uids(item, f"{path}[{i}]."))
        elif elem.VR == "UI" and elem.value and str(elem.value) not in UID_dictionary:
            out[path] = str(elem.value)
    return out


def _uid_ct() -> Dataset:
    ds = base_ct()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.10"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.11"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.12"
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.13"
    ds.ReferencedImageSequence = Sequence([ref])
    return ds


@pytest.mark.parametrize("policy_name", ["basic", "default"])
def test_every_uid_is_replaced_by_one_keyed_with_the_site_secret(policy_name: str) -> None:
    """Replaced UIDs are HMACs under the site's key: another key gives others, the same key the same ones.

    An unkeyed hash of the UID would pass every row test above (they compare with the engine's own
    Pseudonymizer); only a second key shows that anyone could recompute the mapping without the secret.
    """
    policy = POLICIES[policy_name]
    before = _instance_uids(_uid_ct())
    outputs = []
    for secret in (SECRET, SECRET, b"\x06" * 32):
        ds = _uid_ct()
        Deidentifier(Pseudonymizer(secret), policy=policy).deidentify(ds)
        outputs.append(_instance_uids(ds))
    same_key, again, other_key = outputs
    assert len(same_key) >= 5 and set(same_key) <= set(before)
    for path, new in same_key.items():
        assert new != before[path], f"{path} kept its UID"
        assert new.startswith("2.25."), path
        assert again[path] == new, f"{path}: the same key must give the same UID (linkage across files)"
        assert other_key[path] != new, f"{path}: the UID does not depend on the site key"
