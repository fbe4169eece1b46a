"""PS3.15 Table E.1-1, loaded from the package's JSON and resolved for one profile.

The rules are data, not code: the engine asks :class:`Profile` what to do with a
tag *number* (25 rows have no pydicom keyword), and the pattern rows (curves,
overlay data/comments) and the private-attributes row are matched by number too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable

TABLE_RESOURCE = "ps3.15_table_e1_1.json"

# The option this product applies (PS3.15 E.3.6): dates shifted, not removed.
RETAIN_LONGITUDINAL_MODIFIED_DATES = "retain_longitudinal_modified_dates"
OPTION_COLUMNS = (
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_longitudinal_full_dates",
    RETAIN_LONGITUDINAL_MODIFIED_DATES,
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
)
DEFAULT_OPTIONS: tuple[str, ...] = (RETAIN_LONGITUDINAL_MODIFIED_DATES,)

# Resolved single actions.
KEEP, REMOVE, EMPTY, DUMMY, UID, CLEAN = "K", "X", "Z", "D", "U", "C"
# X/Z/U*: keep the sequence, recurse, replace the UIDs inside.
KEEP_REPLACING_UIDS = "U*"

# Attributes behind a compound action containing D that are Type 1 in common
# IODs, so D (a dummy) is needed to keep those IODs valid. Everything else
# takes the weaker of the allowed actions: Z if allowed, else X. A later issue
# replaces this list with per-IOD module knowledge.
TYPE1_IN_COMMON_IODS: frozenset[int] = frozenset(
    {
        0x00080023,  # Content Date: Type 1 in SR Document General, Presentation State
        0x00080033,  # Content Time: idem
        0x0008002A,  # Acquisition DateTime: Type 1C in Enhanced CT/MR images
        0x00181000,  # Device Serial Number: Type 1 in Enhanced General Equipment
    }
)


@dataclass(frozen=True)
class Row:
    """One row of Table E.1-1 as shipped in the JSON."""

    tag: str
    name: str
    keyword: str | None
    vr: str | None
    basic: str
    options: dict[str, str | None]
    is_pattern: bool
    mask: int = 0  # for pattern rows: which bits of the tag are fixed
    value: int = 0  # for pattern rows: their value; for single rows: the tag

    @property
    def is_private_row(self) -> bool:
        return self.tag.lower().startswith("(gggg")


def _parse_tag(text: str) -> tuple[int, int]:
    """``(60XX,3000)`` -> (mask, value); X digits are wildcards."""
    body = text.strip().strip("()").replace(",", "")
    if len(body) != 8:
        raise ValueError(f"bad tag in table: {text!r}")
    mask = value = 0
    for ch in body:
        mask <<= 4
        value <<= 4
        if ch.upper() != "X":
            mask |= 0xF
            value |= int(ch, 16)
    return mask, value


def _row(raw: dict[str, Any]) -> Row:
    tag = raw["tag"]
    options = {col: raw.get(col) for col in OPTION_COLUMNS}
    row = Row(
        tag=tag,
        name=raw["name"],
        keyword=raw.get("keyword"),
        vr=raw.get("vr"),
        basic=raw["basic"],
        options=options,
        is_pattern=bool(raw.get("is_pattern")),
    )
    if tag.lower().startswith("(gggg"):
        return row
    mask, value = _parse_tag(tag)
    return Row(**{**row.__dict__, "mask": mask, "value": value})


@lru_cache(maxsize=1)
def load_rows() -> tuple[Row, ...]:
    """All rows of the shipped table, in file order."""
    text = resources.files("anonymization").joinpath("data", TABLE_RESOURCE).read_text("utf-8")
    data = json.loads(text)
    rows = data["rows"] if isinstance(data, dict) else data
    return tuple(_row(r) for r in rows)


def resolve_compound(action: str, tag: int) -> str:
    """Pick one action out of a compound one (Z/D, X/Z, X/D, X/Z/D, X/Z/U*).

    Weakest action that keeps the IOD valid without per-IOD knowledge: D only for
    known Type 1 attributes, else Z (the attribute stays, empty: fine for Type 2),
    else X.
    """
    parts = action.split("/")
    if len(parts) == 1:
        return action
    if "U*" in parts:
        return KEEP_REPLACING_UIDS
    if DUMMY in parts and tag in TYPE1_IN_COMMON_IODS:
        return DUMMY
    if EMPTY in parts:
        return EMPTY
    if REMOVE in parts:
        return REMOVE
    return parts[0]


@dataclass
class Profile:
    """Table E.1-1 resolved for the Basic Profile plus a set of options."""

    options: tuple[str, ...] = DEFAULT_OPTIONS
    rows: tuple[Row, ...] = field(default_factory=load_rows)

    def __post_init__(self) -> None:
        unknown = [o for o in self.options if o not in OPTION_COLUMNS]
        if unknown:
            raise ValueError(f"unknown profile option(s): {unknown}")
        self._single: dict[int, str] = {}
        self._table_action: dict[int, str] = {}
        self._patterns: list[tuple[int, int, str]] = []
        self.private_action: str = REMOVE
        for row in self.rows:
            action = self.table_action(row)
            if row.is_private_row:
                self.private_action = action
            elif row.is_pattern or row.mask != 0xFFFFFFFF:
                self._patterns.append((row.mask, row.value, action))
            else:
                self._table_action[row.value] = action
                self._single[row.value] = resolve_compound(action, row.value)

    def table_action(self, row: Row) -> str:
        """The row's action under this profile: the last option column set wins over basic."""
        action = row.basic
        for option in self.options:
            override = row.options.get(option)
            if override:
                action = override
        return action

    def action_for(self, tag: int) -> str | None:
        """Resolved action for a (non-private) tag number, or None if the table is silent."""
        action = self._single.get(tag)
        if action is not None:
            return action
        for mask, value, pattern_action in self._patterns:
            if tag & mask == value:
                return resolve_compound(pattern_action, tag)
        return None

    def basic_action_for(self, tag: int) -> str | None:
        """The Basic Profile's own (resolved) action, used when an option's C cannot apply."""
        for row in self.rows:
            if not row.is_pattern and not row.is_private_row and row.value == tag:
                return resolve_compound(row.basic, tag)
        return None

    def listed(self) -> Iterable[int]:
        """Tag numbers of the single (non-pattern) rows."""
        return self._single.keys()


@lru_cache(maxsize=4)
def default_profile() -> Profile:
    """Basic Profile + Retain Longitudinal Temporal Information with Modified Dates."""
    return Profile(DEFAULT_OPTIONS)
