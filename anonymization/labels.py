"""The labels CSV (``AccessionNumber,label``), turned into pseudonyms on read.

Original accession numbers live only in memory here: the map handed on is
keyed by the accession pseudonym, and errors name line numbers, never values.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from anonymization.errors import LabelsError
from anonymization.pseudonyms import Pseudonymizer

REQUIRED = ("AccessionNumber", "label")
VALID_LABELS = frozenset({"0", "1"})


def load_labels(path: Path, pseudonymizer: Pseudonymizer) -> dict[str, str]:
    """Map accession pseudonym -> "0"/"1"; raise :class:`LabelsError` on any malformed line."""
    path = Path(path)
    try:
        fh = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115 - closed by the with below
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


@dataclass
class LabelReport:
    """What ``medfed deid labels`` did: counts, and the CSV's keys the store does not know (as pseudonyms)."""

    matched: int  # accession numbers of the CSV found in the store
    unmatched: int  # accession numbers of the CSV the store does not hold (yet)
    unknown: list[str]  # those, as accession pseudonyms (never the original numbers)
    rows_labelled: int  # manifest rows whose label was set
    manifest: Path

    def line(self) -> str:
        text = (f"labels matched {self.matched}, did not match {self.unmatched}; "
                f"{self.rows_labelled} image(s) labelled in {self.manifest}")
        if self.unknown:
            shown = ", ".join(self.unknown[:20]) + (" ..." if len(self.unknown) > 20 else "")
            text += f"; unknown accession pseudonyms: {shown}"
        return text


def attach_labels(dst: Path, key_file: Path, labels: Path, *, audit: Path | None = None,
                  audit_key: Path | None = None) -> LabelReport:
    """Label an existing store's manifest from a labels CSV (labels that arrive after the images).

    Keys are matched through the site's pseudonyms, as ``deid run --labels`` does;
    images whose accession the CSV does not name keep their label. The manifest is
    rewritten atomically and the counts recorded in the audit trail.
    """
    from anonymization.audit import AuditError, open_trail, resolve_key_path
    from anonymization.audit_keys import SIGNING_KEY_NAME
    from anonymization.batch import STATE_FILE, _key_fingerprint
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
    if recorded != _key_fingerprint(secret):
        raise LabelsError(f"{dst} was de-identified with a different site key; pass that key (--key)")
    label_map = load_labels(labels, Pseudonymizer(secret))
    rows = read_manifest(manifest)
    held = {row["accession"] for row in rows if row["accession"]}
    labelled = 0
    for row in rows:
        if row["accession"] in label_map:
            row["label"] = label_map[row["accession"]]
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
