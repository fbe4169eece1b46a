"""PS3.15 Table E.1-1, loaded from the package's JSON and resolved for one profile.

The rules are data, not code: the engine asks :class:`Profile` what to do with a
tag *number* (25 rows have no pydicom keyword), and the pattern rows (curves,
overlay data/comments) and the private-attributes row are matched by number too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from anonymization.iod import load_iod_types

TABLE_RESOURCE = "ps3.15_table_e1_1.json"

# The option this product applies (PS3.15 E.3.6): dates shifted, not removed.
RETAIN_LONGITUDINAL_MODIFIED_DATES = "retain_longitudinal_modified_dates"
# Table E.1-1's option columns, in the order they are applied (a later column wins a conflict;
# the two date options are mutually exclusive, so order never matters there). The policy's
# fields carry these names (anonymization.policy.TABLE_OPTIONS is this tuple).
OPTION_COLUMNS: tuple[str, ...] = (
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

RESOLVABLE_COMPOUNDS = frozenset({"Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"})
CTP_RESOURCE = "ctp_private_tag_dictionary.json"


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

    @property
    def is_sequence(self) -> bool:
        """True for sequences, also those pydicom does not know (their name says so)."""
        return self.vr == "SQ" or (self.vr is None and self.name.rstrip().endswith("Sequence"))


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


def resolve_compound(action: str, tag: int, sop_class: str | None = None, parent: int | None = None) -> str:
    """Pick one action out of a compound one (Z/D, X/Z, X/D, X/Z/D, X/Z/U*).

    PS3.15 E.1.1: the weakest action that keeps the IOD valid. The attribute's Type
    in the IOD of ``sop_class`` (at the top level) or in items of the sequence
    ``parent`` comes from :mod:`anonymization.iod`: Type 1 needs a dummy (D), Type 2
    an empty value (Z; also for X/D, since an empty value is valid there and carries
    less than a dummy), anything else is removed (X). Without a SOP class the strongest
    Type in any IOD is used. X/Z/U* sequences are always kept with the UIDs inside
    replaced: their references are what ties a derived image to its source.
    """
    parts = action.split("/")
    if len(parts) == 1:
        return action
    if "U*" in parts:
        return KEEP_REPLACING_UIDS
    need = load_iod_types().requirement(tag, sop_class, parent)
    if need == "1":
        preference = (DUMMY, EMPTY, REMOVE)
    elif need == "2":
        preference = (EMPTY, DUMMY, REMOVE)
    else:
        preference = (REMOVE, EMPTY, DUMMY)
    if need == "2" and REMOVE in parts and DUMMY in parts:
        return EMPTY  # X/D on a Type 2 attribute: empty keeps the IOD valid
    for choice in preference:
        if choice in parts:
            return choice
    return parts[0]


@dataclass
class Profile:
    """Table E.1-1 resolved for the Basic Profile plus a set of options.

    Single rows are looked up by tag number, pattern rows by mask; compound actions
    are resolved per call, because the answer depends on the IOD (``sop_class``) and
    on where the attribute sits (``parent``: the sequence whose item holds it).
    """

    options: tuple[str, ...] = DEFAULT_OPTIONS
    rows: tuple[Row, ...] = field(default_factory=load_rows)

    def __post_init__(self) -> None:
        unknown = [o for o in self.options if o not in OPTION_COLUMNS]
        if unknown:
            raise ValueError(f"unknown profile option(s): {unknown}; known: {list(OPTION_COLUMNS)}")
        if "retain_longitudinal_full_dates" in self.options and RETAIN_LONGITUDINAL_MODIFIED_DATES in self.options:
            raise ValueError("the Full Dates and Modified Dates options are mutually exclusive; choose one")
        self._table_action: dict[int, str] = {}
        self._basic: dict[int, str] = {}
        self._sequences: set[int] = set()
        self._patterns: list[tuple[int, int, str, str]] = []
        self.private_action: str = REMOVE
        for row in self.rows:
            action = self.table_action(row)
            if row.is_private_row:
                self.private_action = action
            elif row.is_pattern or row.mask != 0xFFFFFFFF:
                self._patterns.append((row.mask, row.value, action, row.basic))
            else:
                self._table_action[row.value] = action
                self._basic[row.value] = row.basic
                if row.is_sequence:
                    self._sequences.add(row.value)

    def table_action(self, row: Row) -> str:
        """The row's action under this profile: the last option column set wins over basic."""
        action = row.basic
        for option in self.options:
            override = row.options.get(option)
            if override:
                action = override
        return action

    def raw_action(self, tag: int) -> str | None:
        """The table's action for a (non-private) tag under this profile, compound unresolved."""
        action = self._table_action.get(tag)
        if action is not None:
            return action
        for mask, value, pattern_action, _basic in self._patterns:
            if tag & mask == value:
                return pattern_action
        return None

    def action_for(self, tag: int, sop_class: str | None = None, parent: int | None = None) -> str | None:
        """Resolved action for a (non-private) tag number, or None if the table is silent."""
        action = self.raw_action(tag)
        return None if action is None else resolve_compound(action, tag, sop_class, parent)

    def basic_action_for(self, tag: int, sop_class: str | None = None, parent: int | None = None) -> str | None:
        """The Basic Profile's own (resolved) action, used when an option's C cannot apply."""
        action = self._basic.get(tag)
        if action is None:
            for mask, value, _action, basic in self._patterns:
                if tag & mask == value:
                    action = basic
                    break
        return None if action is None else resolve_compound(action, tag, sop_class, parent)

    def is_sequence(self, tag: int) -> bool:
        """True if the table lists ``tag`` as a sequence (also for tags pydicom does not know)."""
        return tag in self._sequences

    def listed(self) -> Iterable[int]:
        """Tag numbers of the single (non-pattern) rows."""
        return self._table_action.keys()


@lru_cache(maxsize=4)
def default_profile() -> Profile:
    """Basic Profile + Retain Longitudinal Temporal Information with Modified Dates."""
    return Profile(DEFAULT_OPTIONS)


# ---- Retain Safe Private ------------------------------------------------------------
@dataclass(frozen=True)
class SafePrivateTags:
    """Private attributes known to be safe, by (creator, group, element within block).

    The list is RSNA CTP's private tag dictionary (TCIA), shipped as
    ``data/ctp_private_tag_dictionary.json``; only its ``K`` (keep) entries count.
    Anything else, and any private tag whose creator is missing or not in the list,
    is unsafe: a private element means nothing without its creator, and the same
    element number means different things under different creators.
    """

    safe: frozenset[tuple[str, int, int]]

    def is_safe(self, creator: str | None, tag: int) -> bool:
        """True if the private element ``tag`` under ``creator`` may be kept."""
        if not creator:
            return False
        group, element = tag >> 16, tag & 0xFFFF
        if element < 0x1000:  # (gggg,0010-00FF) are the creators themselves
            return False
        return (creator.strip().upper(), group, element & 0xFF) in self.safe


@lru_cache(maxsize=1)
def load_safe_private() -> SafePrivateTags:
    """The shipped safe-private list (keep entries only)."""
    text = resources.files("anonymization").joinpath("data", CTP_RESOURCE).read_text("utf-8")
    data = json.loads(text)
    safe = set()
    for row in data["rows"]:
        if row.get("disposition") != "K":
            continue
        safe.add((str(row["creator"]).strip().upper(), int(row["group"], 16), int(row["element_in_block"], 16)))
    return SafePrivateTags(frozenset(safe))
