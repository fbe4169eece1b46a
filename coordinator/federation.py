"""A whole federated run at the coordinator, as a plain function the ServerApp calls.

Builds the initial model, runs the strategy for the configured rounds with a
bounded wait per round, checkpoints after every round and writes the final
model, metrics.json and metrics.png.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from coordinator import site_dp
from coordinator.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from coordinator.grid import PromptGrid
from coordinator.history import RunHistory
from coordinator.receipts import Receipts, train_digests
from coordinator.release import DELIVERY_TIMEOUT
from coordinator.report import plot_metrics, write_metrics
from coordinator.secure import SecAggPlusGrid
from coordinator.strategy import build_strategy, wait_for_nodes
from medfed.files import open_atomic, write_text
from medfed.protocol import UNIFORM_WEIGHT_KEY
from medfed.settings import RunConfig
from medfed.wire import pack, unpack
from models.registry import build_network, load_initial_weights
from models.study import study_of

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"
PLOT_FILE = "metrics.png"
CHECKPOINTS = "checkpoints"
SITE_DP_FILE = "site-dp.json"


@dataclass
class FederationResult:
    """Where a finished run left its outputs."""

    out_dir: Path
    model: Path
    metrics: Path
    plot: Path
    history: RunHistory
    rounds_done: int


def initial_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The starting global model: the study's pinned initial weights, else reproducible from the run's seed."""
    torch.manual_seed(cfg.seed)
    study = study_of(cfg)
    model = build_network(study)
    if study.network.weights is not None:
        load_initial_weights(model, study, Path(cfg.study_dir or "."))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_federation(grid: Grid, cfg: RunConfig, *, resume: bool = False) -> FederationResult:
    """Run (or, with ``resume``, continue) the federation described by ``cfg``."""
    grid = PromptGrid(grid)  # type: ignore[assignment]
    out = Path(cfg.out_dir)
    ckpt_dir = out / CHECKPOINTS
    out.mkdir(parents=True, exist_ok=True)

    history = RunHistory()
    start_round = 0
    state = initial_state(cfg)
    if resume and (last := latest_checkpoint(ckpt_dir)) is not None:
        ckpt = load_checkpoint(last)
        state, history, start_round = ckpt.state_dict, ckpt.history, ckpt.round
        log.info("resuming from %s (round %d)", last, start_round)
    remaining = cfg.num_server_rounds - start_round
    if remaining <= 0:
        log.info("nothing to do: the checkpoint is already at round %d", start_round)

    # Deployment options: receipts of what arrived, site-level DP, secure aggregation.
    receipts = Receipts(out, run=cfg.run_name or _run_id(grid))
    dp_plan: site_dp.SiteDPPlan | None = None
    released: list[int] = _released_rounds(out, start_round) if resume else []
    if cfg.site_dp != "off" and remaining > 0:
        n_sites = wait_for_nodes(grid, cfg.min_available_nodes, cfg.round_timeout)
        dp_plan = site_dp.plan(cfg, n_sites)
        if dp_plan is not None:
            log.info("site-level DP: %s, %s sampling (%s), sigma=%g, C=%g", dp_plan.mode, dp_plan.sampling,
                     dp_plan.relation, dp_plan.noise_multiplier, dp_plan.clipping_norm)
    # Round numbers Flower's strategy sees restart at 1; the history and the sites see the run's.
    # A replay of an update from before the resume is still a replay.
    strategy = build_strategy(cfg, history, study_of(cfg), receipts=receipts, round_offset=start_round,
                              seen=train_digests(out) if resume else None, site_dp_plan=dp_plan)
    last_tick = [time.monotonic()]
    run_config = cfg.to_flower()
    run_grid = grid
    if cfg.secagg:
        run_grid = SecAggPlusGrid(  # type: ignore[assignment]
            grid, num_shares=cfg.secagg_num_shares, threshold=cfg.secagg_threshold,
            clipping_range=cfg.secagg_clipping_range, max_weight=cfg.secagg_weight_bound, timeout=cfg.round_timeout,
            on_reply=lambda rnd, stage, msg, node: receipts.received(rnd, "train", msg, stage, node))

    def site_dp_extra() -> dict[str, object]:
        if dp_plan is None:
            return {}
        rep = dp_plan.report(len(released))
        rep["epsilon_by_round"] = {str(r): dp_plan.epsilon(i + 1) for i, r in enumerate(released)}
        return {"site_dp": rep}

    def checkpoint(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        # Flower calls this before round 1 (local_round 0) and after every round.
        now = time.monotonic()
        server_round = start_round + local_round
        if local_round > 0:
            rec = history.round(server_round)
            rec.seconds = round(now - last_tick[0], 3)
            if dp_plan is not None and strategy.released_rounds > len([r for r in released if r > start_round]):
                released.append(server_round)
                _write_released(out, released)
            save_checkpoint(ckpt_dir, server_round, unpack(arrays, state), history, run_config)
            write_metrics(out / METRICS_FILE, history, run_config, site_dp_extra())
            auc = rec.evaluate.get("auc")
            log.info("round %d/%d done in %.1fs, global AUC %s", server_round, cfg.num_server_rounds,
                     rec.seconds, "n/a" if auc is None else f"{auc:.3f}")
        last_tick[0] = now
        return None

    result = None
    if remaining > 0:
        train_config = ConfigRecord({"lr": cfg.lr, "local-epochs": cfg.local_epochs})
        if cfg.secagg_uniform_weights:
            train_config[UNIFORM_WEIGHT_KEY] = True  # the SecAgg+ weight of every site is 1
        result = strategy.start(
            grid=run_grid,
            initial_arrays=pack(state),
            num_rounds=remaining,
            timeout=cfg.round_timeout,
            train_config=train_config,
            evaluate_config=ConfigRecord(),
            evaluate_fn=checkpoint,
        )
    final_state = unpack(result.arrays, state) if result is not None and len(result.arrays) else state

    model_path = out / MODEL_FILE
    with open_atomic(model_path) as fh:
        torch.save(final_state, fh)
    write_metrics(out / METRICS_FILE, history, run_config, {"final_model": MODEL_FILE, **site_dp_extra()})
    plot_metrics(out / PLOT_FILE, history)
    last_round = max((r.round for r in history.rounds), default=0)
    if cfg.release_key:
        _release(out, Path(cfg.release_key), grid, cfg, last_round, history.named_sites())
    return FederationResult(out, model_path, out / METRICS_FILE, out / PLOT_FILE, history, last_round)



def _release(out: Path, key: Path, grid: Grid, cfg: RunConfig, last_round: int, names: dict[str, str]) -> None:
    """Sign the final model as the consortium's release (a fresh release/ per finished run) and send it to
    the sites in the run's last message; a site that does not keep it gets it as a file, as before."""
    import shutil

    from coordinator.release import RELEASE_DIR, deliver_release, delivery_line, release_run
    from medfed.signing import load_signing_key
    from models.release import RELEASE_KEY_WHAT

    if (out / RELEASE_DIR).exists():
        shutil.rmtree(out / RELEASE_DIR)
    path = release_run(out, load_signing_key(key, what=RELEASE_KEY_WHAT))
    log.info("release signed: %s", path)
    try:
        report = deliver_release(grid, path, last_round, timeout=min(cfg.round_timeout, DELIVERY_TIMEOUT), names=names)
    except Exception as err:  # noqa: BLE001 - the release is signed on disk; sending it is a convenience
        log.warning("the release was not sent to the sites (%s: %s); distribute %s as a file",
                    type(err).__name__, err, path)
        return
    log.info("release %s (%s)", delivery_line(path), report)


def _run_id(grid: Grid) -> str:
    """Flower's id of this run (what a site keys the run on when it has no run-name); "" if unknown."""
    try:
        return str(grid.run.run_id)
    except Exception:  # noqa: BLE001 - a label for the receipts, never a reason to fail a run
        return ""


def _released_rounds(out: Path, upto: int) -> list[int]:
    """Rounds that released a model under site-level DP before a resume (they count towards ε)."""
    import json

    path = out / SITE_DP_FILE
    if not path.is_file():
        return []
    return [int(r) for r in json.loads(path.read_text()).get("released", []) if int(r) <= upto]


def _write_released(out: Path, released: list[int]) -> None:
    import json

    write_text(out / SITE_DP_FILE, json.dumps({"released": released}))
