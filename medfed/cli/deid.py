"""`medfed deid ...`: de-identify DICOM at the site (PS3.15 Annex E) and attach labels; the officer's commands.

Light to import: `medfed deid run` runs on the PACS-side machine that has neither torch nor Flower.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medfed.cli.output import console, fail
from medfed.cli.reid import register_reid_commands

deid_app = typer.Typer(help="De-identify DICOM at the site (PS3.15 Annex E).", no_args_is_help=True)
register_reid_commands(deid_app)


@deid_app.command("run")
def deid_run(
    src: Annotated[Path, typer.Argument(help="Raw DICOM folder (e.g. a PACS export). Never modified.")],
    dst: Annotated[Path, typer.Argument(help="De-identified store to write (images, manifest.csv, audit/).")],
    key: Annotated[Path, typer.Option("--key", help="Site secret; created with mode 0600 if missing.")],
    labels: Annotated[Path | None, typer.Option(help="Labels CSV: a key column (AccessionNumber, StudyInstanceUID, "
                                                    "SeriesInstanceUID or SOPInstanceUID) and label.")] = None,
    quarantine: Annotated[Path | None, typer.Option(help="Where refused files go (default: DST-quarantine).")] = None,
    audit: Annotated[Path | None, typer.Option(help="Audit trail folder (default: DST/audit).")] = None,
    audit_key: Annotated[Path | None, typer.Option(
        "--audit-key",
        help="Ed25519 key sealing the audit trail (default: the trail's own, else next to --key).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    policy: Annotated[Path | None, typer.Option(
        "--policy", help="Site de-identification policy (TOML; see anonymization/data/policy.example.toml).")] = None,
    reid_table: Annotated[Path | None, typer.Option(
        "--reid-table", help="Encrypted re-identification table to append to (overrides table = ... in the "
        "policy's reid section).")] = None,
    clean_pixels: Annotated[bool, typer.Option(
        "--clean-pixels", help="Clean Pixel Data option: blank burned-in text found by OCR (needs tesseract-ocr) "
        "instead of quarantining such images; recorded in the audit trail's policy.")] = False,
) -> None:
    """De-identify every file under SRC into DST, or quarantine it with a reason."""
    from anonymization.batch import DeidError, run_deid

    try:
        summary = run_deid(src, dst, key, labels=labels, quarantine=quarantine, audit=audit, workers=workers,
                           audit_key=audit_key,
                           progress=not no_progress, policy=policy, reid_table=reid_table,
                           clean_pixel_data=True if clean_pixels else None)
    except DeidError as err:
        fail(str(err))
    except OSError as err:  # a disk that fails under the run: say which path and why, no traceback
        fail(f"{err.filename or dst}: {err.strerror or err}; check that disk and its permissions, "
             "then run the same command again (it resumes)")
    console.print(summary.line())
    _report_labels(dst, labels)


def _report_labels(dst: Path, labels: Path | None) -> None:
    """How many images matched a label: a table whose keys match nothing must not pass silently."""
    from anonymization.manifest import MANIFEST_FILE, label_counts

    labelled, unlabelled = label_counts(dst / MANIFEST_FILE)
    total = labelled + unlabelled
    if labels is None:
        if total and not labelled:
            console.print(f"[yellow]labels:[/] none given; the {total} image(s) are unlabelled and this store cannot "
                          "train until `medfed deid run` is run again with --labels LABELS.csv")
        return
    console.print(f"labels: {labelled} of {total} image(s) matched a row of {labels} ({unlabelled} unlabelled)")
    if total and not labelled:
        fail(f"no image matched a row of {labels}: check that its key column holds these images' AccessionNumber "
             "(the original, before de-identification); a site refuses to train on a store with no label", 1)


@deid_app.command("labels")
def deid_labels(
    dst: Annotated[Path, typer.Argument(help="De-identified store (`medfed deid run` or `medfed site receive` DST).")],
    key: Annotated[Path, typer.Option("--key", help="The site secret the store was de-identified with.")],
    labels: Annotated[Path, typer.Option(
        "--labels", help="Labels CSV: a key column (AccessionNumber, StudyInstanceUID, SeriesInstanceUID or "
        "SOPInstanceUID) and label.")],
    audit: Annotated[Path | None, typer.Option(help="Audit trail folder (default: DST/audit).")] = None,
    audit_key: Annotated[Path | None, typer.Option("--audit-key", help="Key sealing the audit trail.")] = None,
) -> None:
    """Attach labels that arrived after the images to an existing store, through the site's pseudonyms."""
    from anonymization.errors import DeidError
    from anonymization.labels import attach_labels

    try:
        report = attach_labels(dst, key, labels, audit=audit, audit_key=audit_key)
    except DeidError as err:
        fail(str(err))
    console.print(report.line(), soft_wrap=True)
