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

from coordinator.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from coordinator.history import RunHistory
from coordinator.report import plot_metrics, write_metrics
from coordinator.strategy import build_strategy
from medfed.settings import RunConfig
from models.network import build_model

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"
PLOT_FILE = "metrics.png"
CHECKPOINTS = "checkpoints"


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
    """The starting global model, reproducible from the run's seed."""
    torch.manual_seed(cfg.seed)
    return {k: v.detach().clone() for k, v in build_model(cfg.image_size).state_dict().items()}


def run_federation(grid: Grid, cfg: RunConfig, *, resume: bool = False) -> FederationResult:
    """Run (or, with ``resume``, continue) the federation described by ``cfg``."""
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

    strategy = build_strategy(cfg, history)
    last_tick = [time.monotonic()]
    run_config = cfg.to_flower()

    def checkpoint(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        # Flower calls this before round 1 (local_round 0) and after every round.
        now = time.monotonic()
        server_round = start_round + local_round
        if local_round > 0:
            rec = history.round(server_round)
            rec.seconds = round(now - last_tick[0], 3)
            save_checkpoint(ckpt_dir, server_round, arrays.to_torch_state_dict(), history, run_config)
            write_metrics(out / METRICS_FILE, history, run_config)
            auc = rec.evaluate.get("auc")
            log.info("round %d/%d done in %.1fs, global AUC %s", server_round, cfg.num_server_rounds,
                     rec.seconds, "n/a" if auc is None else f"{auc:.3f}")
        last_tick[0] = now
        return None

    # Round numbers the strategy sees restart at 1; keep the history's numbering global.
    strategy.round_offset = start_round  # type: ignore[attr-defined]

    result = None
    if remaining > 0:
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(state),
            num_rounds=remaining,
            timeout=cfg.round_timeout,
            train_config=ConfigRecord({"lr": cfg.lr, "local-epochs": cfg.local_epochs}),
            evaluate_config=ConfigRecord(),
            evaluate_fn=checkpoint,
        )
    final_state = result.arrays.to_torch_state_dict() if result is not None and len(result.arrays) else state

    model_path = out / MODEL_FILE
    tmp = out / f".{MODEL_FILE}.tmp"
    torch.save(final_state, tmp)
    tmp.replace(model_path)
    write_metrics(out / METRICS_FILE, history, run_config, {"final_model": MODEL_FILE})
    plot_metrics(out / PLOT_FILE, history)
    return FederationResult(out, model_path, out / METRICS_FILE, out / PLOT_FILE, history,
                            max((r.round for r in history.rounds), default=0))

