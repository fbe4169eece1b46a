"""Applies the resolved PS3.15 profile to a pydicom Dataset, recursively.

Driven by tag number from :mod:`anonymization.table`; what the table does not
list is handled by VR (person names emptied, dates shifted, instance UIDs
replaced, unlisted free text emptied), because the table is not exhaustive.
Returns counts of what was done so the audit trail can say it without values.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from pydicom._uid_dict import UID_dictionary
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag, Tag

from anonymization.dates import shift_da, shift_dt
from anonymization.pseudonyms import Pseudonymizer
from anonymization.table import (
    CLEAN,
    DUMMY,
    EMPTY,
    KEEP,
    KEEP_REPLACING_UIDS,
    REMOVE,
    RETAIN_LONGITUDINAL_MODIFIED_DATES,
    UID,
    Profile,
    default_profile,
)

MEDFED_VERSION = "0.1.0"

PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010
ACCESSION_NUMBER = 0x00080050
TIMEZONE_OFFSET_FROM_UTC = 0x00080201  # kept: a whole-day shift leaves the offset true
PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})

STANDARD_UID_ROOT = "1.2.840.10008."
# Attributes whose UIDs name a *kind* of thing (class, syntax, coding scheme),
# never an instance: kept even when the UID is private to a vendor.
TYPE_UID_TAGS = frozenset(
    {
        0x00000002, 0x00000003,  # Affected/Requested SOP Class UID
        0x00020002, 0x00020010,  # Media Storage SOP Class UID, Transfer Syntax UID
        0x00041510, 0x00041512,  # Referenced SOP Class / Transfer Syntax UID in File
        0x00080016, 0x0008001A, 0x0008001B,  # SOP Class, Related General / Original Specialized SOP Class
        0x0008010C, 0x00080117, 0x00080118,  # Coding Scheme, Context, Mapping Resource UID
        0x00081150, 0x0008115A,  # Referenced SOP Class UID, SOP Classes Supported
    }
)

FREE_TEXT_VRS = frozenset({"ST", "LT", "UT"})
BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
NUMBER_VRS = frozenset({"SL", "SS", "SV", "UL", "US", "UV", "FL", "FD"})

DUMMY_TEXT: dict[str, Any] = {
    "AE": "ANONYMIZED",
    "AS": "000D",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DS": "0",
    "DT": "19000101000000",
    "IS": "0",
    "LO": "ANONYMIZED",
    "LT": "ANONYMIZED",
    "PN": "ANONYMIZED",
    "SH": "ANONYMIZED",
    "ST": "ANONYMIZED",
    "TM": "000000",
    "UC": "ANONYMIZED",
    "UR": "urn:medfed:anonymized",
    "UT": "ANONYMIZED",
}

PROFILE_TEXT = [
    f"medfed {MEDFED_VERSION}: PS3.15 Basic Application Confidentiality Profile",
    "Retain Longitudinal Temporal Information Modified Dates Option",
]


def is_well_known_uid(uid: str) -> bool:
    """True for UIDs defined by the standard (SOP classes, syntaxes, frames, coding schemes)."""
    uid = uid.strip().rstrip("\x00")
    return uid in UID_dictionary or uid.startswith(STANDARD_UID_ROOT)


@dataclass
class _Context:
    offset_days: int
    counts: Counter[str]


class Deidentifier:
    """De-identifies datasets in place under one profile and one site secret."""

    def __init__(self, pseudonymizer: Pseudonymizer, profile: Profile | None = None) -> None:
        self.pseudo = pseudonymizer
        self.profile = profile or default_profile()

    # ---- entry point ------------------------------------------------------------
    def deidentify(self, ds: Dataset) -> Counter[str]:
        """Clean ``ds`` (not its file meta) and mark it de-identified; return action counts."""
        original_pid = original_patient_id(ds)
        ctx = _Context(self.pseudo.date_offset_days(original_pid), Counter())
        self._clean(ds, ctx, depth=0)
        patient = self.pseudo.patient_id(original_pid)
        ds.PatientID = patient
        ds.PatientName = patient
        self._mark(ds)
        return ctx.counts

    def patient_pseudonym(self, ds: Dataset) -> str:
        """The pseudonym the top-level PatientID of an *original* dataset becomes."""
        return self.pseudo.patient_id(original_patient_id(ds))

    # ---- recursion --------------------------------------------------------------
    def _clean(self, ds: Dataset, ctx: _Context, depth: int) -> None:
        for tag in list(ds.keys()):
            self._clean_element(ds, BaseTag(tag), ctx, depth)
        self._drop_orphan_overlays(ds, ctx)

    def _drop_orphan_overlays(self, ds: Dataset, ctx: _Context) -> None:
        """An overlay group whose Overlay Data (Type 1) was removed is removed whole.

        Its header alone would make the Overlay Plane module invalid, and overlays
        stored in unused pixel bits (no 60xx,3000) are graphics we cannot inspect.
        """
        if self.profile.action_for(0x60003000) != REMOVE:
            return
        for tag in list(ds.keys()):
            group = tag >> 16
            if 0x6000 <= group <= 0x601E and group % 2 == 0:
                del ds[tag]
                ctx.counts["overlay"] += 1

    def _clean_element(self, ds: Dataset, tag: BaseTag, ctx: _Context, depth: int) -> None:
        counts = ctx.counts
        if tag.is_private:
            if self.profile.private_action == REMOVE:
                del ds[tag]
                counts[REMOVE] += 1
                counts["private"] += 1
                return
        if tag.element == 0x0000:  # group length: stale once anything changed
            del ds[tag]
            return
        action = self.profile.action_for(int(tag))
        if action == REMOVE:
            del ds[tag]
            counts[REMOVE] += 1
            return

        elem = ds[tag]  # converts a raw element; only for elements we keep in some form
        vr = elem.VR

        # Identifiers that become keyed pseudonyms rather than empty values, so
        # that images of a patient/study stay linkable and labels can be joined.
        if tag == PATIENT_ID:
            elem.value = self.pseudo.patient_id(_as_text(elem))
            counts["pseudonym"] += 1
            return
        if tag == ACCESSION_NUMBER:
            text = _as_text(elem)
            elem.value = self.pseudo.accession(text) if text else ""
            counts["pseudonym"] += 1
            return

        if action is None:
            self._by_vr(elem, ctx, depth)
            return
        if action == EMPTY:
            _empty(elem)
            counts[EMPTY] += 1
        elif action == DUMMY:
            if vr == "SQ":
                self._recurse(elem, ctx, depth)
            elif vr == "UI":
                self._replace_uids(elem, ctx)
            elif vr in ("DA", "DT"):
                self._shift(elem, ctx)
            else:
                _dummy(elem)
            counts[DUMMY] += 1
        elif action == UID:
            self._replace_uids(elem, ctx)
            counts[UID] += 1
        elif action == KEEP_REPLACING_UIDS:
            if vr == "SQ":
                self._recurse(elem, ctx, depth)
            elif vr == "UI":
                self._replace_uids(elem, ctx)
            else:
                _empty(elem)
            counts[KEEP_REPLACING_UIDS] += 1
        elif action == KEEP:
            if vr == "SQ":
                self._recurse(elem, ctx, depth)
            counts[KEEP] += 1
        elif action == CLEAN:
            self._clean_value(ds, tag, elem, ctx, depth)
        else:  # an action this engine does not know: fail closed
            del ds[tag]
            counts[REMOVE] += 1

    def _by_vr(self, elem: DataElement, ctx: _Context, depth: int) -> None:
        """Rules for attributes the table does not list."""
        vr = elem.VR
        if vr == "SQ":
            self._recurse(elem, ctx, depth)
        elif vr == "PN":
            if not _is_empty(elem):
                _empty(elem)
                ctx.counts["vr_pn"] += 1
        elif vr in ("DA", "DT"):
            if self._shift(elem, ctx):
                ctx.counts["vr_date"] += 1
        elif vr == "UI":
            if self._replace_uids(elem, ctx):
                ctx.counts["vr_uid"] += 1
        elif vr in FREE_TEXT_VRS:
            if not _is_empty(elem):
                _empty(elem)
                ctx.counts["vr_text"] += 1

    def _recurse(self, elem: DataElement, ctx: _Context, depth: int) -> None:
        if elem.VR != "SQ" or elem.value is None:
            return
        for item in elem.value:
            self._clean(item, ctx, depth + 1)

    def _clean_value(
        self, ds: Dataset, tag: BaseTag, elem: DataElement, ctx: _Context, depth: int
    ) -> None:
        """C under the Modified Dates option: shift dates, keep times (whole-day shift).

        Anything else marked C (an opaque OB timestamp, or text under an option this
        engine cannot clean) falls back to the Basic Profile's action.
        """
        vr = elem.VR
        if vr in ("DA", "DT"):
            self._shift(elem, ctx)
            ctx.counts[CLEAN] += 1
        elif vr == "TM" or int(tag) == TIMEZONE_OFFSET_FROM_UTC:
            ctx.counts[CLEAN] += 1
        elif vr == "SQ":
            self._recurse(elem, ctx, depth)
            ctx.counts[CLEAN] += 1
        else:
            basic = self.profile.basic_action_for(int(tag)) or REMOVE
            if basic == DUMMY:
                _dummy(elem)
                ctx.counts[DUMMY] += 1
            elif basic == EMPTY:
                _empty(elem)
                ctx.counts[EMPTY] += 1
            else:
                del ds[tag]
                ctx.counts[REMOVE] += 1

    # ---- value rewriting --------------------------------------------------------
    def _shift(self, elem: DataElement, ctx: _Context) -> bool:
        """Shift DA/DT values by the patient's offset; unparsable dates are emptied."""
        shifter: Callable[[str, int], str | None] = shift_da if elem.VR == "DA" else shift_dt
        values = _values(elem)
        if not values:
            return False
        shifted = [shifter(v, ctx.offset_days) for v in values]
        if any(s is None for s in shifted):
            _empty(elem)
            ctx.counts["unparsable_date"] += 1
            return True
        _set_values(elem, [s for s in shifted if s is not None])
        ctx.counts["shifted"] += 1
        return True

    def _replace_uids(self, elem: DataElement, ctx: _Context) -> bool:
        """Replace instance UIDs with 2.25 pseudonyms; keep well-known and type UIDs."""
        if int(elem.tag) in TYPE_UID_TAGS:
            return False
        values = _values(elem)
        if not values:
            return False
        out = []
        changed = False
        for v in values:
            v = v.strip().rstrip("\x00")
            if v and not is_well_known_uid(v):
                out.append(self.pseudo.uid(v))
                changed = True
            else:
                out.append(v)
        if changed:
            _set_values(elem, out)
        return changed

    def _mark(self, ds: Dataset) -> None:
        """PS3.15 E.1.1 attributes saying what was done."""
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = PROFILE_TEXT
        items = []
        method_codes = [codes.cid7050.BasicApplicationConfidentialityProfile]
        if RETAIN_LONGITUDINAL_MODIFIED_DATES in self.profile.options:
            method_codes.append(codes.cid7050.RetainLongitudinalTemporalInformationModifiedDatesOption)
        for code in method_codes:
            item = Dataset()
            item.CodeValue = code.value
            item.CodingSchemeDesignator = code.scheme_designator
            item.CodeMeaning = code.meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        if RETAIN_LONGITUDINAL_MODIFIED_DATES in self.profile.options:
            ds.LongitudinalTemporalInformationModified = "MODIFIED"


# ---- element helpers ------------------------------------------------------------
def original_patient_id(ds: Dataset) -> str:
    """The top-level PatientID as text ("" if absent): the key for pseudonym and date offset."""
    return _as_text(ds[PATIENT_ID]) if PATIENT_ID in ds else ""


def _as_text(elem: Any) -> str:
    """An element's value as one string (first value), decoding raw bytes if needed."""
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin-1", "replace").strip(" \x00")
    if isinstance(value, (list, MultiValue)):
        return str(value[0]).strip() if len(value) else ""
    return str(value).strip()


def _values(elem: DataElement) -> list[str]:
    """String values of a text element; UN bytes are decoded and split on backslashes."""
    value = elem.value
    if value is None or value == "":
        return []
    if isinstance(value, bytes):
        text = value.decode("latin-1", "replace").strip(" \x00")
        return [t for t in text.split("\\")] if text else []
    if isinstance(value, (list, MultiValue)):
        return [str(v) for v in value]
    return [str(value)]


def _set_values(elem: DataElement, values: list[str]) -> None:
    if elem.VR == "UN":
        raw = "\\".join(values).encode("latin-1", "replace")
        elem.value = raw + (b"\x00" if len(raw) % 2 else b"")
    elif len(values) == 1:
        elem.value = values[0]
    else:
        elem.value = values


def _is_empty(elem: DataElement) -> bool:
    return elem.value is None or elem.value == "" or elem.value == b"" or elem.value == []


def _empty(elem: DataElement) -> None:
    """Z: zero-length value (an empty sequence for SQ)."""
    if elem.VR == "SQ":
        elem.value = Sequence()
    elif elem.VR in BYTES_VRS:
        elem.value = b""
    else:
        elem.value = None


def _dummy(elem: DataElement) -> None:
    """D: a non-empty value consistent with the VR that carries no information."""
    vr = elem.VR
    if vr in DUMMY_TEXT:
        elem.value = DUMMY_TEXT[vr]
    elif vr in NUMBER_VRS:
        elem.value = 0
    elif vr == "AT":
        elem.value = Tag(0)
    elif vr in BYTES_VRS:
        elem.value = b"\x00" * 8
    else:
        _empty(elem)
