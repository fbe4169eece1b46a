"""The `medfed` command: subcommands wired, clear errors, exit codes."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import app

runner = CliRunner()


def test_help_lists_the_subcommands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("synth", "deid", "demo"):
        assert name in result.output


@pytest.mark.integration
def test_synth_then_deid_through_the_cli(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    result = runner.invoke(app, ["synth", str(raw), "--sites", "2", "--patients", "6", "--seed", "1"])
    assert result.exit_code == 0, result.output
    site = raw / "hospital-a"
    assert (site / "labels.csv").exists() and any((site / "dicom").rglob("*.dcm"))

    dst = tmp_path / "site-a" / "deid"
    result = runner.invoke(app, ["deid", "run", str(site / "dicom"), str(dst),
                                 "--key", str(tmp_path / "site-a" / "site.key"),
                                 "--labels", str(site / "labels.csv"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "de-identified" in result.output
    rows = list(csv.DictReader((dst / "manifest.csv").open()))
    assert rows and all(r["label"] in {"0", "1"} for r in rows)
    assert (tmp_path / "site-a" / "site.key").stat().st_mode & 0o777 == 0o600


def test_deid_with_missing_source_fails_clearly(tmp_path: Path) -> None:
    result = runner.invoke(app, ["deid", "run", str(tmp_path / "nope"), str(tmp_path / "out"),
                                 "--key", str(tmp_path / "k")])
    assert result.exit_code == 2
    assert "error" in result.output.lower() and "nope" in result.output


def test_demo_refuses_to_clobber_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    result = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "not a medfed demo folder" in result.output
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_round_table_shows_each_rounds_figures_and_says_na_for_what_is_missing() -> None:
    """The one per-round table (demo, simulate, deploy): a declined site, a round without evaluation."""
    from rich.console import Console

    from medfed.cli.output import round_table

    rounds = [
        {"round": 1, "auc": 0.71234, "evaluate": {"accuracy": 0.65}, "seconds": 3.21,
         "sites": {"1": {"status": "trained"}, "2": {"status": "declined"}}},
        {"round": 2, "auc": None, "sites": {"1": {"status": "trained"}, "2": {"status": "trained"}}},
    ]
    console = Console(width=120, record=True)
    console.print(round_table(rounds, "per round"))
    lines = [line.split("│")[1:-1] for line in console.export_text().splitlines() if line.count("│") == 6]
    cells = [[c.strip() for c in line] for line in lines]
    assert cells[-2:] == [["1", "0.712", "0.650", "1/2", "3.2"], ["2", "n/a", "n/a", "2/2", "n/a"]]
