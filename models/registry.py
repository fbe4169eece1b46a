"""Networks by name (placeholder until the registry lands): the scattering head only."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from models.network import build_model
from models.study import Study


def build_network(study: Study) -> nn.Module:
    return build_model(study.image_size)


def load_initial_weights(model: nn.Module, study: Study, base_dir: Path) -> None:
    return None


def apply_trainable(model: nn.Module, part: str) -> None:
    return None
