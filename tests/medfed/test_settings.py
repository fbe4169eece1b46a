"""Run and site configuration: bad values are refused with the field named."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medfed.settings import ConfigError, RunConfig, SiteConfig

ROOT = Path(__file__).resolve().parents[2]
#: Keys whose value in pyproject.toml deliberately differs from RunConfig's default, and why (none today).
DELIBERATE_DIFFERENCES: dict[str, str] = {}


def test_run_config_defaults_match_pyproject() -> None:
    """One default per setting: a run started from pyproject.toml and RunConfig() in code train alike."""
    import tomllib

    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = RunConfig().to_flower()
    # every key of pyproject is a field and every field is in pyproject
    assert set(table) == set(defaults)
    differing = {k: (v, defaults[k]) for k, v in table.items() if v != defaults[k] and k not in DELIBERATE_DIFFERENCES}
    assert not differing, f"pyproject.toml value vs RunConfig default: {differing}"
    assert RunConfig.from_flower(table).to_flower() == defaults


def test_version_is_stated_once() -> None:
    """pyproject.toml's [project] version is the one the package, the de-identification stamp and the CLI show."""
    import tomllib

    import medfed
    from anonymization.engine import MEDFED_VERSION, PROFILE_LINE

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert medfed.__version__ == MEDFED_VERSION == version
    assert f"medfed {version}" in PROFILE_LINE
    sources = [p for p in ROOT.glob("*/**/*.py") if ".venv" not in p.parts and "tests" not in p.parts]
    stated = [str(p.relative_to(ROOT)) for p in sources if f'"{version}"' in p.read_text()]
    assert not stated, f"the version is written out again in {stated}: take medfed.__version__"


def test_run_config_refuses_unknown_key_naming_it() -> None:
    with pytest.raises(ConfigError, match="num-server-round"):
        RunConfig.from_flower({"num-server-round": 3})


def test_run_config_refuses_bad_value_naming_it() -> None:
    with pytest.raises(ConfigError, match="strategy"):
        RunConfig.from_flower({"strategy": "fedsgd"})
    with pytest.raises(ConfigError, match="min-available-nodes"):
        RunConfig.from_flower({"min-train-nodes": 5, "min-available-nodes": 2})


def test_run_config_layers_over_base() -> None:
    base = RunConfig().with_overrides(num_server_rounds=7, lr=0.1)
    cfg = RunConfig.from_flower({"lr": 0.2}, base)
    assert (cfg.num_server_rounds, cfg.lr) == (7, 0.2)


def test_site_toml_roundtrip_and_relative_paths(tmp_path: Path) -> None:
    cfg = SiteConfig(name="hospital-a", data_dir=tmp_path / "deid", state_dir=tmp_path / "state",
                     epsilon_cap=8.0, delta=1e-5)
    path = tmp_path / "site.toml"
    path.write_text(cfg.to_toml())
    assert SiteConfig.from_toml(path) == cfg
    assert cfg.audit_path == tmp_path / "deid" / "audit"

    rel = tmp_path / "rel.toml"
    rel.write_text('name = "x"\ndata-dir = "deid"\nstate-dir = "state"\nepsilon-cap = 1.0\n')
    got = SiteConfig.from_toml(rel)
    assert got.data_dir == (tmp_path / "deid").resolve()


def test_site_toml_keeps_paths_with_quotes_and_backslashes(tmp_path: Path) -> None:
    odd = tmp_path / 'St "Mary\'s" \\ radiology'
    cfg = SiteConfig(name="h", data_dir=odd / "deid", state_dir=odd / "state", epsilon_cap=8.0,
                     approved_studies=("a" * 64,))
    path = tmp_path / "site.toml"
    path.write_text(cfg.to_toml())
    assert SiteConfig.from_toml(path) == cfg


def test_site_toml_errors_name_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text('name = "x"\ndata-dir = "d"\nstate-dir = "s"\nepsilon-cap = -1\n')
    with pytest.raises(ConfigError) as err:
        SiteConfig.from_toml(path)
    assert str(path) in str(err.value) and "epsilon-cap" in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        SiteConfig.from_toml(tmp_path / "missing.toml")


def test_site_caps_and_evaluation_noise(tmp_path: Path) -> None:
    from medfed.settings import DEFAULT_EVALUATION_NOISE

    cfg = SiteConfig(name="h", data_dir=tmp_path / "d", state_dir=tmp_path / "s", epsilon_cap=8.0,
                     epsilon_cap_per_run=3.0, evaluation_noise=20.0)
    path = tmp_path / "site.toml"
    path.write_text(cfg.to_toml())
    assert SiteConfig.from_toml(path) == cfg
    plain = SiteConfig(name="h", data_dir=tmp_path / "d", state_dir=tmp_path / "s", epsilon_cap=8.0)
    assert plain.epsilon_cap_per_run is None and plain.evaluation_noise == DEFAULT_EVALUATION_NOISE
    path.write_text('name = "x"\ndata-dir = "d"\nstate-dir = "s"\nepsilon-cap = 2\nepsilon-cap-per-run = 3\n')
    with pytest.raises(ConfigError, match="epsilon-cap-per-run .*above epsilon-cap"):
        SiteConfig.from_toml(path)
    path.write_text('name = "x"\ndata-dir = "d"\nstate-dir = "s"\nepsilon-cap = 2\nevaluation-noise = 0\n')
    with pytest.raises(ConfigError, match="evaluation-noise"):
        SiteConfig.from_toml(path)


def test_hardening_env_is_set_on_import() -> None:
    import medfed  # noqa: F401

    assert os.environ["FLWR_TELEMETRY_ENABLED"] == "0"
    assert os.environ["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
