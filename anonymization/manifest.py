"""``DST/manifest.csv``: the de-identified images the models package trains on.

Columns are a contract with ``models`` and must not change. Rows are keyed by
path, merged with an earlier manifest (re-runs add or replace, never
duplicate), sorted (so the worker count never changes the file) and written
to a temporary name, then renamed.
"""

from __future__ import annotations

import csv
import io
import os
import secrets
from pathlib import Path
from typing import Iterable, Mapping

COLUMNS: tuple[str, ...] = ("patient", "study_uid", "series_uid", "sop_uid", "accession", "path", "label")
MANIFEST_FILE = "manifest.csv"


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Rows of an existing manifest ([] if missing or not ours)."""
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            return []
        return [{c: row.get(c) or "" for c in COLUMNS} for row in reader]


def merge_rows(
    existing: Iterable[Mapping[str, str]], new: Iterable[Mapping[str, str]], root: Path
) -> list[dict[str, str]]:
    """New rows replace old rows with the same path; old rows whose file is gone are dropped."""
    by_path: dict[str, dict[str, str]] = {}
    for row in existing:
        if row.get("path") and (root / row["path"]).is_file():
            by_path[row["path"]] = {c: row.get(c, "") or "" for c in COLUMNS}
    for row in new:
        by_path[row["path"]] = {c: row.get(c, "") or "" for c in COLUMNS}
    return [by_path[k] for k in sorted(by_path)]


def write_manifest(path: Path, rows: Iterable[Mapping[str, str]]) -> None:
    """Write ``rows`` with exactly :data:`COLUMNS`, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in COLUMNS})
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(buffer.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
