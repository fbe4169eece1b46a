"""Cleaning free text (PS3.15 action C on descriptors, comments, structured text).

The Clean options keep a description ("CT chest, follow-up of J. Smith's nodule") only
after removing what identifies: we cannot understand the text, so we remove what has
the shape or the value of an identifier:

* every identifying value of *this* file (person names and their parts, patient and
  other IDs, accession and study/procedure IDs, birth date, addresses, phone numbers,
  institution names), collected from the original data set before it is cleaned;
* dates in common spellings, e-mail addresses, phone-number and ID-like digit runs
  (any token with 5 or more digits), and a title followed by a name (``Dr. Smith``).

Each removal leaves ``*`` so the reader sees that something was taken out; a value
left with no letter or digit becomes empty. The worker's residual check scans the
result again for the patient's identifiers, as a second line of defence.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

MASK = "*"
_MONTHS = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+", re.I),  # e-mail
    re.compile(r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b"),  # 2021-03-15
    re.compile(r"\b\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}\b"),  # 15/03/2021, 3.15.21
    re.compile(rf"\b\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTHS}\s*,?\s*\d{{2,4}}\b", re.I),  # 15 March 2021
    re.compile(rf"\b{_MONTHS}\s+\d{{1,2}}(?:st|nd|rd|th)?\s*,?\s*\d{{2,4}}\b", re.I),  # March 15, 2021
    re.compile(r"\+?\(?\d[\d\s().-]{6,}\d"),  # phone numbers and spaced digit groups
)
_TITLE_NAME = re.compile(r"\b(?:dr|mr|mrs|ms|miss|prof|sir|dame)\.?\s+[A-Z][\w'-]+", re.I)  # Dr. Smith
_DIGIT_TOKEN = re.compile(r"[\w-]*\d[\w-]*")
_WORDS = re.compile(r"[^\W_]+", re.UNICODE)

# Attributes whose whole values identify the patient, the request or the visit.
_ID_KEYWORDS = (
    "PatientID",
    "OtherPatientIDs",
    "AccessionNumber",
    "MedicalRecordLocator",
    "StudyID",
    "RequestedProcedureID",
    "ScheduledProcedureStepID",
    "PerformedProcedureStepID",
    "AdmissionID",
    "ServiceEpisodeID",
    "PatientTelephoneNumbers",
    "PatientAddress",
    "MilitaryRank",
    "BranchOfService",
    "RegionOfResidence",
    "CountryOfResidence",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "DeviceSerialNumber",
    "PatientBirthName",
    "PatientMotherBirthName",
    "ResponsibleOrganization",
    "IssuerOfPatientID",
)
_DATE_KEYWORDS = ("PatientBirthDate",)
_WANTED_KEYWORDS = frozenset(_ID_KEYWORDS + _DATE_KEYWORDS)
# By tag number: a keyword lookup per element cost more than the rest of the walk.
_WANTED_TAGS = frozenset(t for t in (tag_for_keyword(k) for k in _WANTED_KEYWORDS) if t is not None)
_MIN_NAME_PART = 2
_MIN_WORD = 4


def _walk(ds: Dataset) -> Iterator[DataElement]:
    """Public person names, IDs and dates at any depth, converted; undecodable ones skipped.

    Only the elements that can matter are converted (the rest stay raw for the engine),
    which keeps this first pass cheap.
    """
    for tag in list(ds.keys()):
        if tag.is_private:
            continue
        raw = ds.get_item(tag)
        vr = getattr(raw, "VR", None)
        if vr is None:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                continue
        if vr not in ("PN", "SQ") and int(tag) not in _WANTED_TAGS:
            continue
        try:
            elem = ds[tag]
        except Exception:  # noqa: BLE001 - the engine decides what happens to it
            continue
        if elem.VR == "SQ":
            for item in elem.value or []:
                yield from _walk(item)
        else:
            yield elem


def _texts(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v) for v in value if v is not None]
    if isinstance(value, bytes):
        return [value.decode("latin-1", "replace")]
    return [str(value)]


class TextScrubber:
    """Removes a set of identifying values, and identifier-shaped text, from strings."""

    def __init__(self, phrases: Iterable[str] = (), words: Iterable[str] = ()) -> None:
        self.phrases = sorted({p.strip().upper() for p in phrases if p and p.strip()}, key=len, reverse=True)
        self.words = {w.strip().upper() for w in words if w and len(w.strip()) >= _MIN_NAME_PART}
        self._compiled: re.Pattern[str] | None = None  # compiled on first use: most files never clean text

    @property
    def _phrase_re(self) -> re.Pattern[str] | None:
        if self._compiled is None and self.phrases:
            self._compiled = re.compile("|".join(re.escape(p) for p in self.phrases), re.I)
        return self._compiled

    @classmethod
    def from_dataset(cls, ds: Dataset) -> TextScrubber:
        """Collect the identifying values of ``ds`` (call before the data set is cleaned).

        Private elements are skipped unread (they are removed or kept by the safe list),
        and an element that cannot be decoded is skipped: collecting must never be the
        reason a file fails.
        """
        phrases: set[str] = set()
        words: set[str] = set()
        for elem in _walk(ds):
            vr = elem.VR
            keyword = elem.keyword
            if vr == "PN":
                for text in _texts(elem.value):
                    phrases.add(text.replace("^", " ").strip())
                    words.update(w for w in _WORDS.findall(text) if len(w) >= _MIN_NAME_PART)
            elif keyword in _ID_KEYWORDS:
                for text in _texts(elem.value):
                    phrases.add(text)
                    if keyword.startswith(("Institution", "Station", "Patient")):
                        words.update(w for w in _WORDS.findall(text) if len(w) >= _MIN_WORD)
            elif keyword in _DATE_KEYWORDS:
                for text in _texts(elem.value):
                    digits = text.strip()
                    if len(digits) == 8 and digits.isdigit():
                        y, m, d = digits[:4], digits[4:6], digits[6:]
                        phrases.update({digits, f"{y}-{m}-{d}", f"{d}/{m}/{y}", f"{m}/{d}/{y}", f"{d}.{m}.{y}"})
        return cls({p for p in phrases if len(p.strip()) >= _MIN_NAME_PART}, words)

    def clean(self, text: str) -> str:
        """``text`` with identifiers replaced by ``*``; "" if nothing meaningful is left."""
        if not text:
            return text
        out = text
        if self._phrase_re is not None:
            out = self._phrase_re.sub(MASK, out)
        for pattern in _PATTERNS:
            out = pattern.sub(MASK, out)
        out = _DIGIT_TOKEN.sub(lambda m: MASK if sum(c.isdigit() for c in m.group()) >= 5 else m.group(), out)
        out = _TITLE_NAME.sub(MASK, out)
        if self.words:
            out = _WORDS.sub(lambda m: MASK if m.group().upper() in self.words else m.group(), out)
        out = re.sub(r"\*(?:[\s,;:^*]*\*)+", MASK, out)  # one mark per run of removals
        if not any(ch.isalnum() for ch in out.replace(MASK, "")):
            return ""
        return out.strip()


class LazyScrubber:
    """A :class:`TextScrubber` built on first use from a fresh copy of the original data set.

    The engine changes the data set as it walks it, so identifiers cannot be collected
    from it half-way; ``original`` returns an untouched copy (the worker re-parses the
    input bytes), read only if some text is actually scrubbed.
    """

    def __init__(self, original: Callable[[], Dataset]) -> None:
        self._original = original
        self._scrubber: TextScrubber | None = None

    @property
    def built(self) -> bool:
        """Whether the identifiers were collected (some text was scrubbed)."""
        return self._scrubber is not None

    def clean(self, text: str) -> str:
        """:meth:`TextScrubber.clean`, collecting the identifiers first if not done yet."""
        if self._scrubber is None:
            self._scrubber = TextScrubber.from_dataset(self._original())
        return self._scrubber.clean(text)
