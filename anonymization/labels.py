"""The labels CSV (``<key>,label``), turned into pseudonyms on read.

The key column is one of AccessionNumber, StudyInstanceUID, SeriesInstanceUID or
SOPInstanceUID (the header names it). Keys are turned into the same pseudonyms the
de-identification writes into the manifest (``Pseudonymizer.accession`` and
``Pseudonymizer.uid``; UIDs kept as they are under the Retain UIDs option), so a label
meets its images without any original identifier being stored. Original keys live only
in memory here; errors name line numbers, never values.

Labels are free text restricted to class-name characters (a class name, an index, or
findings joined by ``|``): a study validates them against its classes when one is given.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from anonymization.errors import LabelsError
from anonymization.pseudonyms import Pseudonymizer
from models.study import _NAME as _CLASS_NAME
from models.study import LABEL_KEYS, MULTILABEL_SEPARATOR, NO_FINDING

if TYPE_CHECKING:
    from models.study import Study

#: The manifest column each CSV key matches.
MANIFEST_COLUMN: dict[str, str] = {
    "AccessionNumber": "accession",
    "StudyInstanceUID": "study_uid",
    "SeriesInstanceUID": "series_uid",
    "SOPInstanceUID": "sop_uid",
}
#: Longest label kept (a multilabel label lists findings).
MAX_LABEL = 1024


@dataclass(frozen=True)
class LabelTable:
    """Pseudonymised key -> label, and which CSV key and manifest column they came from."""

    key: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def column(self) -> str:
        """The manifest column whose value is looked up in ``labels``."""
        return MANIFEST_COLUMN[self.key]


def valid_label(text: str) -> bool:
    """A label a study could read: class-name characters, findings joined by ``|``, or ``none``."""
    if not text or len(text) > MAX_LABEL:
        return False
    if text.lower() == NO_FINDING:
        return True
    return all(_CLASS_NAME.match(part.strip()) for part in text.split(MULTILABEL_SEPARATOR))


def read_labels(
    path: Path,
    pseudonymizer: Pseudonymizer,
    *,
    retain_uids: bool = False,
    study: Study | None = None,
) -> LabelTable:
    """Read the labels CSV keyed by any of ``LABEL_KEYS``; raise :class:`LabelsError` on any malformed line.

    ``retain_uids`` says the store keeps original UIDs (the policy's Retain UIDs option),
    so UID keys are matched as they are. With ``study`` every label must be one it reads,
    and the CSV's key must be the study's ``labels.key``.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return _parse(fh, path, pseudonymizer, retain_uids, study)
    except OSError as exc:
        raise LabelsError(f"cannot read labels file {path}: {exc.strerror}") from None


def _parse(fh: TextIO, path: Path, pseudonymizer: Pseudonymizer, retain_uids: bool, study: Study | None) -> LabelTable:
    labels: dict[str, str] = {}
    reader = csv.DictReader(fh)
    try:
        fields = [f.strip() for f in (reader.fieldnames or [])]
        keys = [f for f in fields if f in LABEL_KEYS]
        if "label" not in fields or len(keys) != 1:
            raise LabelsError(
                f"labels file {path} needs a header with one key column ({', '.join(LABEL_KEYS)}) and a "
                f"label column, e.g. AccessionNumber,label (found {len(keys)} key column(s)"
                + ("" if "label" in fields else ", no label column") + ")"
            )
        key = keys[0]
        if study is not None and key != study.labels.key:
            raise LabelsError(
                f"labels file {path} is keyed by {key}, but the study takes labels by {study.labels.key}: "
                "use a CSV keyed as the study says, or change the study's labels.key"
            )
        reader.fieldnames = fields
        for row in reader:
            line = reader.line_num
            value = (row.get(key) or "").strip()
            label = (row.get("label") or "").strip()
            if not value and not label:
                continue
            if not value:
                raise LabelsError(f"labels file {path}, line {line}: empty {key}")
            if not valid_label(label):
                raise LabelsError(
                    f"labels file {path}, line {line}: a label is a class name or index (letters, digits, "
                    f"space, '.', '_', '-'), or findings joined by '{MULTILABEL_SEPARATOR}', or '{NO_FINDING}'"
                )
            if study is not None:
                try:
                    study.target(label)
                except ValueError as err:
                    raise LabelsError(f"labels file {path}, line {line}: {err}") from None
            if key == "AccessionNumber":
                pseudonym = pseudonymizer.accession(value)
            else:
                pseudonym = value if retain_uids else pseudonymizer.uid(value)
            if labels.get(pseudonym, label) != label:
                raise LabelsError(f"labels file {path}, line {line}: this {key} already has a different label")
            labels[pseudonym] = label
    except csv.Error:
        raise LabelsError(f"labels file {path} is not a valid CSV file (line {reader.line_num})") from None
    except UnicodeDecodeError:
        raise LabelsError(f"labels file {path} is not UTF-8 text") from None
    return LabelTable(key, labels)


def load_labels(path: Path, pseudonymizer: Pseudonymizer) -> dict[str, str]:
    """Map accession pseudonym -> label of an ``AccessionNumber,label`` CSV; :class:`LabelsError` otherwise."""
    table = read_labels(path, pseudonymizer)
    if table.key != "AccessionNumber":
        raise LabelsError(f"labels file {path} needs a header with columns AccessionNumber,label "
                          f"(it is keyed by {table.key})")
    return table.labels
