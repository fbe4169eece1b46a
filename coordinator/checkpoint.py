"""Checkpoints after every round: global arrays, round number, metrics so far.

Written to a temporary name and renamed, so a coordinator killed mid-write
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coordinator.history import RunHistory
from medfed.files import open_atomic

_NAME = re.compile(r"^round-(\d{4})\.pt$")


@dataclass
class Checkpoint:
    """A saved global model and the run's history up to that round."""

    round: int
    state_dict: dict[str, torch.Tensor]
    history: RunHistory
    run_config: dict[str, Any]
    path: Path


def save_checkpoint(
    directory: Path, server_round: int, state_dict: dict[str, torch.Tensor], history: RunHistory,
    run_config: dict[str, Any],
) -> Path:
    """Atomically write ``round-NNNN.pt`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"round-{server_round:04d}.pt"
    with open_atomic(path) as fh:
        torch.save(
            {"round": server_round, "state_dict": state_dict, "history": history.to_json(), "run_config": run_config},
            fh,
        )
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    return Checkpoint(
        round=int(data["round"]),
        state_dict=data["state_dict"],
        history=RunHistory.from_json(data["history"]),
        run_config=data["run_config"],
        path=path,
    )


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint of the highest round in ``directory``, if any."""
    if not directory.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)))
    return found[-1][1] if found else None
