"""`medfed synth` and `medfed demo`: synthetic hospitals, and the whole pipeline on them in one command."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from medfed.cli.output import console, fail, round_table

if TYPE_CHECKING:
    from medfed.demo import DemoSummary


class Device(StrEnum):
    cpu = "cpu"
    cuda = "cuda"


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
        fail(str(err))
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


def demo(
    out: Annotated[Path, typer.Option(
        help="Working folder for the demo (replaced if it holds an old demo).")] = Path("demo-out"),
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
            fail(f"{out} exists and is not a medfed demo folder; choose another --out")
        shutil.rmtree(out)
    summary = run_demo(out, sites=sites, rounds=rounds, device=device.value, patients=patients, seed=seed,
                       epsilon_caps=[epsilon_cap] * sites, delta=delta)
    _print_demo(summary)


def _print_demo(s: DemoSummary) -> None:
    from coordinator.release import delivery_line

    console.print(round_table(s.rounds, "global model per round (pooled over the sites' test splits)"))
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
        f"model:   {s.model}\nmetrics: {s.metrics}\nplot:    {s.plot}\nrelease: {s.release}  (check it: medfed model "
        f"verify {s.release} --public-key {s.out / 'release-signing.pub'})"
    )
    if line := delivery_line(s.release):
        console.print(f"release {line}")


def register_demo_commands(app: typer.Typer) -> None:
    """Add `synth` and `demo` to the `medfed` command."""
    app.command()(synth)
    app.command()(demo)
