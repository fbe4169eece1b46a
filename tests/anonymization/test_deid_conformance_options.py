"""Compound actions per IOD, each PS3.15 option, the VR rules, and the marks written.

Complements :mod:`tests.anonymization.test_deid_conformance` (which walks every row): here each
option is shown changing what it should and nothing else, the compound actions are
shown to follow the IOD's Types, and the De-identification Method Code Sequence is
shown to list exactly the profile and options applied.
"""

from __future__ import annotations

import itertools

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComprehensiveSRStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    EnhancedCTImageStorage,
    RTPlanStorage,
)

from anonymization.engine import Deidentifier
from anonymization.iod import load_iod_types
from anonymization.policy import OTHER_OPTIONS, TABLE_OPTIONS, Policy
from anonymization.pseudonyms import Pseudonymizer
from anonymization.table import resolve_compound
from tests.dicom_factory import make_ct

PYDICOM_INPUT_WARNINGS = [  # pydicom reading deliberately odd or broken inputs: expected
    pytest.mark.filterwarnings("ignore:VR lookup failed:UserWarning"),
    pytest.mark.filterwarnings("ignore:The value length:UserWarning"),
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
]
pytestmark = PYDICOM_INPUT_WARNINGS

SECRET = b"\x06" * 32


def deid(ds: Dataset, **options: bool) -> Dataset:
    Deidentifier(Pseudonymizer(SECRET), policy=Policy(**options)).deidentify(ds)
    return ds


def minimal(sop_class: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.10"
    ds.PatientID = "PHIPID-1"
    return ds


# ---- compound actions follow the IOD ---------------------------------------------------
@pytest.mark.parametrize(
    ("tag", "sop_class", "parent", "expected"),
    [
        (0x00080023, CTImageStorage, None, "Z"),  # Content Date Z/D: 2C in General Image
        (0x00080023, ComprehensiveSRStorage, None, "D"),  # Type 1 in SR Document General
        (0x00080023, EnhancedCTImageStorage, None, "D"),  # Type 1 in Multi-frame Functional Groups
        (0x00181000, CTImageStorage, None, "X"),  # Device Serial Number X/Z/D: 3 in General Equipment
        (0x00181000, EnhancedCTImageStorage, None, "D"),  # 1 in Enhanced General Equipment
        (0x00081111, CTImageStorage, None, "X"),  # Referenced PPS Sequence X/Z/D: 3 in General Series
        (0x00081111, ComprehensiveSRStorage, None, "Z"),  # 2 in SR Document Series
        (0x00081111, DigitalXRayImageStorageForPresentation, None, "D"),  # 1C in DX Series
        (0x0008002A, CTImageStorage, None, "X"),  # Acquisition DateTime X/Z/D: 3
        (0x0008002A, EnhancedCTImageStorage, None, "D"),  # 1C in Enhanced CT Image
        (0x300A0006, RTPlanStorage, None, "Z"),  # RT Plan Date X/D: Type 2 -> empty keeps it valid
        (0x00081070, RTPlanStorage, None, "Z"),  # Operators' Name X/Z/D: 2 in RT Series
        (0x00081070, CTImageStorage, None, "X"),
        (0x00400555, DigitalXRayImageStorageForPresentation, None, "Z"),  # Acquisition Context X/Z: 2
        (0x00080080, CTImageStorage, 0x00081072, "D"),  # Institution Name 1C in a Person Identification item
        (0x00080080, CTImageStorage, 0x0018A001, "X"),  # 3 in a Contributing Equipment item
        (0x00080080, ComprehensiveSRStorage, 0x0040A078, "Z"),  # 2 in an Author Observer item
        (0x00081140, CTImageStorage, None, "U*"),  # X/Z/U*: always kept, UIDs replaced
        (0x00082112, CTImageStorage, 0x00082218, "U*"),
        (0x00100020, CTImageStorage, None, "Z"),  # Patient ID Z/D: 2 (the engine writes a pseudonym)
    ],
)
def test_compound_action_follows_iod_type(tag: int, sop_class: str, parent: int | None, expected: str) -> None:
    action = next(r.basic for r in __import__("anonymization.table", fromlist=["load_rows"]).load_rows()
                  if not r.is_pattern and r.value == tag)
    assert "/" in action
    assert resolve_compound(action, tag, sop_class, parent) == expected


def test_iod_table_covers_the_iods_we_meet() -> None:
    types = load_iod_types()
    for uid, name in [
        ("1.2.840.10008.5.1.4.1.1.2", "CTImage"),
        ("1.2.840.10008.5.1.4.1.1.2.1", "EnhancedCTImage"),
        ("1.2.840.10008.5.1.4.1.1.4", "MRImage"),
        ("1.2.840.10008.5.1.4.1.1.4.1", "EnhancedMRImage"),
        ("1.2.840.10008.5.1.4.1.1.1", "CRImage"),
        ("1.2.840.10008.5.1.4.1.1.1.1", "DXImageForPresentation"),
        ("1.2.840.10008.5.1.4.1.1.6.1", "USImage"),
        ("1.2.840.10008.5.1.4.1.1.3.1", "USMultiFrameImage"),
        ("1.2.840.10008.5.1.4.1.1.7", "SCImage"),
        ("1.2.840.10008.5.1.4.1.1.88.11", "BasicTextSR"),
        ("1.2.840.10008.5.1.4.1.1.88.22", "EnhancedSR"),
        ("1.2.840.10008.5.1.4.1.1.88.33", "ComprehensiveSR"),
        ("1.2.840.10008.5.1.4.1.1.88.59", "KeyObjectSelectionDocument"),
    ]:
        assert types.iod_name(uid) == name, uid
    assert len(types.by_sop_class) >= 100


def test_compound_resolution_in_a_real_sr_and_ct() -> None:
    ct, sr = minimal(CTImageStorage), minimal(ComprehensiveSRStorage)
    for ds in (ct, sr):
        ds.ContentDate = "20210315"
        ds.ContentTime = "101500"
        ds.ReferencedPerformedProcedureStepSequence = Sequence([Dataset()])
        ds.DeviceSerialNumber = "PHISERIAL"
    deid(ct, retain_longitudinal_modified_dates=False)
    deid(sr, retain_longitudinal_modified_dates=False)
    assert ct.ContentDate in ("", None) and sr.ContentDate == "19000101"  # Z in CT, D in SR
    assert "ReferencedPerformedProcedureStepSequence" not in ct  # X
    assert len(sr.ReferencedPerformedProcedureStepSequence) == 0  # Z: Type 2 in SR
    assert "DeviceSerialNumber" not in ct and "DeviceSerialNumber" not in sr


# ---- each option ---------------------------------------------------------------------------
def test_retain_uids() -> None:
    original = make_ct()
    kept = deid(make_ct(), retain_uids=True)
    replaced = deid(make_ct())
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert kept[kw].value == original[kw].value
        assert replaced[kw].value != original[kw].value
    deep = kept.AnatomicRegionSequence[0].DerivationCodeSequence[0]
    assert deep[0x00081155].value == original.AnatomicRegionSequence[0].DerivationCodeSequence[0][0x00081155].value


def test_retain_device_identity() -> None:
    ds = make_ct()
    ds.DeviceSerialNumber = "SN-PHI-1"
    ds.StationAETitle = "CTSCANNER1"
    kept = deid(ds, retain_device_identity=True)
    assert kept.StationName == "PHISTATION1" and kept.DeviceSerialNumber == "SN-PHI-1"
    assert kept.StationAETitle not in ("CTSCANNER1", "", None) and len(kept.StationAETitle) == 16  # C: keyed
    ds = make_ct()
    ds.DeviceSerialNumber = "SN-PHI-1"
    removed = deid(ds)
    assert "StationName" not in removed and "DeviceSerialNumber" not in removed


def test_retain_institution_identity() -> None:
    kept = deid(make_ct(), retain_institution_identity=True)
    assert kept.InstitutionName == "PHIINST Saint Mercy Hospital"
    assert kept.InstitutionAddress == "PHIINSTADDR 1 Hospital Road"
    removed = deid(make_ct())
    assert "InstitutionName" not in removed and "InstitutionAddress" not in removed


def test_retain_patient_characteristics() -> None:
    ds = make_ct()
    ds.PatientWeight = "71"
    ds.Allergies = "penicillin, reported by Zelda Phiname0 on 2020-01-02"
    kept = deid(ds, retain_patient_characteristics=True)
    assert (kept.PatientSex, kept.PatientAge, kept.PatientWeight) == ("F", "059Y", "71")
    assert kept.Allergies.startswith("penicillin") and "Zelda" not in kept.Allergies and "2020" not in kept.Allergies
    ds = make_ct()
    ds.PatientWeight = "71"
    removed = deid(ds)
    assert removed.PatientSex in ("", None)  # Z
    assert "PatientAge" not in removed and "PatientWeight" not in removed


@pytest.mark.parametrize(
    ("options", "study_date", "birth", "marker"),
    [
        ({}, "shifted", "", "MODIFIED"),
        (
            {"retain_longitudinal_modified_dates": False, "retain_longitudinal_full_dates": True},
            "20210315",
            "",
            "UNMODIFIED",
        ),
        ({"retain_longitudinal_modified_dates": False}, "", "", "REMOVED"),
    ],
)
def test_longitudinal_temporal_options(options: dict[str, bool], study_date: str, birth: str, marker: str) -> None:
    ds = deid(make_ct(), **options)
    deep = ds.AnatomicRegionSequence[0].DerivationCodeSequence[0]
    deep_date = deep[0x00080021].value if 0x00080021 in deep else ""  # Series Date (X/D, C) two items deep
    if study_date == "shifted":
        assert ds.StudyDate not in ("20210315", "", None) and ds.StudyDate < "20210315"
        assert deep_date == ds.StudyDate  # same patient, same offset, at any depth
        assert ds.StudyTime == "101500"
    elif study_date:
        assert ds.StudyDate == study_date and deep_date == study_date
    else:
        assert ds.StudyDate in ("", None) and deep_date in ("", None)
        assert "AcquisitionDateTime" not in ds  # X/Z/D, Type 3 in CT
        assert "SeriesDate" not in ds  # X/D, Type 3
    assert ds.PatientBirthDate in (birth, None)  # birth date: Z under every option
    assert ds.LongitudinalTemporalInformationModified == marker


def test_clean_descriptors() -> None:
    ds = make_ct()
    ds.StudyDescription = "CT chest Zelda Phiname0 PHIPID-837261-0 seen 15/03/2021"
    kept = deid(ds, clean_descriptors=True)
    assert kept.StudyDescription.startswith("CT chest") and "Zelda" not in kept.StudyDescription
    assert "837261" not in kept.StudyDescription and "2021" not in kept.StudyDescription
    assert "ImageComments" in kept and "Zelda" not in str(kept.ImageComments)
    removed = deid(make_ct())
    assert "StudyDescription" not in removed and "ProtocolName" not in removed


def _sr_with_content() -> Dataset:
    ds = minimal(ComprehensiveSRStorage)
    ds.PatientName = "Phiname^Zelda"
    ds.ContentDate = "20210315"
    ds.ContentTime = "101500"
    text = Dataset()
    text.RelationshipType = "CONTAINS"
    text.ValueType = "TEXT"
    text.TextValue = "Zelda Phiname has a nodule"
    person = Dataset()
    person.RelationshipType = "HAS OBS CONTEXT"
    person.ValueType = "PNAME"
    person.PersonName = "Phidoc^Reader"
    ds.ContentSequence = Sequence([text, person])
    context = Dataset()
    context.ValueType = "TEXT"
    context.TextValue = "acquired by Phioper"
    ds.AcquisitionContextSequence = Sequence([context])
    return ds


def test_clean_structured_content() -> None:
    kept = deid(_sr_with_content(), clean_structured_content=True)
    assert len(kept.ContentSequence) == 2 and len(kept.AcquisitionContextSequence) == 1
    assert kept.ContentSequence[0].TextValue == "* has a nodule"  # 1C in a TEXT item: cleaned
    assert str(kept.ContentSequence[1].PersonName) == "ANONYMIZED"  # D
    basic = deid(_sr_with_content())
    assert len(basic.ContentSequence) == 2  # D: the content tree is Type 1 in SR, kept and cleaned
    assert basic.ContentSequence[0].TextValue == "ANONYMIZED"  # no cleaning option: a dummy
    assert "AcquisitionContextSequence" not in basic  # X/Z, not in the SR IOD


def test_clean_graphics() -> None:
    ds = make_ct()
    text = Dataset()
    text.UnformattedTextValue = "Zelda Phiname0 lesion"
    annotation = Dataset()
    annotation.GraphicLayer = "LAYER1"
    annotation.TextObjectSequence = Sequence([text])
    ds.GraphicAnnotationSequence = Sequence([annotation])
    kept = deid(ds, clean_graphics=True, clean_descriptors=True)
    value = kept.GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue
    assert value.startswith("*") and "lesion" in value and "Zelda" not in value
    assert not any(0x6000 <= e.tag.group <= 0x601E for e in kept)  # overlay bitmaps: still removed


def test_clean_pixel_data_is_carried_and_listed() -> None:
    policy = Policy(clean_pixel_data=True)
    assert policy.clean_pixel_data and "clean_pixel_data" in policy.applied_options
    ds = deid(make_ct(), clean_pixel_data=True)
    assert "113101" in {i.CodeValue for i in ds.DeidentificationMethodCodeSequence}


def test_retain_safe_private_matches_creator_and_element() -> None:
    ds = make_ct()
    block = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
    block.add_new(0x04, "DS", "0.5")  # K
    block.add_new(0x0F, "DS", "1.0")  # K
    block.add_new(0x02, "SL", 5)  # not K
    kept = deid(ds, retain_safe_private=True)
    private = {int(e.tag) for e in kept.iterall() if e.tag.is_private}
    assert private == {0x00190010, 0x00191004, 0x0019100F}
    assert not any("PHIPRIVATE" in str(e.value) for e in kept.iterall() if e.tag.is_private)


# ---- the marks: exactly the profile and options applied ---------------------------------
OPTION_SUBSETS = [
    subset
    for n in (0, 1, 2, 3)
    for subset in itertools.combinations(TABLE_OPTIONS + OTHER_OPTIONS, n)
    if not {"retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"} <= set(subset)
][::7]


@pytest.mark.parametrize("subset", OPTION_SUBSETS, ids=lambda s: "+".join(s) or "basic")
def test_method_code_sequence_lists_exactly_what_was_applied(subset: tuple[str, ...]) -> None:
    policy = Policy.from_options(subset)
    ds = make_ct()
    Deidentifier(Pseudonymizer(SECRET), policy=policy).deidentify(ds)
    codes = [(i.CodeValue, i.CodingSchemeDesignator, i.CodeMeaning) for i in ds.DeidentificationMethodCodeSequence]
    assert codes[0] == ("113100", "DCM", "Basic Application Confidentiality Profile")
    expected = {c.value for c in policy.method_codes()[1:]}
    assert {c[0] for c in codes[1:]} == expected and len(codes) == len(subset) + 1
    assert ds.PatientIdentityRemoved == "YES"
    marker = "MODIFIED" if "retain_longitudinal_modified_dates" in subset else (
        "UNMODIFIED" if "retain_longitudinal_full_dates" in subset else "REMOVED")
    assert ds.LongitudinalTemporalInformationModified == marker
    method = ds["DeidentificationMethod"]
    values = [method.value] if method.VM == 1 else list(method.value)
    assert len(values) == len(subset) + 1
    assert all(len(v) <= 64 for v in values)


# ---- what the table does not list: by VR ---------------------------------------------------
def test_unlisted_by_vr_at_any_depth() -> None:
    ds = make_ct()
    item = Dataset()
    item.CodeValue = "X1"
    item.CodingSchemeDesignator = "99PHI"
    item.CodeMeaning = "Meaning"
    item.add_new(0x00140104, "PN", "Phireviewer^Zelda")  # unlisted PN
    item.add_new(0x00189074, "DT", "20210315101500")  # Frame Acquisition DateTime (D) - listed
    item.add_new(0x00189151, "DT", "20210316")
    item.add_new(0x0040A124, "UI", "1.2.826.0.1.3680043.8.498.55")  # UID (U)
    item.add_new(0x00081150, "UI", "1.2.840.10008.5.1.4.1.1.2")  # well-known class: kept
    item.add_new(0x00209453, "LO", "PHI frame label Zelda")  # unlisted LO: removed in unlisted seq
    item.add_new(0x00283003, "LO", "HU")  # LUT Explanation: structural, kept
    item.add_new(0x0040A160, "UT", "Zelda said")  # Text Value: free text removed
    inner = Dataset()
    inner.add_new(0x00140104, "PN", "Phideeper^Zelda")
    inner.add_new(0x00181200, "DA", "20200101")  # listed date, shifted
    item.add_new(0x00082228, "SQ", Sequence([inner]))
    ds.add_new(0x00089215, "SQ", Sequence([item]))  # Derivation Code Sequence: unlisted
    out = deid(ds)
    got = out[0x00089215].value[0]
    assert got[0x00140104].value in ("", None)
    assert got.CodeValue == "X1" and got.CodeMeaning == "Meaning" and got[0x00283003].value == "HU"
    assert 0x00209453 not in got and 0x0040A160 not in got
    assert got[0x0040A124].value.startswith("2.25.") and got[0x00081150].value == "1.2.840.10008.5.1.4.1.1.2"
    assert got[0x00189151].value < "20210316"
    deeper = got[0x00082228].value[0]
    assert deeper[0x00140104].value in ("", None) and deeper[0x00181200].value < "20200101"


def test_keep_text_in_unlisted_sequences_option() -> None:
    ds = make_ct()
    item = Dataset()
    item.add_new(0x00209453, "LO", "arterial phase Zelda")
    ds.add_new(0x00089215, "SQ", Sequence([item]))
    out = deid(ds, keep_text_in_unlisted_sequences=True)
    assert out[0x00089215].value[0][0x00209453].value == "arterial phase *"


def test_unknown_public_tag_read_as_un_is_removed() -> None:
    import io

    from pydicom.uid import ImplicitVRLittleEndian

    ds = make_ct()
    ds.add_new(0x0011FFFE, "LO", "x")  # private: removed anyway
    ds.add_new(0x00199999 & 0xFFFEFFFF, "LO", "y")
    ds.add_new(0x00420099, "LO", "PHI unknown attribute")  # even group, not in any dictionary
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    back = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    assert back[0x00420099].VR == "UN"
    out = deid(back)
    assert 0x00420099 not in out
