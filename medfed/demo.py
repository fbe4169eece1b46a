"""`medfed demo`: the main job end to end on built-in synthetic hospitals.

synth → each site de-identifies its own DICOM with its own secret → a Flower
simulation of the very ServerApp and ClientApp a deployment runs → a summary.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfed.settings import DEFAULT_EVALUATION_NOISE, RunConfig, SiteConfig
from models.release import RELEASE_PUBLIC_KEY
from models.study import Study

log = logging.getLogger(__name__)


@dataclass
class SiteOutcome:
    """One hospital's part in the demo, from its own ledger."""

    name: str
    images: int
    quarantined: int
    epsilon: float
    epsilon_cap: float
    delta: float
    rounds_trained: int
    rounds_declined: int
    decline_reasons: list[str] = field(default_factory=list)


@dataclass
class DemoSummary:
    """What the demo prints and the tests assert on."""

    out: Path
    rounds: list[dict[str, Any]]
    sites: list[SiteOutcome]
    model: Path
    metrics: Path
    plot: Path
    release: Path
    wall_seconds: float
    simulation_seconds: float


def prepare_sites(
    out: Path, *, sites: int, patients: int, seed: int, epsilon_caps: list[float], delta: float,
    workers: int = 1, progress: bool = True, evaluation_noise: float = DEFAULT_EVALUATION_NOISE,
    study: Study | None = None,
) -> list[SiteConfig]:
    """Synthesize hospitals and de-identify each with its own secret; write each `site.toml` (serving ``study``)."""
    from anonymization.batch import run_deid
    from medfed.synth import generate_hospitals

    raw = out / "raw"
    infos = generate_hospitals(raw, sites=sites, patients=patients, seed=seed,
                               image_size=study.image_size if study is not None else 64)
    configs = []
    for info, cap in zip(infos, epsilon_caps, strict=True):
        site_dir = out / "sites" / info.name
        site_dir.mkdir(parents=True, exist_ok=True)
        audit_key = site_dir / "audit-signing.key"  # one key seals the site's trail: de-id and training
        summary = run_deid(
            info.dicom_dir, site_dir / "deid", site_dir / "site.key", labels=info.labels_csv,
            audit_key=audit_key, workers=workers, progress=progress,
        )
        log.info("%s: %s", info.name, summary.line())
        cfg = SiteConfig(name=info.name, data_dir=site_dir / "deid", state_dir=site_dir / "state",
                         audit_key=audit_key, release_key=out.resolve() / RELEASE_PUBLIC_KEY, epsilon_cap=cap,
                         delta=delta, evaluation_noise=evaluation_noise,
                         approved_studies=() if study is None else (study.digest(),))
        (site_dir / "site.toml").write_text(cfg.to_toml())
        configs.append(cfg)
    return configs


def simulate(cfg: RunConfig, num_sites: int) -> None:
    """Run the ServerApp and ClientApp in Flower's Simulation Engine, in this process."""
    from flwr.simulation import run_simulation

    from coordinator.server_app import build_app as build_server
    from site_client.client_app import build_app as build_client

    cpus = max(1, os.cpu_count() or 1)
    # One intra-op thread per simulated site: each actor has one CPU, and two
    # spinning torch threads per actor on a small box slow every step ~100x.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    backend: dict[str, Any] = {
        "client_resources": {"num_cpus": 1, "num_gpus": 1.0 / num_sites if cfg.device == "cuda" else 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": True},
    }
    run_simulation(
        server_app=build_server(cfg), client_app=build_client(cfg), num_supernodes=num_sites,
        backend_config=backend,  # type: ignore[arg-type]
    )


def synth_study(task: str = "binary", classes: int | None = None, modality: str = "CT",
                image_size: int = 64) -> Study:
    """The study `medfed synth` writes for its hospitals (its study.toml), as a Study."""
    import tomllib

    from medfed.synth import class_names, study_toml
    from models.study import parse_study

    text = study_toml(task, class_names(task, classes, modality), modality, image_size)
    return parse_study(tomllib.loads(text), "the synthetic study")


def site_outcome(site: SiteConfig) -> SiteOutcome:
    """Read a site's ledger and manifest (site-side facts; nothing identifying)."""
    from site_client.task import ledger_for

    ledger = ledger_for(site)
    runs = ledger.runs()
    rounds = ledger.rounds(runs[-1]["run_id"]) if runs else ledger.rounds()
    manifest = site.data_dir / "manifest.csv"
    images = max(0, sum(1 for _ in manifest.open()) - 1) if manifest.exists() else 0
    qfile = site.data_dir.parent / f"{site.data_dir.name}-quarantine" / "quarantine.jsonl"
    quarantined = sum(1 for _ in qfile.open()) if qfile.exists() else 0
    return SiteOutcome(
        name=site.name, images=images, quarantined=quarantined,
        epsilon=runs[-1]["epsilon"] if runs else 0.0, epsilon_cap=site.epsilon_cap, delta=site.delta,
        rounds_trained=sum(r["status"] == "spent" for r in rounds),
        rounds_declined=sum(r["status"] == "declined" for r in rounds),
        decline_reasons=[r["reason"] for r in rounds if r["status"] == "declined"],
    )


def run_demo(
    out: Path, *, sites: int = 3, rounds: int = 20, device: str = "cpu", patients: int = 2000, seed: int = 0,
    epsilon_caps: list[float] | None = None, delta: float = 1e-5, run_overrides: dict[str, Any] | None = None,
    workers: int = 1, progress: bool = True, evaluation_noise: float = DEFAULT_EVALUATION_NOISE,
) -> DemoSummary:
    """The whole pipeline on synthetic hospitals; returns what happened."""
    from medfed.studies import simulate_study

    t0 = time.monotonic()
    out = out.resolve()
    caps = epsilon_caps if epsilon_caps is not None else [8.0] * sites
    if len(caps) != sites:
        raise ValueError(f"{len(caps)} epsilon caps given for {sites} sites; give one per site")
    overrides = {"num_server_rounds": rounds, "device": device, "seed": seed, **(run_overrides or {})}
    # The demo is a study like any other: the one `medfed synth` writes for its binary CT hospitals.
    study = synth_study(image_size=overrides.pop("image_size", 64))
    site_cfgs = prepare_sites(out, sites=sites, patients=patients, seed=seed, epsilon_caps=caps, delta=delta,
                              workers=workers, progress=progress, evaluation_noise=evaluation_noise, study=study)
    result = simulate_study(study, out, site_cfgs, out, overrides=overrides)
    metrics = json.loads(result.metrics.read_text())
    return DemoSummary(
        out=out, rounds=metrics["rounds"], sites=[site_outcome(s) for s in site_cfgs],
        model=result.model, metrics=result.metrics, plot=result.plot, release=result.release,
        wall_seconds=time.monotonic() - t0, simulation_seconds=result.seconds,
    )
