"""The labels CSV (``AccessionNumber,label``), turned into pseudonyms on read.

Original accession numbers live only in memory here: the map handed on is
keyed by the accession pseudonym, and errors name line numbers, never values.
"""

from __future__ import annotations

import csv
from pathlib import Path

from anonymization.errors import LabelsError
from anonymization.pseudonyms import Pseudonymizer

REQUIRED = ("AccessionNumber", "label")
VALID_LABELS = frozenset({"0", "1"})


def load_labels(path: Path, pseudonymizer: Pseudonymizer) -> dict[str, str]:
    """Map accession pseudonym -> "0"/"1"; raise :class:`LabelsError` on any malformed line."""
    path = Path(path)
    try:
        fh = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115 - closed by `with fh` below; opened apart for its own error
    except OSError as exc:
        raise LabelsError(f"cannot read labels file {path}: {exc.strerror}") from None
    labels: dict[str, str] = {}
    with fh:
        try:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED if c not in fields]
            if missing:
                raise LabelsError(
                    f"labels file {path} needs a header with columns AccessionNumber,label "
                    f"(missing: {', '.join(missing)})"
                )
            reader.fieldnames = fields
            for row in reader:
                line = reader.line_num
                accession = (row.get("AccessionNumber") or "").strip()
                label = (row.get("label") or "").strip()
                if not accession and not label:
                    continue
                if not accession:
                    raise LabelsError(f"labels file {path}, line {line}: empty AccessionNumber")
                if label not in VALID_LABELS:
                    raise LabelsError(f"labels file {path}, line {line}: label must be 0 or 1")
                key = pseudonymizer.accession(accession)
                if labels.get(key, label) != label:
                    raise LabelsError(
                        f"labels file {path}, line {line}: this accession number already has a different label"
                    )
                labels[key] = label
        except csv.Error:
            raise LabelsError(f"labels file {path} is not a valid CSV file (line {reader.line_num})") from None
        except UnicodeDecodeError:
            raise LabelsError(f"labels file {path} is not UTF-8 text") from None
    return labels
