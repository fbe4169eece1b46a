"""Applies the site's policy (PS3.15 Table E.1-1 + options) to a pydicom Dataset, recursively.

Driven by tag number from :mod:`anonymization.table`, in the main data set and in
every sequence item at any depth. Compound actions are resolved per IOD and per
position with the Types of :mod:`anonymization.iod`. What the table does not list is
handled by VR, because the table is not exhaustive: person names emptied, dates
shifted with the patient's offset (or kept / emptied, per the date option), instance
UIDs replaced, unlisted free text emptied, and text inside sequences the table does
not list (or inside kept private sequences) removed. Returns counts of what was done
so the audit trail can say it without values.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

from pydicom import config
from pydicom._uid_dict import UID_dictionary
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_sequence
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import validate_value

import medfed
from anonymization.dates import shift_da, shift_dt
from anonymization.iod import load_iod_types
from anonymization.policy import DEFAULT_POLICY, Code, Policy
from anonymization.pseudonyms import Pseudonymizer
from anonymization.scrub import LazyScrubber, TextScrubber
from anonymization.table import (
    CLEAN,
    DUMMY,
    EMPTY,
    KEEP,
    KEEP_REPLACING_UIDS,
    REMOVE,
    RESOLVABLE_COMPOUNDS,
    UID,
    Profile,
    SafePrivateTags,
    load_safe_private,
    resolve_compound,
)

MEDFED_VERSION = medfed.__version__

PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010
ACCESSION_NUMBER = 0x00080050
SOP_CLASS_UID = 0x00080016
TIMEZONE_OFFSET_FROM_UTC = 0x00080201  # kept: a whole-day shift leaves the offset true
REASON_FOR_ATTRIBUTE_MODIFICATION = 0x04000565
PATIENT_IDENTITY_REMOVED = 0x00120062
DEIDENTIFICATION_METHOD = 0x00120063
DEIDENTIFICATION_METHOD_CODE_SEQUENCE = 0x00120064
LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED = 0x00280303
PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
OVERLAY_DATA = 0x60003000

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
        0x0008010D,  # Context Group Extension Creator UID
    }
)

FREE_TEXT_VRS = frozenset({"ST", "LT", "UT"})
# Text that may carry anything a person typed: removed inside unlisted sequences.
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "AE", "UR"})
BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
NUMBER_VRS = frozenset({"SL", "SS", "SV", "UL", "US", "UV", "FL", "FD"})

# Text attributes that are coded values or structural labels, not free text: kept
# inside unlisted sequences (removing them would break Type 1 code sequences and LUTs).
STRUCTURAL_TEXT_TAGS = frozenset(
    {
        0x00080100,  # Code Value
        0x00080102,  # Coding Scheme Designator
        0x00080103,  # Coding Scheme Version
        0x00080104,  # Code Meaning
        0x00080105,  # Mapping Resource
        0x0008010F,  # Context Identifier
        0x00080119,  # Long Code Value
        0x00080120,  # URN Code Value
        0x00080122,  # Mapping Resource Name
        0x00080070,  # Manufacturer (Type 1 in Contributing Equipment)
        0x00081090,  # Manufacturer's Model Name
        0x00181020,  # Software Versions
        0x00281055,  # Window Center & Width Explanation
        0x00283003,  # LUT Explanation
        0x00283004,  # Modality LUT Type
        0x00409210,  # LUT Label
        0x00209421,  # Dimension Description Label
    }
)

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
# Reason for the Attribute Modification: defined terms only, anything else is free text.
_MODIFICATION_REASONS = frozenset({"COERCE", "CORRECT"})

PROFILE_LINE = f"medfed {MEDFED_VERSION}: PS3.15 Basic Application Confidentiality Profile"
# Kept for callers of the previous API: the text of the default policy.
PROFILE_TEXT = [PROFILE_LINE, "Retain Longitudinal Temporal Information Modified Dates Option"]

DATES_MODIFIED, DATES_FULL, DATES_REMOVED = "MODIFIED", "UNMODIFIED", "REMOVED"


def is_well_known_uid(uid: str) -> bool:
    """True for UIDs defined by the standard (SOP classes, syntaxes, frames, coding schemes)."""
    uid = uid.strip().rstrip("\x00")
    return uid in UID_dictionary or uid.startswith(STANDARD_UID_ROOT)


@dataclass
class _Context:
    offset_days: int
    counts: Counter[str]
    sop_class: str | None
    scrubber: TextScrubber | LazyScrubber | None


RawStep = Callable[..., bool]
DecodedStep = Callable[..., None]


@dataclass(frozen=True, slots=True)
class ActionRule:
    """What one PS3.15 action code does to an element, for both forms the element can be in.

    ``raw`` acts on a still-raw element from its bytes (False: it needs the value decoded),
    ``decoded`` on the element with its value converted by pydicom; a code that
    ``reads_value`` not is applied before anything is decoded. A ``compound`` code has no
    steps: it is resolved per IOD and position (:func:`anonymization.table.resolve_compound`)
    to a single code, whose rule applies.
    """

    code: str | None  # None: an attribute the table does not list (rules by VR)
    meaning: str
    raw: RawStep | None = None
    decoded: DecodedStep | None = None
    reads_value: bool = True
    compound: bool = False


class Deidentifier:
    """De-identifies datasets in place under one policy and one site secret.

    ``profile`` (the table resolved for a set of option columns) is accepted for
    callers of the previous API; ``policy`` says everything, including the options
    that are not table columns. Given neither, the default policy applies.
    """

    def __init__(
        self,
        pseudonymizer: Pseudonymizer,
        profile: Profile | None = None,
        *,
        policy: Policy | None = None,
    ) -> None:
        self.pseudo = pseudonymizer
        if policy is None:
            policy = Policy.from_options(profile.options) if profile is not None else DEFAULT_POLICY
        self.policy = policy
        self.profile = profile if profile is not None else Profile(policy.table_options)
        if set(self.profile.options) != set(policy.table_options):
            raise ValueError("the profile's options differ from the policy's; pass only the policy")
        self.dates = policy.longitudinal_temporal_information
        self.safe_private: SafePrivateTags | None = (
            load_safe_private() if self.profile.private_action == CLEAN else None
        )
        self.types = load_iod_types()
        self._codes = tuple(policy.method_codes())
        # Free text an IOD requires (Type 1) is kept cleaned only where an option says
        # text may be kept; elsewhere it becomes a dummy.
        self._clean_free_text = any(
            (policy.clean_descriptors, policy.clean_structured_content, policy.keep_text_in_unlisted_sequences)
        )
        # Options under which most files have text to scrub: collect identifiers up front.
        self._scrubs_often = self._clean_free_text or policy.clean_graphics or policy.retain_patient_characteristics

    # ---- entry point ------------------------------------------------------------
    def deidentify(self, ds: Dataset, *, original: Callable[[], Dataset] | None = None) -> Counter[str]:
        """Clean ``ds`` (not its file meta) and mark it de-identified; return action counts.

        ``original`` re-reads the untouched data set (the worker passes a parse of the
        input bytes). With it, and a policy that rarely cleans text, the identifiers the
        text scrubber needs are collected from a fresh copy only when some text is
        actually scrubbed - most files never need it, and collecting them up front was
        a sixth of the time per file.
        """
        original_pid = original_patient_id(ds)
        sop_class = str(ds.get(SOP_CLASS_UID).value).strip() if SOP_CLASS_UID in ds else None
        scrubber: TextScrubber | LazyScrubber = (
            TextScrubber.from_dataset(ds) if original is None or self._scrubs_often else LazyScrubber(original)
        )
        ctx = _Context(self.pseudo.date_offset_days(original_pid), Counter(), sop_class or None, scrubber)
        self._clean(ds, ctx, parent=None, unlisted=False)
        patient = self.pseudo.patient_id(original_pid)
        _put(ds, Tag(PATIENT_ID), "LO", patient)
        ds[PATIENT_NAME] = DataElement(PATIENT_NAME, "PN", patient, validation_mode=config.IGNORE)
        self._mark(ds)
        return ctx.counts

    def patient_pseudonym(self, ds: Dataset) -> str:
        """The pseudonym the top-level PatientID of an *original* dataset becomes."""
        return self.pseudo.patient_id(original_patient_id(ds))

    # ---- recursion --------------------------------------------------------------
    def _clean(self, ds: Dataset, ctx: _Context, parent: int | None, unlisted: bool) -> None:
        """Clean one data set or item; ``parent`` is the sequence holding it (None: top level).

        ``unlisted`` is true inside a sequence that Table E.1-1 does not list (or a kept
        private sequence): free text there is removed, not just emptied.
        """
        # The data set's own key objects: a fresh BaseTag makes every later dict
        # lookup fall back to BaseTag.__eq__ (Python code) - perf, see bench/deid_throughput.py.
        tags = list(ds.keys())
        if self.safe_private is None:
            # Without Retain Safe Private every private element goes: in one sweep (a CT
            # often has hundreds of them), with plain integer tests on the tags.
            private = [tag for tag in tags if tag >> 16 & 1]
            if private:
                for tag in private:
                    del ds[tag]
                ctx.counts[REMOVE] += len(private)
                ctx.counts["private"] += len(private)
                tags = [tag for tag in tags if not tag >> 16 & 1]
        for tag in tags:
            self._clean_element(ds, tag, ctx, parent, unlisted)
        self._drop_overlays(ds, ctx)
        if self.safe_private is not None:
            _drop_orphan_creators(ds)

    def _drop_overlays(self, ds: Dataset, ctx: _Context) -> None:
        """An overlay group is removed whole once its Overlay Data (Type 1) is gone.

        Overlay bitmaps are graphics we cannot inspect, so even the Clean Graphics
        option cannot keep them (C falls back to the Basic Profile's X); the group's
        header alone would make the Overlay Plane module invalid.
        """
        if self.profile.basic_action_for(OVERLAY_DATA) != REMOVE:
            return
        for tag in list(ds.keys()):
            group = tag >> 16
            if 0x6000 <= group <= 0x601E and group % 2 == 0:
                del ds[tag]
                ctx.counts["overlay"] += 1

    def _clean_element(
        self, ds: Dataset, tag: BaseTag, ctx: _Context, parent: int | None, unlisted: bool
    ) -> None:
        """One element: structural rules first, then the action table's rule for its code."""
        if self._structural(ds, tag, ctx):
            return
        number = int(tag)
        rule = self._rule(number, ctx, parent)
        if not rule.reads_value:  # X: removed without reading (or converting) the value
            assert rule.decoded is not None
            rule.decoded(self, ds, tag, None, ctx, parent, unlisted)
            return
        raw = ds.get_item(tag)
        if rule.raw is not None and type(raw) is RawDataElement:
            vr = _raw_vr(raw, number)
            if vr is not None and rule.raw(self, ds, tag, raw, vr, ctx, parent, unlisted):
                return  # done on the bytes: kept exactly as read, or a new value written
        elem = self._decode(ds, tag, ctx)  # converts a raw element; only for elements we keep in some form
        if elem is None:
            return
        if number in _PSEUDONYMIZED:
            self._pseudonymize(elem, number, ctx)
            return
        assert rule.decoded is not None
        rule.decoded(self, ds, tag, elem, ctx, parent, unlisted)

    def _structural(self, ds: Dataset, tag: BaseTag, ctx: _Context) -> bool:
        """Private elements, group lengths and curves: decided by the tag alone (True: done)."""
        group = tag >> 16  # integer arithmetic: BaseTag's properties are Python code
        if group & 1:
            self._private(ds, tag, ctx)
            return True
        if not tag & 0xFFFF:  # group length: stale once anything changed
            del ds[tag]
            return True
        if 0x5000 <= group <= 0x50FF:  # (even: private groups were handled above)
            # Curves (retired): data no option can clean, so never a curve without it.
            del ds[tag]
            ctx.counts[REMOVE] += 1
            return True
        return False

    def _rule(self, tag: int, ctx: _Context, parent: int | None) -> ActionRule:
        """The rule for the table's code of ``tag``; a compound code resolved for this IOD and position."""
        code = self.profile.raw_action(tag)
        rule = ACTION_RULES.get(code, FAIL_CLOSED)
        if rule.compound:
            assert code is not None
            rule = ACTION_RULES.get(resolve_compound(code, tag, ctx.sop_class, parent), FAIL_CLOSED)
        return rule

    def _decode(self, ds: Dataset, tag: BaseTag, ctx: _Context) -> DataElement | None:
        """The element with its value converted; None if it was an unparsable sequence (then removed).

        A sequence pydicom does not know, read from implicit VR, arrives as UN: its items
        are parsed so they can be cleaned, or it is dropped - never bytes we cannot inspect.
        """
        elem = ds[tag]
        if elem.VR == "UN" and self.profile.is_sequence(int(tag)) and not _parse_un_sequence(elem):
            del ds[tag]
            ctx.counts[REMOVE] += 1
            ctx.counts["unparsable_sequence"] += 1
            return None
        return elem

    def _pseudonymize(self, elem: DataElement, tag: int, ctx: _Context) -> None:
        """Identifiers that become keyed pseudonyms rather than empty values, so that
        images of a patient/study stay linkable and labels can be joined."""
        if tag == PATIENT_ID:
            elem.value = self.pseudo.patient_id(_as_text(elem))
        else:
            text = _as_text(elem)
            elem.value = self.pseudo.accession(text) if text else ""
        ctx.counts["pseudonym"] += 1

    # ---- the rules of the action table, each on a raw and on a decoded element ----------------
    # Raw steps decide from the VR in the file (or the dictionary's, for implicit VR) without
    # converting the value - conversion was the largest cost of de-identifying a file - and
    # return False where the value must be decoded (text in a character set, a value without
    # its form, ...). The values they write are those of the decoded steps (the tests run both).
    def _remove(
        self, ds: Dataset, tag: BaseTag, elem: DataElement | None, ctx: _Context, parent: int | None, unlisted: bool
    ) -> None:
        """X (and any code this engine does not know: fail closed)."""
        del ds[tag]
        ctx.counts[REMOVE] += 1

    def _keep_raw(
        self, ds: Dataset, tag: BaseTag, raw: RawDataElement, vr: str, ctx: _Context, parent: int | None,
        unlisted: bool,
    ) -> bool:
        """K on anything but a sequence: kept exactly as read."""
        ctx.counts[KEEP] += 1
        return True

    def _keep_decoded(
        self, ds: Dataset, tag: BaseTag, elem: DataElement, ctx: _Context, parent: int | None, unlisted: bool
    ) -> None:
        """K: kept; a sequence's items are cleaned."""
        if elem.VR == "SQ":
            self._recurse(elem, ctx, unlisted=False)
        ctx.counts[KEEP] += 1

    def _empty_raw(
        self, ds: Dataset, tag: BaseTag, raw: RawDataElement, vr: str, ctx: _Context, parent: int | None,
        unlisted: bool,
    ) -> bool:
        if not _writable(raw, vr):
            return False
        _put(ds, tag, vr, _EMPTY_VALUE.get(vr))
        ctx.counts[EMPTY] += 1
        return True

    def _empty_decoded(
        self, ds: Dataset, tag: BaseTag, elem: DataElement, ctx: _Context, parent: int | None, unlisted: bool
    ) -> None:
        """Z: a zero-length value."""
        _empty(elem)
        ctx.counts[EMPTY] += 1

    def _dummy_raw(
        self, ds: Dataset, tag: BaseTag, raw: RawDataElement, vr: str, ctx: _Context, parent: int | None,
        unlisted: bool,
    ) -> bool:
        if not _writable(raw, vr):
            return False
        if vr == "UI":
            self._replace_raw_uids(ds, tag, raw, ctx)
        elif not (vr in ("DA", "DT") and self.dates == DATES_MODIFIED and self._shift_raw(ds, tag, vr, raw, ctx)):
            _put(ds, tag, vr, _dummy_value(vr))  # (a blank date gets the dummy date, as decoded)
        ctx.counts[DUMMY] += 1
        return True

    def _dummy_decoded(
        self, ds: Dataset, tag: BaseTag, elem: DataElement, ctx: _Context, parent: int | None, unlisted: bool
    ) -> None:
        """D: see :meth:`_dummy`."""
        self._dummy(elem, ctx)
        ctx.counts[DUMMY] += 1

    def _uid_raw(
        self, ds: Dataset, tag: BaseTag, raw: RawDataElement, vr: str, ctx: _Context, parent: int | None,
        unlisted: bool,
    ) -> bool:
        if vr != "UI" or not _writable(raw, vr):
            return False
        if not self.policy.retain_uids:
            self._replace_raw_uids(ds, tag, raw, ctx)
        ctx.counts[UID] += 1
        return True

    def _uid_decoded(
        self, ds: Dataset, tag: BaseTag, elem: DataElement, ctx: _Context, parent: int | None, unlisted: bool
    ) -> None:
        """U: instance UIDs replaced by keyed pseudonyms (unless the policy retains UIDs)."""
        if not self.policy.retain_uids:
            self._replace_uids(elem, ctx)
        ctx.counts[UID] += 1

    def _keep_replacing_uids_decoded(
        self, ds: Dataset, tag: BaseTag, elem: DataElement, ctx: _Context, parent: int | None, unlisted: bool
    ) -> None:
        """U* (of X/Z/U*): a sequence kept and cleaned; a UID replaced; anything else emptied."""
        vr = elem.VR
        if vr == "SQ":
            self._recurse(elem, ctx, unlisted=False)
        elif vr == "UI":
            self._replace_uids(elem, ctx)
        else:
            _empty(elem)
        ctx.counts[KEEP_REPLACING_UIDS] += 1

    def _clean_raw(
        self, ds: Dataset, tag: BaseTag, raw: RawDataElement, vr: str, ctx: _Context, parent: int | None,
        unlisted: bool,
    ) -> bool:
        """C on a time (or the UTC offset) or a date, as :meth:`_clean_value` does it."""
        number = int(tag)
        if not has_form(vr, number, _raw_texts(raw)):
            return False  # a value without its attribute's form: _clean_value falls back
        if (vr == "TM" or number == TIMEZONE_OFFSET_FROM_UTC) and self.dates != DATES_REMOVED:
            ctx.counts[CLEAN] += 1
            return True
        if vr not in ("DA", "DT") or not _writable(raw, vr) or self.dates == DATES_REMOVED:
            return False
        if self.dates == DATES_MODIFIED:
            self._shift_raw(ds, tag, vr, raw, ctx)
            ctx.counts[CLEAN] += 1
        else:
            ctx.counts[KEEP] += 1
        return True

    def _shift_raw(self, ds: Dataset, tag: BaseTag, vr: str, raw: RawDataElement, ctx: _Context) -> bool:
        """:meth:`_shift` on the bytes of a raw DA/DT element."""
        values = _raw_texts(raw)
        if not values:
            return False
        shifter = shift_da if vr == "DA" else shift_dt
        shifted = [shifter(v, ctx.offset_days) for v in values]
        if any(s is None for s in shifted):
            _put(ds, tag, vr, None)
            ctx.counts["unparsable_date"] += 1
            return True
        _put(ds, tag, vr, shifted)  # type: ignore[arg-type]
        ctx.counts["shifted"] += 1
        return True

    def _replace_raw_uids(self, ds: Dataset, tag: BaseTag, raw: RawDataElement, ctx: _Context) -> bool:
        """:meth:`_replace_uids` on the bytes of a raw UI element."""
        if int(tag) in TYPE_UID_TAGS:
            return False
        values = _raw_texts(raw)
        if not values:
            return False
        out = [self.pseudo.uid(v) if v and not is_well_known_uid(v) else v for v in values]
        if out == values:
            return False
        _put(ds, tag, "UI", out)
        return True

    def _private(self, ds: Dataset, tag: BaseTag, ctx: _Context) -> None:
        """Private attributes: removed, or under Retain Safe Private kept if known safe.

        Safety is decided by (private creator, group, element within the block) from
        the shipped safe list; the creators are kept for now and dropped afterwards
        when no element of their block survived (:func:`_drop_orphan_creators`).
        """
        element = tag.element
        if self.safe_private is None or element == 0x0000 or 0x0001 <= element <= 0x000F:
            del ds[tag]
            ctx.counts[REMOVE] += 1
            ctx.counts["private"] += 1
            return
        if 0x0010 <= element <= 0x00FF:
            return  # a private creator: decided once its block is done
        creator_tag = (tag.group << 16) | (element >> 8)
        creator = _as_text(ds[creator_tag]) if creator_tag in ds else None
        if not self.safe_private.is_safe(creator, int(tag)):
            del ds[tag]
            ctx.counts[REMOVE] += 1
            ctx.counts["private"] += 1
            return
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value or []:
                self._clean(item, ctx, parent=int(tag), unlisted=True)
        ctx.counts["private_kept"] += 1

    def _by_vr_raw(
        self, ds: Dataset, tag: BaseTag, raw: RawDataElement, vr: str, ctx: _Context, parent: int | None,
        unlisted: bool,
    ) -> bool:
        """Unlisted, still raw: kept as read where no by-VR rule acts; names, dates, UIDs rewritten on the bytes."""
        rule = BY_VR_RULES.get(vr)
        if rule is None:
            # no rule for the VR here: top-level short text is kept, text in unlisted sequences is not,
            # free text is decoded (it is in a character set)
            return vr not in FREE_TEXT_VRS and not (
                unlisted and vr in TEXT_VRS and int(tag) not in STRUCTURAL_TEXT_TAGS)
        return rule.raw is not None and _writable(raw, vr) and rule.raw(self, ds, tag, raw, vr, ctx, parent)

    def _by_vr(
        self, ds: Dataset, tag: BaseTag, elem: DataElement, ctx: _Context, parent: int | None, unlisted: bool
    ) -> None:
        """Rules for attributes the table does not list, by VR (:data:`BY_VR_RULES`, then text)."""
        vr = elem.VR
        rule = BY_VR_RULES.get(vr)
        if rule is not None:
            rule.decoded(self, ds, tag, elem, ctx, parent)
        elif vr in TEXT_VRS and int(tag) not in STRUCTURAL_TEXT_TAGS and (unlisted or vr in FREE_TEXT_VRS):
            self._text_by_vr(ds, tag, elem, ctx, parent, unlisted)

    def _items_by_vr(self, ds: Dataset, tag: BaseTag, elem: DataElement, ctx: _Context, parent: int | None) -> None:
        """An unlisted sequence: its items cleaned as unlisted (their free text removed)."""
        if elem.value is not None:
            for item in elem.value:
                self._clean(item, ctx, parent=int(tag), unlisted=True)

    def _name_by_vr_raw(
        self, ds: Dataset, tag: BaseTag, raw: RawDataElement, vr: str, ctx: _Context, parent: int | None
    ) -> bool:
        if raw.length:
            required = self.types.requirement(int(tag), ctx.sop_class, parent) == "1"
            _put(ds, tag, vr, DUMMY_TEXT["PN"] if required else None)
            ctx.counts["vr_pn"] += 1
        return True

    def _name_by_vr(self, ds: Dataset, tag: BaseTag, elem: DataElement, ctx: _Context, parent: int | None) -> None:
        """A person's name: a dummy where the IOD requires one (Type 1), else emptied."""
        if not _is_empty(elem):
            if self.types.requirement(int(tag), ctx.sop_class, parent) == "1":
                _dummy(elem)
            else:
                _empty(elem)
            ctx.counts["vr_pn"] += 1

    def _date_by_vr_raw(
        self, ds: Dataset, tag: BaseTag, raw: RawDataElement, vr: str, ctx: _Context, parent: int | None
    ) -> bool:
        if self.dates == DATES_MODIFIED:
            if raw.length and self._shift_raw(ds, tag, vr, raw, ctx):
                ctx.counts["vr_date"] += 1
        elif self.dates == DATES_REMOVED and raw.length and _raw_texts(raw):
            _put(ds, tag, vr, None)
            ctx.counts["vr_date"] += 1
        return True

    def _date_by_vr(self, ds: Dataset, tag: BaseTag, elem: DataElement, ctx: _Context, parent: int | None) -> None:
        if self._date_by_option(elem, ctx):
            ctx.counts["vr_date"] += 1

    def _uids_by_vr_raw(
        self, ds: Dataset, tag: BaseTag, raw: RawDataElement, vr: str, ctx: _Context, parent: int | None
    ) -> bool:
        if not self.policy.retain_uids and self._replace_raw_uids(ds, tag, raw, ctx):
            ctx.counts["vr_uid"] += 1
        return True

    def _uids_by_vr(self, ds: Dataset, tag: BaseTag, elem: DataElement, ctx: _Context, parent: int | None) -> None:
        if not self.policy.retain_uids and self._replace_uids(elem, ctx):
            ctx.counts["vr_uid"] += 1

    def _unknown_by_vr(self, ds: Dataset, tag: BaseTag, elem: DataElement, ctx: _Context, parent: int | None) -> None:
        """UN: neither pydicom nor the table knows it, so its meaning (and whether it identifies) is unknown."""
        del ds[tag]
        ctx.counts["vr_unknown"] += 1

    def _text_by_vr(
        self, ds: Dataset, tag: BaseTag, elem: DataElement, ctx: _Context, parent: int | None, unlisted: bool
    ) -> None:
        """Free text anywhere, and any text inside an unlisted sequence.

        What the IOD requires here decides: Type 1 stays non-empty (cleaned text where
        an option allows text, or short text such as a segment label; a dummy
        otherwise), Type 2 is emptied, anything else is removed inside sequences and
        emptied at the top level - unless the policy keeps text in unlisted sequences.
        """
        vr = elem.VR
        counts = ctx.counts
        if _is_empty(elem):
            return
        need = self.types.requirement(int(tag), ctx.sop_class, parent)
        if need == "1":
            may_clean = vr not in FREE_TEXT_VRS or self._clean_free_text
            if may_clean and vr not in ("AE", "UR") and ctx.scrubber is not None and self._scrub(elem, ctx):
                counts["vr_text_cleaned"] += 1
            else:
                _dummy(elem)
                counts["vr_text"] += 1
            return
        if need == "2":
            _empty(elem)
            counts["vr_text"] += 1
            return
        if (unlisted and self.policy.keep_text_in_unlisted_sequences and vr not in ("AE", "UR")
                and ctx.scrubber is not None and self._scrub(elem, ctx)):
            counts["vr_text_cleaned"] += 1
            return
        if unlisted or parent is not None:
            del ds[tag]
        else:
            _empty(elem)
        counts["vr_text"] += 1

    def _recurse(self, elem: DataElement, ctx: _Context, *, unlisted: bool) -> None:
        if elem.VR != "SQ" or elem.value is None:
            return
        for item in elem.value:
            self._clean(item, ctx, parent=int(elem.tag), unlisted=unlisted)

    def _clean_value(
        self, ds: Dataset, tag: BaseTag, elem: DataElement, ctx: _Context, parent: int | None, unlisted: bool = False
    ) -> None:
        """C: keep the attribute with values of similar meaning that do not identify.

        Dates (Modified Dates option) are shifted by the patient's whole-day offset,
        times and the UTC offset kept; sequences are kept and cleaned item by item;
        text is scrubbed (:mod:`anonymization.scrub`); AE titles become keyed
        pseudonyms. Anything that cannot be cleaned (opaque bytes, a value that
        scrubbing empties, a value without its attribute's form: :func:`has_form`)
        falls back to the Basic Profile's action.
        """
        kept = self._cleaned(tag, elem, ctx)
        if kept is not None:
            ctx.counts[kept] += 1
            return
        basic = self.profile.basic_action_for(int(tag), ctx.sop_class, parent) or REMOVE
        if basic == UID:  # (replaced even under Retain UIDs: the option asked for C, not for U)
            self._replace_uids(elem, ctx)
            ctx.counts[UID] += 1
            return
        rule = ACTION_RULES[basic if basic in (DUMMY, EMPTY) else REMOVE]
        assert rule.decoded is not None
        rule.decoded(self, ds, tag, elem, ctx, parent, unlisted)

    def _cleaned(self, tag: BaseTag, elem: DataElement, ctx: _Context) -> str | None:
        """Clean the value in place where it can be kept: the count to add (C; K for full dates), else None."""
        vr = elem.VR
        number = int(tag)
        if (vr in FORMED_VRS or number in _TAG_FORMS) and not has_form(vr, number, _values(elem)):
            ctx.counts["clean_malformed"] += 1  # free text in a time, an offset, a code: not kept
            return None
        if vr in ("DA", "DT") or (vr == "UN" and self.dates == DATES_MODIFIED and _looks_like_dt(elem)):
            if self.dates == DATES_MODIFIED:
                self._shift(elem, ctx, vr="DT" if vr == "UN" else vr)
                return CLEAN
            return KEEP if self.dates == DATES_FULL else None
        if vr == "TM" or number == TIMEZONE_OFFSET_FROM_UTC:
            return CLEAN if self.dates != DATES_REMOVED else None
        cleaner = _VALUE_CLEANERS.get(vr)
        return cleaner(self, number, elem, ctx) if cleaner is not None else None

    def _clean_items(self, tag: int, elem: DataElement, ctx: _Context) -> str | None:
        self._recurse(elem, ctx, unlisted=False)
        return CLEAN

    def _clean_ae(self, tag: int, elem: DataElement, ctx: _Context) -> str | None:
        """AE titles name a hospital's devices: keyed pseudonyms keep them distinct and meaningless."""
        values = _values(elem)
        _set_values(elem, [self.pseudo.digest(b"medfed/ae\x00" + v.strip().encode())[:16].upper() for v in values])
        return CLEAN

    def _clean_text(self, tag: int, elem: DataElement, ctx: _Context) -> str | None:
        return CLEAN if ctx.scrubber is not None and self._scrub(elem, ctx) else None

    def _clean_code(self, tag: int, elem: DataElement, ctx: _Context) -> str | None:
        """A code string is kept only where its defined terms are known (Reason for the Attribute Modification)."""
        if tag == REASON_FOR_ATTRIBUTE_MODIFICATION and all(
                v.strip().upper() in _MODIFICATION_REASONS for v in _values(elem)):
            return CLEAN
        return None

    # ---- value rewriting --------------------------------------------------------
    def _scrub(self, elem: DataElement, ctx: _Context) -> bool:
        """Scrub every value of a text element; False (element untouched) if nothing is left."""
        assert ctx.scrubber is not None
        values = _values(elem)
        if not values:
            return True
        cleaned = [ctx.scrubber.clean(v) for v in values]
        if not any(cleaned):
            return False
        _set_values(elem, cleaned)
        return True

    def _dummy(self, elem: DataElement, ctx: _Context) -> None:
        """D: a value consistent with the VR that carries no information.

        Sequences are kept and cleaned item by item; UIDs are replaced (a dummy UID
        would break references); dates under the Modified Dates option are shifted.
        """
        vr = elem.VR
        if vr == "SQ":
            self._recurse(elem, ctx, unlisted=False)
        elif vr == "UI":
            self._replace_uids(elem, ctx)
        elif vr in ("DA", "DT") and self.dates == DATES_MODIFIED and not _is_empty(elem):
            self._shift(elem, ctx)
        else:
            _dummy(elem)

    def _date_by_option(self, elem: DataElement, ctx: _Context) -> bool:
        """An unlisted DA/DT: shifted (Modified Dates), kept (Full Dates) or emptied."""
        if self.dates == DATES_MODIFIED:
            return self._shift(elem, ctx)
        if self.dates == DATES_FULL or _is_empty(elem):
            return False
        _empty(elem)
        return True

    def _shift(self, elem: DataElement, ctx: _Context, vr: str | None = None) -> bool:
        """Shift DA/DT values by the patient's offset; unparsable dates are emptied."""
        shifter: Callable[[str, int], str | None] = shift_da if (vr or elem.VR) == "DA" else shift_dt
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
        """PS3.15 E.1.1 attributes saying exactly what was done (profile and options).

        Built from fixed, valid values without pydicom's keyword lookup and validation
        (a tenth of a millisecond per file, paid by every file).
        """
        codes = self._codes
        _put(ds, Tag(PATIENT_IDENTITY_REMOVED), "CS", "YES")
        _put(ds, Tag(DEIDENTIFICATION_METHOD), "LO", [PROFILE_LINE] + [code.meaning for code in codes[1:]])
        sequence = DataElement(DEIDENTIFICATION_METHOD_CODE_SEQUENCE, "SQ", Sequence([_code_item(c) for c in codes]))
        ds[sequence.tag] = sequence
        _put(ds, Tag(LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED), "CS", self.dates)


# ---- the action table: one rule per PS3.15 action code, driving both element forms ----------
ACTION_RULES: dict[str | None, ActionRule] = {
    rule.code: rule
    for rule in (
        ActionRule(REMOVE, "remove", decoded=Deidentifier._remove, reads_value=False),
        ActionRule(EMPTY, "zero-length value", Deidentifier._empty_raw, Deidentifier._empty_decoded),
        ActionRule(DUMMY, "dummy value of the VR", Deidentifier._dummy_raw, Deidentifier._dummy_decoded),
        ActionRule(KEEP, "keep (sequences cleaned)", Deidentifier._keep_raw, Deidentifier._keep_decoded),
        ActionRule(CLEAN, "clean: similar meaning, not identifying", Deidentifier._clean_raw,
                   Deidentifier._clean_value),
        ActionRule(UID, "replace UIDs", Deidentifier._uid_raw, Deidentifier._uid_decoded),
        ActionRule(KEEP_REPLACING_UIDS, "keep the sequence, UIDs inside replaced",
                   decoded=Deidentifier._keep_replacing_uids_decoded),
        ActionRule(None, "not in the table: by VR", Deidentifier._by_vr_raw, Deidentifier._by_vr),
        *(ActionRule(code, "compound: the weakest that keeps the IOD valid", compound=True)
          for code in sorted(RESOLVABLE_COMPOUNDS)),
    )
}
# A code this engine does not know (a table newer than it): fail closed.
FAIL_CLOSED = ActionRule("?", "unknown code: remove", decoded=Deidentifier._remove)


class VrRule(NamedTuple):
    """A by-VR rule for attributes the table does not list: on the raw bytes (None: decode) and decoded."""

    raw: Callable[..., bool] | None
    decoded: Callable[..., None]


# Unlisted attributes by VR; text VRs not here are decided by where they sit (Deidentifier._by_vr).
BY_VR_RULES: dict[str, VrRule] = {
    "SQ": VrRule(None, Deidentifier._items_by_vr),
    "PN": VrRule(Deidentifier._name_by_vr_raw, Deidentifier._name_by_vr),
    "DA": VrRule(Deidentifier._date_by_vr_raw, Deidentifier._date_by_vr),
    "DT": VrRule(Deidentifier._date_by_vr_raw, Deidentifier._date_by_vr),
    "UI": VrRule(Deidentifier._uids_by_vr_raw, Deidentifier._uids_by_vr),
    "UN": VrRule(None, Deidentifier._unknown_by_vr),
}

# C by VR, after dates and times (Deidentifier._cleaned): what can be kept of each kind of value.
_VALUE_CLEANERS: dict[str, Callable[..., str | None]] = {
    **{vr: Deidentifier._clean_text for vr in TEXT_VRS | {"PN"}},
    "AE": Deidentifier._clean_ae,
    "SQ": Deidentifier._clean_items,
    "CS": Deidentifier._clean_code,
}


# ---- element helpers ------------------------------------------------------------
# VRs whose new value a raw step can write without decoding the old one (text in a
# character set, numbers and bytes only when emptied or given a dummy).
_FAST_VRS = frozenset(DUMMY_TEXT) | {"UI", "AT"} | NUMBER_VRS | (BYTES_VRS - {"UN"})
_EMPTY_VALUE: dict[str, Any] = {vr: b"" for vr in BYTES_VRS}
# Identifiers that become keyed pseudonyms: always decoded (see Deidentifier._pseudonymize).
_PSEUDONYMIZED = frozenset({PATIENT_ID, ACCESSION_NUMBER})


def _raw_vr(raw: RawDataElement, tag: int) -> str | None:
    """The VR a raw step may decide a still-raw element by; None: decode it first.

    The VR read from the file, else (implicit VR) the dictionary's if the value was
    read. Sequences, UN and the pseudonymized identifiers are always decoded.
    """
    if tag in _PSEUDONYMIZED:
        return None
    vr = raw.VR
    if vr is None:
        if raw.value is None:
            return None
        vr = _dictionary_vr(tag)
    return None if vr is None or vr == "SQ" or vr == "UN" else vr


def _writable(raw: RawDataElement, vr: str) -> bool:
    """True if a raw step may write a new value for this element (its old one was read, its VR is known)."""
    return raw.value is not None and vr in _FAST_VRS


@lru_cache(maxsize=8192)
def _dictionary_vr(tag: int) -> str | None:
    """The dictionary VR of an implicit-VR element; None if unknown or ambiguous (US or SS...)."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    return None if " or " in vr else vr


# VRs whose values have a form (PS3.5 6.2) that pydicom's validators check, and attributes
# whose form is narrower than their VR's: Timezone Offset From UTC is SH "&ZZXX" (PS3.3 C.12.1.1.8).
FORMED_VRS = frozenset({"AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
_TAG_FORMS: dict[int, re.Pattern[str]] = {TIMEZONE_OFFSET_FROM_UTC: re.compile(r"[+-](?:0\d|1[0-4])[0-5]\d")}


def has_form(vr: str | None, tag: int, values: list[str]) -> bool:
    """True if every value has its attribute's form (by VR, or the attribute's own pattern).

    A "C" action keeps a time, an offset or a code because of what it means; a value
    that does not have that form (free text in a Timezone Offset) means something else.
    VRs without a form (text, names, bytes) always pass.
    """
    pattern = _TAG_FORMS.get(tag)
    if pattern is None and vr not in FORMED_VRS:
        return True
    for value in values:
        value = value.strip(" \x00")
        if not value:
            continue
        if pattern is not None:
            if not pattern.fullmatch(value):
                return False
            continue
        try:
            validate_value(str(vr), value, config.RAISE)
        except (ValueError, TypeError):
            return False
    return True


def _raw_texts(raw: RawDataElement) -> list[str]:
    """The values of a raw element of an ASCII VR (DA, DT, UI), as pydicom would split them."""
    value = raw.value
    if not value:
        return []
    text = value.decode("latin-1").strip(" \x00")
    return [v.strip(" \x00") for v in text.split("\\")] if text else []


def _dummy_value(vr: str) -> Any:
    """What :func:`_dummy` would set, for a VR."""
    if vr in DUMMY_TEXT:
        return DUMMY_TEXT[vr]
    if vr in NUMBER_VRS:
        return 0
    if vr == "AT":
        return Tag(0)
    if vr in BYTES_VRS:
        return b"\x00" * 8
    return None


def _put(ds: Dataset, tag: BaseTag, vr: str, value: Any) -> None:
    """Replace an element with a new, already valid value (no conversion, no validation)."""
    if vr == "PN":  # person names are PersonName objects (pydicom writes them by component)
        ds[tag] = DataElement(tag, vr, value, validation_mode=config.IGNORE)
        return
    if isinstance(value, list):
        value = value[0] if len(value) == 1 else MultiValue(str, value)
    ds[tag] = DataElement(tag, vr, value, already_converted=True, validation_mode=config.IGNORE)


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    for tag, vr, value in ((0x00080100, "SH", code.value), (0x00080102, "SH", code.scheme_designator),
                           (0x00080104, "LO", code.meaning)):
        _put(item, Tag(tag), vr, value)
    return item


def _parse_un_sequence(elem: DataElement) -> bool:
    """Turn a UN element holding an (implicit VR little endian) sequence into SQ, in place."""
    value = elem.value
    if isinstance(value, Sequence):
        elem.VR = "SQ"
        return True
    if not isinstance(value, bytes):
        return False
    try:
        seq = read_sequence(io.BytesIO(value), True, True, len(value), "iso8859")
    except Exception:  # noqa: BLE001 - anything unparsable is dropped by the caller
        return False
    if len(value) and not len(seq):
        return False
    elem.VR = "SQ"
    elem.value = seq
    return True


def _drop_orphan_creators(ds: Dataset) -> None:
    """Remove private creators (gggg,0010-00FF) whose block lost every element."""
    tags = list(ds.keys())  # (iterating the Dataset itself would convert every element)
    kept_blocks = {(t >> 16, (t & 0xFFFF) >> 8) for t in tags if BaseTag(t).is_private and (t & 0xFFFF) >= 0x1000}
    for t in tags:
        tag = BaseTag(t)
        if tag.is_private and 0x0010 <= tag.element <= 0x00FF and (tag.group, tag.element) not in kept_blocks:
            del ds[tag]


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


def _looks_like_dt(elem: DataElement) -> bool:
    values = _values(elem)
    return bool(values) and all(v.strip()[:8].isdigit() for v in values)


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
