"""SecAgg+ with site-level DP (client-side clipping) through Flower's Simulation Engine.

The same ServerApp and ClientApp as the deployment: the strategy receives the
secure aggregate only, the sites clip before masking, the coordinator adds the
Gaussian noise and reports the site-level ε under the replace-one relation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from coordinator.federation import initial_state
from coordinator.receipts import read_jsonl
from coordinator.site_dp import epsilon_fixed
from medfed.demo import prepare_sites, simulate
from medfed.settings import RunConfig
from site_client.replay import ReplayStore

pytestmark = pytest.mark.e2e

SIGMA, CLIP = 0.5, 0.5


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, list, Path]:
    root = tmp_path_factory.mktemp("secagg")
    sites = prepare_sites(root, sites=3, patients=24, seed=11, epsilon_caps=[1000.0] * 3, delta=1e-5, progress=False)
    cfg = RunConfig().with_overrides(
        num_server_rounds=1, image_size=32, batch_size=8, demo_dir=str(root), out_dir=str(root / "coordinator"),
        min_train_nodes=3, min_evaluate_nodes=1, min_available_nodes=3, fraction_evaluate=0.0, seed=4,
        secagg=True, site_dp="client-fixed", site_dp_noise_multiplier=SIGMA, site_dp_clipping_norm=CLIP,
        run_name="sim-secure")
    simulate(cfg, 3)
    return cfg, sites, root / "coordinator"


def test_strategy_sees_one_secure_aggregate(run: tuple[RunConfig, list, Path]) -> None:
    _, _, out = run
    (agg,) = read_jsonl(out / "aggregation.jsonl")
    assert agg["secure"] and len(agg["inputs"]) == 3 and len({i["digest"] for i in agg["inputs"]}) == 1
    stages = {r["stage"] for r in read_jsonl(out / "received.jsonl") if r["phase"] == "train"}
    assert stages == {"setup", "share_keys", "collect_masked_vectors", "unmask"}


def test_clipped_mean_plus_central_noise_and_site_level_epsilon(run: tuple[RunConfig, list, Path]) -> None:
    from flwr.supercore.differential_privacy import compute_clip_model_update

    cfg, sites, out = run
    initial = initial_state(cfg)
    keys = list(initial)
    clipped = []
    for site in sites:
        (entry,) = ReplayStore(site.state_dir).released("sim-secure")
        update = torch.load(entry["path"], weights_only=True)
        nds = [update[k].numpy().astype(np.float64) for k in keys]
        compute_clip_model_update(nds, [initial[k].numpy().astype(np.float64) for k in keys], CLIP)
        clipped.append(nds)
    mean = [sum(c[i] for c in clipped) / 3 for i in range(len(keys))]  # uniform: each site weighs 1/m
    final = torch.load(out / "model.pt", weights_only=True)
    residual = np.concatenate(
        [(final[k].numpy().astype(np.float64) - m).ravel() for k, m in zip(keys, mean, strict=True)]
    )
    expected_std = SIGMA * CLIP / 3  # Flower's DP wrapper: noise sigma*C on the sum of m=3 clipped updates
    assert 0.8 * expected_std < residual.std() < 1.25 * expected_std
    assert abs(residual.mean()) < 5 * expected_std / np.sqrt(residual.size)
    metrics = json.loads((out / "metrics.json").read_text())
    dp = metrics["site_dp"]
    assert (dp["mode"], dp["sampling"], dp["neighbouring"], dp["rounds_released"]) == (
        "client-fixed", "fixed", "replace one site", 1)
    assert dp["epsilon"] == pytest.approx(epsilon_fixed(SIGMA, 3, 3, 1, 1e-5))
