"""Regenerate ``iod_types.json``: the Type (1, 1C, 2, 2C, 3) of each attribute that
PS3.15 Table E.1-1 gives a compound action (Z/D, X/Z, X/D, X/Z/D, X/Z/U*), per IOD.

Why probe a validator instead of typing PS3.3 in by hand: the compound actions only
need to know, for the attribute in front of us, whether the IOD requires it (Type 1),
requires it possibly empty (Type 2) or not at all (Type 3 / not in the IOD). David
Clunie's dicom3tools carry the module tables of PS3.3 as data, and ``dciodvfy`` names
the Type of an attribute whenever its value breaks a rule: give every probed attribute
a value of the wrong multiplicity and each complaint reads
``Bad attribute Value Multiplicity Type 2C Conditional Element=<ContentDate> Module=<GeneralImage>``.

The probe, for every storage SOP class in pydicom's UID dictionary that dciodvfy knows:

1. top level: all probed attributes present with 5 values (sequences with 0 items,
   then with 2 items: a 1-n sequence only complains about 0, a VM-1 sequence only
   about 2) -> the Type of each one the IOD has; ``Attribute is not present in standard
   DICOM IOD`` -> not in the IOD. The one multi-valued attribute (Operators' Name,
   VM 1-n) is left out and read from ``Missing attribute Type N`` instead.
2. the baseline (nothing present) names the Type 1/2 attributes of the modules every
   instance has, of any VR (``Missing attribute Type 2 Required Element=<StudyDate>``).
3. nested: for every sequence the IOD can hold at its top level (``dciodvfy -describe``
   of a data set holding every sequence of the dictionary, so that conditional modules
   are described too), one item holding the probed attributes -> their Type inside
   items of that sequence; and one empty item against none -> the Type 1/2 attributes
   of such items, of any VR. Merged over IODs, strongest wins (these are mostly shared
   macros). Conditions an empty item cannot meet (the value of an SR content item
   depends on its Value Type) are added by hand in ``MANUAL_NESTED``.

Run from the repository root on a machine with Debian's ``dicom3tools``::

    .venv/bin/python anonymization/data/build_iod_types.py

It takes a few minutes (tens of thousands of dciodvfy runs of ~10 ms each).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from pydicom._uid_dict import UID_dictionary
from pydicom.datadict import DicomDictionary, dictionary_VM, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

HERE = Path(__file__).resolve().parent
TABLE = HERE / "ps3.15_table_e1_1.json"
OUT = HERE / "iod_types.json"

RANK = {"1": 5, "1C": 4, "2": 3, "2C": 2, "3": 1}
# Only complaints about a value that is there name the Type of *that* attribute: a
# "Missing attribute" line may come from inside an (empty) item of another sequence.
_TYPE_RE = re.compile(
    r"(?:Bad attribute Value Multiplicity|Empty attribute \(no value\)) "
    r"Type (1C|2C|1|2|3) (?:Required|Conditional|Optional) Element=<(\w+)>"
)
_MISSING_RE = re.compile(r"Missing attribute Type (1C|2C|1|2) \w+ Element=<(\w+)>")
_NOT_IN_IOD_RE = re.compile(r"not present in standard DICOM IOD - \(0x([0-9a-f]{4}),0x([0-9a-f]{4})\)")
_DUMMY = {"DA": "20000101", "TM": "120000", "DT": "20000101120000", "PN": "A^B", "CS": "NO"}


def probed_tags() -> list[int]:
    rows = json.loads(TABLE.read_text("utf-8"))
    tags = []
    for row in rows:
        if "/" in row["basic"] and not row.get("is_pattern"):
            tags.append(int(row["tag"][1:5] + row["tag"][6:10], 16))
    return tags


def _strongest(a: str | None, b: str) -> str:
    return b if a is None or RANK[b] > RANK[a] else a


def _fill(item: Dataset, tags: list[int], n_items: int) -> None:
    for tag in tags:
        vr = dictionary_VR(tag)
        if vr == "SQ":
            item.add_new(tag, vr, Sequence([Dataset() for _ in range(n_items)]))
        elif dictionary_VM(tag) == "1":
            item.add_new(tag, vr, [_DUMMY.get(vr, "X")] * 5)


def _run(ds: Dataset, path: Path, *extra: str) -> list[str]:
    ds.save_as(path, enforce_file_format=True)
    out = subprocess.run(["dciodvfy", *extra, str(path)], capture_output=True, text=True, check=False)
    return (out.stdout + out.stderr).splitlines()


def _base(sop: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop
    ds.SOPInstanceUID = "1.2.3.4"
    return ds


def _types(lines: list[str], keywords: set[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in lines:
        m = _TYPE_RE.search(line)
        if m and m.group(2) in keywords:
            found[m.group(2)] = _strongest(found.get(m.group(2)), m.group(1))
    return found


def _missing(lines: list[str]) -> list[tuple[str, str]]:
    """(keyword, type) of every "Missing attribute" complaint, with repeats."""
    out = []
    for line in lines:
        m = _MISSING_RE.search(line)
        if m:
            out.append((m.group(2), m.group(1)))
    return out


def probe_iod(sop: str, tags: list[int], path: Path) -> tuple[str, dict[str, str], set[str], list[int]] | None:
    """(IOD name, {keyword: type}, keywords not in the IOD, top-level sequence tags) or None."""
    keywords = {keyword_for_tag(t) for t in tags}
    types: dict[str, str] = {}
    absent: set[str] = set()
    name = ""
    for n_items in (0, 2):
        ds = _base(sop)
        _fill(ds, tags, n_items)
        lines = _run(ds, path)
        if any("Information Object Not found" in line for line in lines):
            return None
        name = next((ln.strip() for ln in lines if re.fullmatch(r"\s*[A-Za-z0-9]+\s*", ln)), name)
        for kw, t in _types(lines, keywords).items():
            types[kw] = _strongest(types.get(kw), t)
        for line in lines:
            m = _NOT_IN_IOD_RE.search(line)
            if m:
                absent.add(keyword_for_tag(int(m.group(1) + m.group(2), 16)))
    # Baseline, nothing present and no items anywhere: "Missing attribute" names top-level
    # attributes only - the Type 1/2 attributes of the modules every instance has (any
    # VR: kept for the by-VR rules too), and the one multi-valued probed attribute.
    for kw, t in _missing(_run(_base(sop), path)):
        if kw in keywords or tag_for_keyword(kw) is not None:
            types[kw] = _strongest(types.get(kw), t)
    for tag in tags:
        kw = keyword_for_tag(tag)
        if kw not in types and kw not in absent and dictionary_VR(tag) == "SQ":
            types[kw] = "2"  # in the IOD, no complaint for 0 items nor 2: a Type 2 1-n sequence
    # Which sequences can this IOD hold at its top level? Present every sequence of the
    # dictionary (no items), so conditional modules are described too.
    everything = _base(sop)
    for tag, entry in DicomDictionary.items():
        if entry[0] == "SQ" and not entry[3] and (tag >> 16) not in (0x0000, 0x0002, 0x0004, 0xFFFE):
            everything.add_new(tag, "SQ", Sequence())
    sequences = []
    for line in _run(everything, path, "-describe"):
        m = re.match(r"^\t\tSequence <(\w+)>", line)
        if m:
            tag = tag_for_keyword(m.group(1))
            if tag is not None and tag not in sequences:
                sequences.append(tag)
    # Text attributes with no complaint are Type 3 or unknown to dciodvfy: optional.
    return name, {kw: t for kw, t in types.items() if kw not in absent}, absent, sequences


def probe_nested(sop: str, parent: int, tags: list[int], path: Path) -> dict[str, str]:
    """Types inside items of ``parent``: of the probed attributes, and of every required one."""
    keywords = {keyword_for_tag(t) for t in tags}
    found: dict[str, str] = {}
    for n_items in (0, 2):
        ds = _base(sop)
        item = Dataset()
        _fill(item, [t for t in tags if t != parent], n_items)
        ds.add_new(parent, "SQ", Sequence([item]))
        for kw, t in _types(_run(ds, path), keywords - {keyword_for_tag(parent)}).items():
            found[kw] = _strongest(found.get(kw), t)
    # One empty item vs no item: the extra "Missing attribute" complaints are the item's.
    without = _base(sop)
    without.add_new(parent, "SQ", Sequence())
    with_item = _base(sop)
    with_item.add_new(parent, "SQ", Sequence([Dataset()]))
    before = _missing(_run(without, path))
    for entry in _missing(_run(with_item, path)):
        if entry in before:
            before.remove(entry)
            continue
        kw, t = entry
        if tag_for_keyword(kw) is not None:
            found[kw] = _strongest(found.get(kw), t)
    return found


# Conditions dciodvfy cannot meet with an empty item: the value of an SR content item is
# required by its Value Type (PS3.3 Table 10-2 Content Item Macro, C.17.3 Document
# Content Macro): Text Value if TEXT, Date/Time/DateTime, Person Name, UID likewise.
_CONTENT_ITEM_VALUES = {
    "TextValue": "1C",
    "DateTime": "1C",
    "Date": "1C",
    "Time": "1C",
    "PersonName": "1C",
    "UID": "1C",
}
MANUAL_NESTED: dict[str, dict[str, str]] = {
    "ContentSequence": _CONTENT_ITEM_VALUES,
    "AcquisitionContextSequence": _CONTENT_ITEM_VALUES,
}


def _probe_one(args: tuple[str, list[int], str]) -> tuple[str, tuple | None, dict[int, dict[str, str]]]:
    sop, tags, tmp = args
    path = Path(tmp) / f"probe-{sop}.dcm"
    result = probe_iod(sop, tags, path)
    nested: dict[int, dict[str, str]] = {}
    if result is not None:
        for parent in result[3]:
            found = probe_nested(sop, parent, tags, path)
            if found:
                nested[parent] = found
    return sop, result, nested


def main() -> int:
    tags = probed_tags()
    sops = sorted(k for k, v in UID_dictionary.items() if v[1] == "SOP Class" and "Storage" in v[0])
    iods: dict[str, dict[str, object]] = {}
    nested: dict[int, dict[str, str]] = defaultdict(dict)
    with tempfile.TemporaryDirectory() as tmp, multiprocessing.Pool(os.cpu_count() or 1) as pool:
        jobs = [(sop, tags, tmp) for sop in sops]
        for i, (sop, result, found) in enumerate(pool.imap(_probe_one, jobs)):
            if result is None:
                continue
            name, types, _absent, sequences = result
            iods[sop] = {
                "iod": name,
                "sop_class": UID_dictionary[sop][0],
                "types": {
                    f"{tag_for_keyword(kw):08X}": t
                    for kw, t in sorted(types.items(), key=lambda kv: tag_for_keyword(kv[0]))
                },
            }
            for parent, inner in found.items():
                for kw, t in inner.items():
                    nested[parent][kw] = _strongest(nested[parent].get(kw), t)
            print(f"{i + 1}/{len(sops)} {name}: {len(types)} attributes, {len(sequences)} sequences", file=sys.stderr)
    for parent_kw, inner in MANUAL_NESTED.items():
        parent = tag_for_keyword(parent_kw)
        for kw, t in inner.items():
            nested[parent][kw] = _strongest(nested[parent].get(kw), t)
    payload = {
        "source": (
            "Probed from dicom3tools' dciodvfy (Debian package dicom3tools "
            f"{_dicom3tools_version()}), whose module tables follow DICOM PS3.3, by "
            "anonymization/data/build_iod_types.py; see its docstring for the method. "
            "Plus MANUAL_NESTED there (value-type conditions of SR content items)."
        ),
        "legend": {
            "1": "required, non-empty",
            "1C": "required non-empty when a condition holds",
            "2": "required, may be empty",
            "2C": "required, may be empty, when a condition holds",
            "3": "optional",
            "absent": "attribute not in this IOD (treated as optional)",
        },
        "attributes": [f"{t:08X}" for t in tags],
        "iods": iods,
        "nested": {
            f"{parent:08X}": {f"{tag_for_keyword(kw):08X}": t for kw, t in sorted(found.items())}
            for parent, found in sorted(nested.items())
            if found
        },
    }
    OUT.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n", "utf-8")
    print(f"wrote {OUT}: {len(iods)} IODs, {len(payload['nested'])} parent sequences", file=sys.stderr)
    return 0


def _dicom3tools_version() -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "dicom3tools"], capture_output=True, text=True, check=False
        )
        return out.stdout.strip() or "unknown version"
    except OSError:
        return "unknown version"


if __name__ == "__main__":
    sys.exit(main())
