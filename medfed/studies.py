"""A study on your own folders, before any deployment: one site alone, or several in Flower's simulation.

`medfed train` is the local-only baseline: the site's own rounds of DP-SGD through the very
``train_round`` a deployed site runs (same ledger, same audit trail, same refusals), and exact metrics
on its own test split (nothing leaves). `medfed simulate` and `medfed demo` run the deployment's
ServerApp and ClientApp in Flower's Simulation Engine over the given de-identified stores.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medfed.files import write_file
from medfed.settings import DEFAULT_EVALUATION_NOISE, ConfigError, RunConfig, SiteConfig
from models.release import RELEASE_PUBLIC_KEY
from models.study import Study

log = logging.getLogger(__name__)


class StudyRunError(Exception):
    """A study cannot run on the given folders; the message says what to do."""


def study_run_config(study: Study, study_dir: Path, **overrides: Any) -> RunConfig:
    """The run config that carries ``study`` (and where its initial weights are); overrides by either name."""
    fields = {k.replace("-", "_"): v for k, v in overrides.items()}
    unknown = sorted(k for k in fields if k not in RunConfig.model_fields)
    if unknown:
        raise ConfigError(f"unknown run setting(s) {', '.join(unknown)}; see [tool.flwr.app.config] in pyproject.toml")
    return RunConfig().with_overrides(**fields, study=study.canonical_json(), study_dir=str(study_dir.resolve()))


def site_config(name: str, data_dir: Path, state_dir: Path, study: Study, *, epsilon_cap: float, delta: float,
                audit_key: Path | None = None, evaluation_noise: float = DEFAULT_EVALUATION_NOISE,
                release_key: Path | None = None) -> SiteConfig:
    """A site that serves ``study`` (its operator is the one running the command, so it is approved)."""
    try:
        return SiteConfig(name=name, data_dir=data_dir.resolve(), state_dir=state_dir.resolve(), audit_key=audit_key,
                          release_key=release_key,
                          epsilon_cap=epsilon_cap, delta=delta, evaluation_noise=evaluation_noise,
                          approved_studies=(study.digest(),))
    except ValueError as err:
        raise StudyRunError(f"site {name}: {err}") from None


# ---- one site alone ------------------------------------------------------------------------------
@dataclass
class LocalResult:
    """What `medfed train` left in OUT."""

    model: Path
    metrics: Path
    epsilon: float
    epsilon_cap: float
    rounds_trained: int
    declined: str | None
    test_metrics: dict[str, Any]


def train_site(deid_dir: Path, study: Study, study_dir: Path, out: Path, *, epsilon_cap: float,
               delta: float = 1e-5, overrides: dict[str, Any] | None = None,
               site: SiteConfig | None = None) -> LocalResult:
    """Train the study at one site alone, under DP and its ledger, then score it exactly on its test split.

    With ``site`` (the site's own `site.toml`), the rounds are paid from that site's lifetime ledger;
    otherwise from a ledger in ``OUT/state``.
    """
    from coordinator.federation import initial_state
    from models.release import state_bytes
    from site_client.task import SiteRefusal, ledger_for, train_round

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if site is None:
        site = site_config("local", deid_dir, out / "state", study, epsilon_cap=epsilon_cap, delta=delta)
    elif study.digest() not in site.approved_studies:
        site = site.model_copy(update={"approved_studies": (*site.approved_studies, study.digest())})
    run_name = "local-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    cfg = study_run_config(study, study_dir, run_name=run_name, **(overrides or {}))
    state = initial_state(cfg)
    trained, declined = 0, None
    for rnd in range(1, cfg.num_server_rounds + 1):
        try:
            reply = train_round(site, cfg, run_name, rnd, state)
        except SiteRefusal as err:
            raise StudyRunError(str(err)) from None
        if reply.state_dict is None:
            declined = reply.declined
            break
        state, trained = reply.state_dict, trained + 1
        log.info("round %d of %d trained (ε %.3f of %g)", rnd, cfg.num_server_rounds, reply.metrics["epsilon"],
                 site.epsilon_cap)
    test = exact_metrics(site, study, state)
    write_file(out / "model.pt", state_bytes(state))
    eps = ledger_for(site).epsilon(run_name, site.delta)
    body = {"study": study.name, "study_sha256": study.digest(), "run": run_name, "rounds_trained": trained,
            "declined": declined, "epsilon": eps, "epsilon_cap": site.epsilon_cap, "delta": site.delta,
            "test": test}
    write_file(out / "metrics.json", (json.dumps(body, indent=2, default=_jsonable) + "\n").encode())
    return LocalResult(model=out / "model.pt", metrics=out / "metrics.json", epsilon=eps,
                       epsilon_cap=site.epsilon_cap, rounds_trained=trained, declined=declined, test_metrics=test)


def exact_metrics(site: SiteConfig, study: Study, state: dict) -> dict[str, Any]:
    """The study's metrics of ``state`` on the site's own test split (seen only here)."""
    from models.evaluation import predict
    from models.metrics import metrics_from_logits
    from site_client.task import site_dataset, site_network

    model = site_network(study, state)
    logits, targets = predict(model, site_dataset(site, study, "test"))
    return metrics_from_logits(logits, targets, study).to_json()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def release_key(folder: Path) -> Path:
    """The simulation's own release key (``FOLDER/release-signing.key``, public half beside it)."""
    from medfed.signing import load_or_create_signing_key
    from models.release import RELEASE_KEY, RELEASE_KEY_WHAT

    signer, created = load_or_create_signing_key(folder / RELEASE_KEY, what=RELEASE_KEY_WHAT)
    if created or not (folder / RELEASE_PUBLIC_KEY).exists():
        write_file(folder / RELEASE_PUBLIC_KEY, signer.public_pem())
    return folder / RELEASE_KEY


# ---- several sites in Flower's Simulation Engine -------------------------------------------------
@dataclass
class SimulationResult:
    """Where a simulated run left its outputs."""

    out: Path
    model: Path
    metrics: Path
    plot: Path
    release: Path
    sites: list[SiteConfig]
    seconds: float


def prepare_stores(out: Path, stores: dict[str, Path], study: Study, *, epsilon_cap: float,
                   delta: float) -> list[SiteConfig]:
    """One `site.toml` per store under ``OUT/sites/NAME`` (the layout the simulated ClientApp reads)."""
    configs = []
    for name, store in stores.items():
        if not (store / "manifest.csv").is_file():
            raise StudyRunError(f"{store} is not a de-identified store (no manifest.csv); "
                                "run `medfed deid run RAW STORE --key KEY --labels CSV` first")
        site_dir = out / "sites" / name
        site_dir.mkdir(parents=True, exist_ok=True)
        cfg = site_config(name, store, site_dir / "state", study, epsilon_cap=epsilon_cap, delta=delta,
                          release_key=out.resolve() / RELEASE_PUBLIC_KEY)  # simulate_study's release key
        write_file(site_dir / "site.toml", cfg.to_toml().encode(), mode=0o644)
        configs.append(cfg)
    return configs


def simulate_study(study: Study, study_dir: Path, sites: list[SiteConfig], out: Path, *,
                   overrides: dict[str, Any] | None = None) -> SimulationResult:
    """Run the deployment's ServerApp and ClientApp over ``sites`` (already under ``OUT/sites``)."""
    from medfed.demo import simulate

    out = out.resolve()
    names = sorted(s.name for s in sites)
    on_disk = sorted(p.name for p in (out / "sites").iterdir() if (p / "site.toml").is_file())
    if names != on_disk:
        raise StudyRunError(f"{out / 'sites'} holds {', '.join(on_disk)} but the run names {', '.join(names)}; "
                            "use a fresh --out folder")
    base = {"min_train_nodes": 1, "min_evaluate_nodes": len(sites), "min_available_nodes": len(sites),
            "release_key": str(release_key(out)),
            # the run's name keys each site's ledger and names the release: the study and when it ran
            "run_name": f"{study.name}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}".replace(" ", "-")}
    try:
        cfg = study_run_config(study, study_dir, demo_dir=str(out), out_dir=str(out / "coordinator"),
                               **{**base, **(overrides or {})})
    except (ConfigError, ValueError) as err:
        raise StudyRunError(str(err)) from None
    t0 = time.monotonic()
    simulate(cfg, len(sites))
    coord = out / "coordinator"
    if not (coord / "metrics.json").is_file():
        raise StudyRunError(f"the simulation ended without {coord / 'metrics.json'}; see the log above for why")
    return SimulationResult(out=out, model=coord / "model.pt", metrics=coord / "metrics.json",
                            plot=coord / "metrics.png", release=coord / "release", sites=sites,
                            seconds=time.monotonic() - t0)
