"""``medfed deid reid-keygen`` / ``reid-lookup`` / ``reid-rekey`` / ``policy-check``: the privacy officer's side.

The site machine only ever holds the officer's *public* key and appends sealed rows
(``medfed deid run --policy ...``). These commands run on the officer's machine:
make the key pair, and open rows with the private key. Lookups print identifiers to
the officer's terminal only; nothing is logged (docs/design.md invariant 4).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from medfed.cli.output import console, fail

PASSPHRASE_ENV = "MEDFED_REID_PASSPHRASE"



def _passphrase(confirm: bool) -> bytes:
    """From $MEDFED_REID_PASSPHRASE (scripts, tests) or a hidden prompt."""
    value = os.environ.get(PASSPHRASE_ENV)
    if value is None:
        value = typer.prompt("passphrase for the officer's private key", hide_input=True,
                             confirmation_prompt=confirm)
    return value.encode("utf-8")


def register_reid_commands(deid_app: typer.Typer) -> None:
    """Add the officer's commands to ``medfed deid``."""

    @deid_app.command("reid-keygen")
    def reid_keygen(
        private: Annotated[Path, typer.Option("--private", help="Private key to create (officer's machine only).")],
        public: Annotated[Path, typer.Option("--public", help="Public key to create (goes in the site's policy).")],
    ) -> None:
        """Create the privacy officer's X25519 key pair for the re-identification table."""
        from anonymization.reid import ReidError, generate_officer_keys

        try:
            fp = generate_officer_keys(private, public, _passphrase(confirm=True))
        except ReidError as err:
            fail(str(err))
        console.print(f"private key {private} (keep it off the site machine), public key {public}; "
                      f"fingerprint {fp[:16]}")

    @deid_app.command("reid-lookup")
    def reid_lookup(
        table: Annotated[Path, typer.Argument(help="The site's encrypted re-identification table.")],
        pseudonym: Annotated[str | None, typer.Argument(
            help="Patient, accession or study UID pseudonym to look up (omit with --all).")] = None,
        officer_key: Annotated[Path, typer.Option("--officer-key", help="The officer's private key (PEM).")] = Path(
            "privacy-officer.key.pem"),
        all_rows: Annotated[bool, typer.Option("--all", help="Print every row.")] = False,
        site_key: Annotated[list[Path] | None, typer.Option(
            "--site-key", help="The site's audit public key (`medfed audit export-key`) rows must be signed "
            "with; repeat after a key rotation. Default: the key named in the table.")] = None,
        accept_unsigned: Annotated[bool, typer.Option(
            "--accept-unsigned", help="Read a format-1 table, whose rows are not signed.")] = False,
    ) -> None:
        """Print the original identifiers behind a pseudonym (needs the officer's private key)."""
        from anonymization.audit.keys import AuditKeyError, load_public_key
        from anonymization.reid import ReidError, is_legacy_private_key, load_private_key, lookup, read_table

        if pseudonym is None and not all_rows:
            fail("give a pseudonym to look up, or --all")
        try:
            site_keys = [load_public_key(p) for p in site_key or []]
            key = load_private_key(officer_key, _passphrase(confirm=False))
            options = {"site_keys": site_keys or None, "accept_unsigned": accept_unsigned}
            if all_rows:
                rows = list(read_table(table, key, **options))
            else:
                rows = lookup(table, key, pseudonym or "", **options)
        except (ReidError, AuditKeyError) as err:
            fail(str(err))
        if is_legacy_private_key(officer_key):
            console.print(f"[yellow]note:[/] {officer_key} uses the old key format (PBKDF2, 2,048 iterations); "
                          f"re-encrypt it with `medfed deid reid-rekey --officer-key {officer_key}`")
        if not rows:
            fail("no row of the table has that pseudonym", code=1)
        # One "field: value" line each (no table: UIDs must never be cut to fit a terminal).
        for i, r in enumerate(rows):
            if i:
                typer.echo("")
            for label, value in (
                ("patient pseudonym", r.patient_pseudonym), ("Patient ID", r.patient_id),
                ("accession pseudonym", r.accession_pseudonym), ("Accession Number", r.accession_number),
                ("study UID pseudonym", r.study_uid_pseudonym), ("Study Instance UID", r.study_uid),
            ):
                typer.echo(f"{label:>20}: {value}")

    @deid_app.command("reid-rekey")
    def reid_rekey(
        officer_key: Annotated[Path, typer.Option("--officer-key", help="The officer's private key (PEM).")] = Path(
            "privacy-officer.key.pem"),
    ) -> None:
        """Re-encrypt the officer's private key under scrypt (same key pair, same passphrase)."""
        from anonymization.reid import ReidError, rekey_officer_key

        try:
            rekey_officer_key(officer_key, _passphrase(confirm=False))
        except ReidError as err:
            fail(str(err))
        console.print(f"re-encrypted {officer_key} (scrypt); the public key and the table are unchanged")

    @deid_app.command("policy-check")
    def policy_check(
        policy: Annotated[Path, typer.Argument(help="Policy file (TOML) to validate.")],
    ) -> None:
        """Validate a policy file and print the profile and options it applies."""
        from anonymization.policy import PolicyError, load_policy

        try:
            loaded = load_policy(policy)
        except PolicyError as err:
            fail(str(err))
        for code in loaded.method_codes():
            console.print(f"{code.value}  {code.meaning}")
        console.print(f"Longitudinal Temporal Information Modified: {loaded.longitudinal_temporal_information}")
        if loaded.reid is not None:
            console.print(f"re-identification table: {loaded.reid.table} (key {loaded.reid.officer_public_key})")
