"""`medfed train` and `medfed simulate`: a study on your own de-identified folders, before any deployment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from medfed.cli.output import console, fail, figure, round_table

_STUDY = Annotated[Path, typer.Option("--study", help="The study file (`medfed study init` writes one).")]
_RUN_CONFIG = Annotated[list[str] | None, typer.Option(
    "--run-config", help="Run settings 'key=value ...' as in pyproject's [tool.flwr.app.config] (e.g. 'lr=0.02').")]



def _overrides(items: list[str] | None) -> dict[str, Any]:
    from coordinator.launch import parse_overrides

    return parse_overrides(items or [])


def _load(study_file: Path) -> Any:
    from models.study import load_study

    return load_study(study_file)


def train(
    deid_dir: Annotated[Path, typer.Argument(help="This site's de-identified store (`medfed deid run` output).")],
    study_file: _STUDY,
    epsilon_cap: Annotated[float, typer.Option("--epsilon-cap", min=0.0, help="ε this training may spend.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for model.pt, metrics.json and the ledger.")],
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Rounds of local DP-SGD (local-epochs each).")] = 20,
    delta: Annotated[float, typer.Option(help="δ (must be below 1/training images).")] = 1e-5,
    site_toml: Annotated[Path | None, typer.Option(
        "--site", help="This site's site.toml: pay from its lifetime ledger instead of one in OUT.")] = None,
    run_config: _RUN_CONFIG = None,
) -> None:
    """Train the study at this site alone (the local-only baseline), under DP, and score it on its test split."""
    from medfed.settings import ConfigError, SiteConfig
    from medfed.studies import StudyRunError, train_site
    from models.dataset import DatasetError
    from models.registry import NetworkError

    try:
        study = _load(study_file)
        site = SiteConfig.from_toml(site_toml) if site_toml is not None else None
        result = train_site(deid_dir, study, study_file.resolve().parent, out, epsilon_cap=epsilon_cap, delta=delta,
                            overrides={"num_server_rounds": rounds, **_overrides(run_config)}, site=site)
    except (ConfigError, StudyRunError, DatasetError, NetworkError) as err:
        fail(str(err))
    _print_test(result.test_metrics, f"{study.name}: test split of {deid_dir}")
    if result.declined:
        console.print(f"[yellow]stopped early:[/] {result.declined}")
    console.print(f"{result.rounds_trained} round(s) trained, ε {result.epsilon:.3f} of {result.epsilon_cap:g}\n"
                  f"model:   {result.model}\nmetrics: {result.metrics}")


def simulate(
    study_file: _STUDY,
    site: Annotated[list[str], typer.Option(
        "--site", help="NAME=DEID_DIR, once per site (each a `medfed deid run` store).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the sites' state and the coordinator's outputs.")],
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Federated rounds.")] = 20,
    epsilon_cap: Annotated[float, typer.Option("--epsilon-cap", min=0.0, help="Each site's ε cap.")] = 8.0,
    delta: Annotated[float, typer.Option(help="Each site's δ.")] = 1e-5,
    run_config: _RUN_CONFIG = None,
) -> None:
    """Run the deployment's ServerApp and ClientApps in Flower's Simulation Engine over your stores."""
    from medfed.settings import ConfigError
    from medfed.studies import StudyRunError, prepare_stores, simulate_study

    stores: dict[str, Path] = {}
    for spec in site:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            fail(f"--site {spec!r}: write NAME=DEID_DIR, e.g. --site hospital-a=/data/deid-a")
        if name in stores:
            fail(f"--site {name} is given twice; give each site once")
        stores[name] = Path(folder)
    if len(stores) < 2:
        fail("a federation needs at least two sites: give --site NAME=DEID_DIR twice or more")
    if out.exists() and any(out.iterdir()):
        fail(f"{out} is not empty; choose a fresh --out folder")
    try:
        study = _load(study_file)
        sites = prepare_stores(out.resolve(), stores, study, epsilon_cap=epsilon_cap, delta=delta)
        result = simulate_study(study, study_file.resolve().parent, sites, out,
                                overrides={"num_server_rounds": rounds, **_overrides(run_config)})
    except (ConfigError, StudyRunError) as err:
        fail(str(err))
    print_run(result.metrics)
    console.print(f"simulation {result.seconds:.0f}s\nmodel:   {result.model}\nmetrics: {result.metrics}\n"
                  f"plot:    {result.plot}\nrelease: {result.release}")
    from coordinator.release import delivery_line

    if line := delivery_line(result.release):
        console.print(f"release {line}")


def print_run(metrics_json: Path) -> None:
    """The per-round table and the pooled per-class figures of the last round."""
    import json

    metrics = json.loads(metrics_json.read_text())
    console.print(round_table(metrics["rounds"], "global model per round (pooled over the sites' test splits)"))


def _print_test(m: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    table.add_column("class")
    names = [k for k in ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "calibration-error")
             if k in m.get("macro", {})]
    for k in names:
        table.add_column(k, justify="right")
    for cls, row in list(m.get("per-class", {}).items()) + [("macro", m.get("macro", {}))]:
        table.add_row(cls, *(figure(row.get(k)) for k in names))
    console.print(table)



def register_study_commands(app: typer.Typer) -> None:
    """Add `train` and `simulate` to the `medfed` command."""
    app.command("train")(train)
    app.command("simulate")(simulate)


__all__ = ["register_study_commands"]
