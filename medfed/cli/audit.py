"""`medfed audit ...`: verify a site's audit trail, report on it, export and rotate its key.

Kept apart from the other commands and light to import (no torch, no Flower): a
privacy officer or an outside auditor runs these on a plain machine with a
copy of the trail folder and the site's exported public key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medfed.cli.output import fail

audit_app = typer.Typer(
    help="The site's tamper-evident audit trail: verify it, report on it, export or rotate its signing key.",
    no_args_is_help=True,
)

_DIR = Annotated[Path, typer.Argument(help="Audit trail folder (e.g. DST/audit).")]
_PUBLIC = Annotated[
    Path | None,
    typer.Option("--public-key", help="The site's exported public key (PEM): check the seals against it."),
]
_ANCHORS = Annotated[
    list[Path] | None,
    typer.Option("--anchors", help="The coordinator's receipts of the site's audit anchors: a run's out-dir (or "
                 "a folder of runs) or its anchors.jsonl; repeat for several runs. Every anchor of the site must "
                 "name a record of the trail with that exact hash."),
]
_SITE = Annotated[
    str | None,
    typer.Option("--site", help="Check the anchors of this site (default: the name the trail's egress records "
                 "give)."),
]
_KEY = Annotated[
    Path | None,
    typer.Option("--audit-key", help="The site's private audit key (default: the one the trail records)."),
]



def _public(path: Path | None) -> bytes | None:
    from anonymization.audit.keys import AuditKeyError, load_public_key

    if path is None:
        return None
    try:
        return load_public_key(path)
    except AuditKeyError as err:
        fail(str(err))
    return None


def _signer_path(directory: Path | None, audit_key: Path | None) -> Path:
    from anonymization.audit import read_meta

    if audit_key is not None:
        return audit_key
    if directory is None:
        fail("say which key: pass the trail folder (DIR) or --audit-key FILE")
    assert directory is not None
    recorded = read_meta(directory).get("signing_key")
    if not recorded:
        fail(f"{directory} records no signing key (is it an audit trail folder?); pass --audit-key FILE")
    return Path(str(recorded))


@audit_app.command("verify")
def verify(directory: _DIR, public_key: _PUBLIC = None, anchors: _ANCHORS = None, site: _SITE = None) -> None:
    """Check the hash chain, the segments and every seal, and with --anchors the heads the coordinator received.

    Exit codes: 0 all check; 1 BROKEN, evidence of tampering or damage (the first break is named), or NOT ANCHORED (the receipts hold no anchor of the site); 2 a usage error (not a folder, a bad option or receipts file); 3 INCOMPLETE, the end is not sealed (a crash, or records cut off); 4 NO TRAIL, the folder holds no audit records (wrong folder?).
    """  # noqa: E501 - one paragraph per line: --help wraps it
    from anonymization.audit.anchors import AnchorError, load_anchors
    from anonymization.audit.verify import verify_trail

    if not directory.is_dir():
        fail(f"{directory} is not a folder; pass the audit trail folder (e.g. DST/audit)")
    if site is not None and not anchors:
        fail("--site picks whose anchors to check; pass the coordinator's receipts with --anchors too")
    kept = None
    if anchors:
        try:
            kept = load_anchors(anchors)
        except AnchorError as err:
            fail(str(err))
    result = verify_trail(directory, public_key=_public(public_key), anchors=kept, site=site)
    typer.echo(f"{result.summary()} [{result.seconds:.2f}s]")
    raise typer.Exit(result.exit_code)


@audit_app.command("report")
def report(
    directory: _DIR,
    out: Annotated[Path, typer.Option("--out", help="HTML file to write (self-contained).")] = Path(
        "audit-report.html"),
    public_key: _PUBLIC = None,
) -> None:
    """Write one self-contained HTML page for the privacy officer (verification status, files,
    actions, policy, privacy budget per round, what left the site)."""
    from anonymization.audit.report import write_report

    if not directory.is_dir():
        fail(f"{directory} is not a folder; pass the audit trail folder (e.g. DST/audit)")
    result = write_report(directory, out, public_key=_public(public_key))
    typer.echo(f"wrote {out}: {result.summary()}")


@audit_app.command("export-key")
def export_key(
    directory: Annotated[Path | None, typer.Argument(help="Audit trail folder (finds its key).")] = None,
    audit_key: _KEY = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the PEM here instead of stdout.")] = None,
) -> None:
    """Print the public half of the site's audit key (PEM): give it to whoever verifies the trail."""
    from anonymization.audit.keys import AuditKeyError, load_signing_key

    try:
        signer = load_signing_key(_signer_path(directory, audit_key))
    except AuditKeyError as err:
        fail(str(err))
        return
    pem = signer.public_pem()
    if out is None:
        typer.echo(pem.decode("ascii"), nl=False)
    else:
        out.write_bytes(pem)
        typer.echo(f"wrote public key {signer.key_id} to {out}", err=True)


@audit_app.command("rotate-key")
def rotate_key(directory: _DIR, audit_key: _KEY = None) -> None:
    """Replace the trail's signing key: the old key seals and endorses the new one, which replaces
    it in its file. Export the new public key afterwards."""
    from anonymization.audit import AuditError, AuditTrail
    from anonymization.audit.keys import load_signing_key

    try:
        path = _signer_path(directory, audit_key)
        with AuditTrail(directory, signer=load_signing_key(path)) as trail:
            old = trail.signer.key_id if trail.signer else "?"
            new = trail.rotate_key()
    except AuditError as err:
        fail(str(err))
        return
    typer.echo(f"rotated the audit key of {directory}: {old} -> {new.key_id} (in {path}); "
               "export the new public key with `medfed audit export-key`")
