"""`medfed model ...`: sign a run's model as the consortium's release, and verify one before use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

console = Console()
model_app = typer.Typer(help="The consortium's signed model releases: release, verify, calibrate.",
                        no_args_is_help=True)

_RELEASE = Annotated[Path, typer.Argument(help="A release folder (model.pt, study.json, card.json, signature).")]
_PUBLIC = Annotated[Path, typer.Option(
    "--public-key",
    help="The consortium's release public key: release-signing.pub, or the site kit folder holding it.")]


def _fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


@model_app.command("release")
def release(
    run_dir: Annotated[Path, typer.Argument(help="The run's output folder (its out-dir: metrics.json, model.pt).")],
    key: Annotated[Path, typer.Option("--key", help="The consortium's release key (release-signing.key).")],
    server_round: Annotated[int | None, typer.Option(
        "--round", min=1, help="Release the checkpoint of this round instead of the final model.")] = None,
    out: Annotated[Path | None, typer.Option(help="Release folder to write (default: RUN_DIR/release).")] = None,
) -> None:
    """Sign a run's model, its study and its model card as a release the sites can verify."""
    from anonymization.audit_keys import AuditKeyError, load_signing_key
    from coordinator.release import release_run
    from medfed.release import ReleaseError
    from medfed.settings import ConfigError

    try:
        path = release_run(run_dir, load_signing_key(key), server_round=server_round, out=out)
    except (ReleaseError, AuditKeyError, ConfigError) as err:
        _fail(str(err))
    console.print(f"release written and signed: {path}")


@model_app.command("verify")
def verify(release_dir: _RELEASE, public_key: _PUBLIC) -> None:
    """Check a release's signature and every file's hash; print its model card. Exit 1 if it must not be used."""
    from medfed.release import ReleaseError, public_key_of, verify_release

    try:
        rel = verify_release(release_dir, public_key_of(public_key))
    except ReleaseError as err:
        console.print(f"[bold red]refused:[/] {err}")
        raise typer.Exit(1) from None
    print_card(rel.card, rel.key_id)


def print_card(card: dict, key_id: str) -> None:
    """The model card as a person reads it."""
    console.print(f"[bold green]verified[/]: signed by release key {key_id}")
    table = Table(title=f"model card: {card.get('name')}", show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value")
    for field in ("network", "task", "modality", "image_size", "run", "rounds", "medfed_version", "date",
                  "fab_sha256", "weights_sha256", "device_uid", "study_sha256"):
        table.add_row(field, str(card.get(field)))
    table.add_row("classes", ", ".join(card.get("classes", [])))
    table.add_row("preprocessing", json.dumps(card.get("preprocessing", {}), separators=(",", ":")))
    console.print(table)
    sites = Table(title="sites (their own DP releases)")
    for col in ("site", "ε", "ε cap", "δ", "AUC"):
        sites.add_column(col, justify="right" if col != "site" else "left")
    for name, s in card.get("sites", {}).items():
        auc = s.get("metrics", {}).get("auc")
        sites.add_row(name, _num(s.get("epsilon")), _num(s.get("epsilon_cap")), f"{s.get('delta')}", _num(auc))
    console.print(sites)
    pooled = card.get("metrics", {})
    if pooled:
        console.print("pooled: " + ", ".join(f"{k} {_num(v)}" for k, v in pooled.items()
                                             if isinstance(v, int | float)))


def _num(v: object) -> str:
    return "n/a" if not isinstance(v, int | float) or v != v else f"{v:.3f}"
