"""The one `medfed` command. Each subcommand imports only what it needs.

`medfed deid ...` in particular never imports torch or Flower, so it runs on
the PACS-side machine that has neither.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from medfed import logs


def _keep_argument_help() -> None:
    """Typer 0.20 sets an argument's help before calling click's Parameter.__init__, which (click 8.3+) resets it
    to None: every positional argument would show no help. Set it again after."""
    from typer.core import TyperArgument

    init = TyperArgument.__init__
    if getattr(init, "keeps_help", False):
        return

    @functools.wraps(init)
    def __init__(self: TyperArgument, *args: object, help: str | None = None, **kwargs: object) -> None:  # noqa: A002
        init(self, *args, help=help, **kwargs)  # type: ignore[arg-type]
        self.help = help

    __init__.keeps_help = True  # type: ignore[attr-defined]
    TyperArgument.__init__ = __init__  # type: ignore[method-assign]


_keep_argument_help()

app = typer.Typer(
    name="medfed",
    help="Federated learning for a consortium of hospitals: de-identify DICOM at each site, "
    "train with differential privacy, aggregate with Flower.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
deid_app = typer.Typer(help="De-identify DICOM at the site (PS3.15 Annex E).", no_args_is_help=True)
app.add_typer(deid_app, name="deid")
from medfed.cli_reid import register_reid_commands  # noqa: E402 - light: cryptography only

register_reid_commands(deid_app)
from medfed.cli_audit import audit_app  # noqa: E402 - light: no torch/flwr at import

app.add_typer(audit_app, name="audit")
from medfed.cli_privacy import privacy_app  # noqa: E402 - light: torch/opacus only inside its commands

app.add_typer(privacy_app, name="privacy")
from medfed.cli_deploy import register_deploy_commands  # noqa: E402 - light: no torch/flwr at import
from medfed.cli_model import model_app  # noqa: E402 - light: torch inside commands
from medfed.cli_model import predict as predict_command  # noqa: E402
from medfed.cli_study import register_study_commands  # noqa: E402 - light: torch only inside its commands

register_deploy_commands(app)
register_study_commands(app)
app.add_typer(model_app, name="model")
app.command("predict")(predict_command)
from medfed.cli_data import register_data_commands  # noqa: E402 - light: torch/monai only inside its commands

register_data_commands(app)

console = Console()
log = logging.getLogger("medfed")


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


def _version(value: bool) -> None:
    if value:
        from medfed import __version__

        typer.echo(f"medfed {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print medfed's version and exit.")] = False,
) -> None:
    logs.setup(verbose)


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to create the hospitals in.")],
    sites: Annotated[int, typer.Option(help="Number of hospitals.")] = 3,
    patients: Annotated[int, typer.Option(help="Patients at the largest hospital; others scale 10:5:2.")] = 200,
    seed: Annotated[int, typer.Option(help="Same seed, same files.")] = 0,
    task: Annotated[str, typer.Option(
        help="binary, multiclass (normal + grades) or multilabel (findings).")] = "binary",
    classes: Annotated[int | None, typer.Option(
        help="Classes: multiclass 3-5 (default 3), multilabel 2-4 findings (default 2); binary is 2.")] = None,
    modality: Annotated[str, typer.Option(help="CT (abdomen slices) or DX (chest radiographs, MONOCHROME1).")] = "CT",
    image_size: Annotated[int, typer.Option("--image-size", help="Network input size written to study.toml.")] = 64,
    public: Annotated[int, typer.Option(
        min=0, help="Also write N labelled public images for pretraining to OUT/public (another seed space).")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace hospitals synth wrote there before.")] = False,
) -> None:
    """Make synthetic hospitals: raw DICOM full of (fake) PHI, a label table per site, and OUT/study.toml."""
    from medfed.settings import ConfigError
    from medfed.synth import STUDY_FILE, generate_hospitals, generate_public

    try:
        infos = generate_hospitals(out, sites=sites, patients=patients, seed=seed, task=task, classes=classes,
                                   modality=modality.upper(), image_size=image_size, overwrite=overwrite)
        pub = generate_public(out / "public", public, task, classes, modality.upper(), seed,
                              image_size=image_size) if public else None
    except (ValueError, FileExistsError, ConfigError) as err:
        _fail(str(err))
    table = Table(title=f"synthetic {modality.upper()} hospitals in {out} ({task})")
    for col in ("site", "patients", "images", "per class", "DICOM", "labels"):
        table.add_column(col)
    for i in infos:
        counts = ", ".join(f"{k} {v}" for k, v in i.class_counts.items())
        table.add_row(i.name, str(i.patients), str(i.images), counts, str(i.dicom_dir), str(i.labels_csv))
    console.print(table)
    console.print(f"study: {out / STUDY_FILE}")
    if pub is not None:
        console.print(f"public set: {pub.path} ({pub.images} images)")


@deid_app.command("run")
def deid_run(
    src: Annotated[Path, typer.Argument(help="Raw DICOM folder (e.g. a PACS export). Never modified.")],
    dst: Annotated[Path, typer.Argument(help="De-identified store to write (images, manifest.csv, audit/).")],
    key: Annotated[Path, typer.Option("--key", help="Site secret; created with mode 0600 if missing.")],
    labels: Annotated[Path | None, typer.Option(help="CSV with AccessionNumber,label.")] = None,
    quarantine: Annotated[Path | None, typer.Option(help="Where refused files go (default: DST-quarantine).")] = None,
    audit: Annotated[Path | None, typer.Option(help="Audit trail folder (default: DST/audit).")] = None,
    audit_key: Annotated[Path | None, typer.Option(
        "--audit-key", help="Ed25519 key sealing the audit trail (default: the trail's own, else next to --key).")] = None,
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
        _fail(str(err))
    except OSError as err:  # a disk that fails under the run: say which path and why, no traceback
        _fail(f"{err.filename or dst}: {err.strerror or err}; check that disk and its permissions, "
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
        _fail(f"no image matched a row of {labels}: check that its key column holds these images' AccessionNumber "
              "(the original, before de-identification); a site refuses to train on a store with no label", 1)


@deid_app.command("labels")
def deid_labels(
    dst: Annotated[Path, typer.Argument(help="De-identified store (`medfed deid run` or `medfed site receive` DST).")],
    key: Annotated[Path, typer.Option("--key", help="The site secret the store was de-identified with.")],
    labels: Annotated[Path, typer.Option("--labels", help="CSV with AccessionNumber,label.")],
    audit: Annotated[Path | None, typer.Option(help="Audit trail folder (default: DST/audit).")] = None,
    audit_key: Annotated[Path | None, typer.Option("--audit-key", help="Key sealing the audit trail.")] = None,
) -> None:
    """Attach labels that arrived after the images to an existing store, through the site's pseudonyms."""
    from anonymization.errors import DeidError
    from anonymization.labels import attach_labels

    try:
        report = attach_labels(dst, key, labels, audit=audit, audit_key=audit_key)
    except DeidError as err:
        _fail(str(err))
    console.print(report.line(), soft_wrap=True)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Working folder for the demo (replaced if it holds an old demo).")] = Path("demo-out"),
    sites: Annotated[int, typer.Option(min=2, help="Number of synthetic hospitals.")] = 3,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 20,
    device: Annotated[Device, typer.Option(help="Where sites train.")] = Device.cpu,
    patients: Annotated[int, typer.Option(min=4, help="Patients at the largest hospital.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed for data and model.")] = 0,
    epsilon_cap: Annotated[float, typer.Option(help="Each site's privacy cap ε.")] = 8.0,
    delta: Annotated[float, typer.Option(help="Each site's δ (must be below 1/n).")] = 1e-5,
) -> None:
    """Synthetic hospitals → local de-identification → DP federated training (Flower simulation) → summary."""
    import shutil

    from medfed.demo import run_demo

    if out.exists():
        if not (out / "sites").exists() and any(out.iterdir()):
            _fail(f"{out} exists and is not a medfed demo folder; choose another --out")
        shutil.rmtree(out)
    summary = run_demo(out, sites=sites, rounds=rounds, device=device.value, patients=patients, seed=seed,
                       epsilon_caps=[epsilon_cap] * sites, delta=delta)
    _print_demo(summary)


def _print_demo(s: DemoSummary) -> None:  # type: ignore[name-defined]  # noqa: F821
    rounds = Table(title="Global model per round (AUC on the sites' test splits)")
    rounds.add_column("round", justify="right")
    rounds.add_column("AUC", justify="right")
    rounds.add_column("accuracy", justify="right")
    rounds.add_column("sites trained", justify="right")
    rounds.add_column("seconds", justify="right")
    for r in s.rounds:
        trained = sum(1 for v in r["sites"].values() if v["status"] == "trained")
        auc = r.get("auc")
        acc = r["evaluate"].get("accuracy")
        rounds.add_row(str(r["round"]), "n/a" if auc is None else f"{auc:.3f}",
                       "n/a" if acc is None else f"{acc:.3f}", f"{trained}/{len(r['sites'])}", f"{r['seconds']:.1f}")
    console.print(rounds)
    sites = Table(title="Privacy spent per site (record-level DP)")
    sites.add_column("site", no_wrap=True)
    for col in ("images", "quarant.", "ε spent", "ε cap", "δ", "trained", "declined"):
        sites.add_column(col, justify="right", no_wrap=True)
    for o in s.sites:
        sites.add_row(o.name, str(o.images), str(o.quarantined), f"{o.epsilon:.2f}", f"{o.epsilon_cap:g}",
                      f"{o.delta:g}", str(o.rounds_trained), str(o.rounds_declined))
    console.print(sites)
    for o in s.sites:
        for reason in o.decline_reasons:
            console.print(f"[yellow]declined:[/] {reason}")
    per_round = [r["seconds"] for r in s.rounds]
    console.print(
        f"wall time {s.wall_seconds:.0f}s (simulation {s.simulation_seconds:.0f}s, "
        f"{sum(per_round) / max(1, len(per_round)):.1f}s per round)\n"
        f"model:   {s.model}\nmetrics: {s.metrics}\nplot:    {s.plot}"
    )


def _absolute(value: object) -> object:
    if isinstance(value, Path):
        return Path(os.path.abspath(value.expanduser()))
    if isinstance(value, list | tuple) and value and all(isinstance(v, Path) for v in value):
        return [Path(os.path.abspath(v.expanduser())) for v in value]
    return value


def paths_from_cwd(func: Callable[..., object]) -> Callable[..., object]:
    """Every path a user types means what it means where they typed it: made absolute before the command runs.

    So no command depends on the current folder later (a child process with another cwd, a path handed to
    Flower or nginx, a file name printed back).
    """

    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> object:
        return func(*(_absolute(a) for a in args), **{k: _absolute(v) for k, v in kwargs.items()})

    wrapper.paths_from_cwd = True  # type: ignore[attr-defined]
    return wrapper


def _every_command(typer_app: typer.Typer) -> list[typer.models.CommandInfo]:
    found = list(typer_app.registered_commands)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            found.extend(_every_command(group.typer_instance))
    return found


for _command in _every_command(app):
    if _command.callback is not None and not getattr(_command.callback, "paths_from_cwd", False):
        _command.callback = paths_from_cwd(_command.callback)


if __name__ == "__main__":
    app()
