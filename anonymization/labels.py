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
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from anonymization.errors import LabelsError
from anonymization.pseudonyms import Pseudonymizer
from medfed.labelling import CLASS_NAME as _CLASS_NAME
from medfed.labelling import LABEL_KEYS, MULTILABEL_SEPARATOR, NO_FINDING


class StudyLike(Protocol):
    """What label checking needs of a study (models.study.Study), without importing the models layer."""

    labels: Any

    def target(self, label: str) -> object: ...

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
    study: StudyLike | None = None,
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


def _parse(fh: TextIO, path: Path, pseudonymizer: Pseudonymizer, retain_uids: bool,
           study: StudyLike | None) -> LabelTable:
    """The table of an open labels CSV: its key column, then every row; a file that is no UTF-8 CSV is refused."""
    reader = csv.DictReader(fh)
    try:
        key = _key_column(reader, path, study)
        labels = _read_rows(reader, key, path, study, lambda v: _pseudonym(key, v, pseudonymizer, retain_uids))
    except csv.Error:
        raise LabelsError(f"labels file {path} is not a valid CSV file (line {reader.line_num})") from None
    except UnicodeDecodeError:
        raise LabelsError(f"labels file {path} is not UTF-8 text") from None
    return LabelTable(key, labels)


def _key_column(reader: csv.DictReader, path: Path, study: StudyLike | None) -> str:
    """The header's one key column (and a label column), the study's key when a study is given.

    The header's names are stripped, so `` AccessionNumber , label`` reads as the user meant.
    """
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
    return key


def _read_rows(reader: csv.DictReader, key: str, path: Path, study: StudyLike | None,
               pseudonymise: Callable[[str], str]) -> dict[str, str]:
    """Pseudonymised key -> label of every row; blank rows are skipped, a key given two labels is refused.

    Errors name the line, never the key's value (it is an identifier).
    """
    labels: dict[str, str] = {}
    for row in reader:
        line = reader.line_num
        value = (row.get(key) or "").strip()
        label = (row.get("label") or "").strip()
        if not value and not label:
            continue
        if not value:
            raise LabelsError(f"labels file {path}, line {line}: empty {key}")
        _check_label(label, path, line, study)
        pseudonym = pseudonymise(value)
        if labels.get(pseudonym, label) != label:
            raise LabelsError(f"labels file {path}, line {line}: this {key} already has a different label")
        labels[pseudonym] = label
    return labels


def _check_label(label: str, path: Path, line: int, study: StudyLike | None) -> None:
    """A label of class-name characters, and (with a study) one the study reads."""
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


def _pseudonym(key: str, value: str, pseudonymizer: Pseudonymizer, retain_uids: bool) -> str:
    """The pseudonym the manifest holds for a key: the accession's, or the UID's (kept as is under Retain UIDs)."""
    if key == "AccessionNumber":
        return pseudonymizer.accession(value)
    return value if retain_uids else pseudonymizer.uid(value)


def load_labels(path: Path, pseudonymizer: Pseudonymizer) -> dict[str, str]:
    """Map accession pseudonym -> label of an ``AccessionNumber,label`` CSV; :class:`LabelsError` otherwise."""
    table = read_labels(path, pseudonymizer)
    if table.key != "AccessionNumber":
        raise LabelsError(f"labels file {path} needs a header with columns AccessionNumber,label "
                          f"(it is keyed by {table.key})")
    return table.labels


@dataclass
class LabelReport:
    """What ``medfed deid labels`` did: counts, and the CSV's keys the store does not know (as pseudonyms)."""

    matched: int  # keys of the CSV found in the store
    unmatched: int  # keys of the CSV the store does not hold (yet)
    unknown: list[str]  # those, as accession pseudonyms (never the original numbers)
    rows_labelled: int  # manifest rows whose label was set
    manifest: Path

    def line(self) -> str:
        text = (f"labels matched {self.matched}, did not match {self.unmatched}; "
                f"{self.rows_labelled} image(s) labelled in {self.manifest}")
        if self.unknown:
            shown = ", ".join(self.unknown[:20]) + (" ..." if len(self.unknown) > 20 else "")
            text += f"; unknown keys (as pseudonyms): {shown}"
        return text


def attach_labels(dst: Path, key_file: Path, labels: Path, *, audit: Path | None = None,
                  audit_key: Path | None = None) -> LabelReport:
    """Label an existing store's manifest from a labels CSV (labels that arrive after the images).

    Keys are matched through the site's pseudonyms, as ``deid run --labels`` does;
    images whose key the CSV does not name keep their label. The manifest is
    rewritten atomically and the counts recorded in the audit trail.
    """
    from anonymization.audit import AuditError, open_trail, resolve_key_path
    from anonymization.audit.keys import SIGNING_KEY_NAME
    from anonymization.batch import STATE_FILE, key_fingerprint
    from anonymization.keys import load_or_create_secret
    from anonymization.manifest import COLUMNS, MANIFEST_FILE, read_manifest
    from medfed.files import write_file

    dst, key_file = Path(dst), Path(key_file)
    manifest = dst / MANIFEST_FILE
    if not (dst / STATE_FILE).is_file() or not manifest.is_file():
        raise LabelsError(f"{dst} is not a de-identified store (no {STATE_FILE} or {MANIFEST_FILE}); pass the DST "
                          "of `medfed deid run` or `medfed site receive`")
    if not key_file.is_file():
        raise LabelsError(f"key file {key_file} does not exist; pass the site key the store was de-identified with")
    secret = load_or_create_secret(key_file)
    try:
        recorded = json.loads((dst / STATE_FILE).read_text("utf-8")).get("key_fingerprint")
    except (OSError, ValueError):
        recorded = None
    if recorded != key_fingerprint(secret):
        raise LabelsError(f"{dst} was de-identified with a different site key; pass that key (--key)")
    try:
        profile = json.loads((dst / STATE_FILE).read_text("utf-8")).get("profile", [])
    except (OSError, ValueError):
        profile = []
    table = read_labels(labels, Pseudonymizer(secret), retain_uids="retain_uids" in profile)
    label_map, column = table.labels, table.column
    rows = read_manifest(manifest)
    held = {row[column] for row in rows if row[column]}
    labelled = 0
    for row in rows:
        if row[column] in label_map:
            row["label"] = label_map[row[column]]
            labelled += 1
    unknown = sorted(k for k in label_map if k not in held)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_file(manifest, buffer.getvalue().encode("utf-8"), 0o644)
    audit_dir = Path(audit) if audit is not None else dst / "audit"
    key_path = resolve_key_path(audit_dir, audit_key, key_file.parent / SIGNING_KEY_NAME)
    try:
        with open_trail(audit_dir, audit_key=key_path, default_key=key_path, forbidden=(dst,)) as trail:
            trail.append("labels_attached", matched=len(label_map) - len(unknown), unmatched=len(unknown),
                         rows_labelled=labelled, unknown=unknown[:1000])
    except AuditError as err:
        raise LabelsError(str(err)) from None
    return LabelReport(len(label_map) - len(unknown), len(unknown), unknown, labelled, manifest)
