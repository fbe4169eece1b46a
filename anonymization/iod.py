"""What an IOD requires of the attributes Table E.1-1 gives a compound action.

PS3.15's compound actions (Z/D, X/Z, X/D, X/Z/D) say "the weakest action that keeps
the IOD valid", which depends on the attribute's Type in the IOD at hand: Content Date
is Type 1 in an SR document (a dummy is needed), 2C in a CT image (empty will do) and
absent from an RT plan (remove it). ``data/iod_types.json`` holds those Types for
every storage SOP class that dicom3tools knows, at the top level and inside the items
of each top-level sequence; ``data/build_iod_types.py`` says how it was made.

Conditional Types (1C, 2C) are taken as required: the attribute is in front of us,
so its condition most likely holds, and a dummy or an empty value carries no
information anyway.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Literal

IOD_TYPES_RESOURCE = "iod_types.json"

Requirement = Literal["1", "2", "3"]
_RANK = {"1": 5, "1C": 4, "2": 3, "2C": 2, "3": 1}


@dataclass(frozen=True)
class IodTypes:
    """Types by SOP class (top level) and by parent sequence (inside items)."""

    attributes: frozenset[int]
    by_sop_class: dict[str, dict[int, str]]
    iod_names: dict[str, str]
    nested: dict[int, dict[int, str]]
    any_iod: dict[int, str]  # strongest Type over every IOD: for unknown SOP classes

    def type_of(self, tag: int, sop_class: str | None = None, parent: int | None = None) -> str | None:
        """The attribute's Type ("1", "1C", "2", "2C", "3") or None if the IOD does not have it.

        ``parent`` is the tag of the sequence whose item holds the attribute (None at
        the top level). An unknown SOP class gets the strongest Type of any IOD, so a
        file of a class newer than the table is kept valid rather than guessed at.
        """
        if parent is not None:
            return self.nested.get(parent, {}).get(tag)
        if sop_class is not None:
            types = self.by_sop_class.get(sop_class.strip().rstrip("\x00"))
            if types is not None:
                return types.get(tag)
        return self.any_iod.get(tag)

    def requirement(self, tag: int, sop_class: str | None = None, parent: int | None = None) -> Requirement:
        """Collapse the Type to what de-identification needs: must be non-empty, present, or neither."""
        found = self.type_of(tag, sop_class, parent)
        if found in ("1", "1C"):
            return "1"
        if found in ("2", "2C"):
            return "2"
        return "3"

    def iod_name(self, sop_class: str) -> str | None:
        """dicom3tools' name of the IOD of ``sop_class`` (e.g. ``CTImage``), if known."""
        return self.iod_names.get(sop_class)


def _tag(text: str) -> int:
    return int(text, 16)


@lru_cache(maxsize=1)
def load_iod_types() -> IodTypes:
    """The shipped table, parsed once per process."""
    text = resources.files("anonymization").joinpath("data", IOD_TYPES_RESOURCE).read_text("utf-8")
    data = json.loads(text)
    by_sop: dict[str, dict[int, str]] = {}
    names: dict[str, str] = {}
    any_iod: dict[int, str] = {}
    for sop, entry in data["iods"].items():
        types = {_tag(t): v for t, v in entry["types"].items()}
        by_sop[sop] = types
        names[sop] = entry.get("iod", "")
        for tag, value in types.items():
            if tag not in any_iod or _RANK[value] > _RANK[any_iod[tag]]:
                any_iod[tag] = value
    nested = {_tag(p): {_tag(t): v for t, v in inner.items()} for p, inner in data.get("nested", {}).items()}
    return IodTypes(
        attributes=frozenset(_tag(t) for t in data["attributes"]),
        by_sop_class=by_sop,
        iod_names=names,
        nested=nested,
        any_iod=any_iod,
    )
