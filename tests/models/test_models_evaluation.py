"""evaluate: exact keys, sane ranges, NaN (not a crash) where a metric is undefined."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from models.evaluation import METRIC_KEYS, evaluate
from models.network import build_model
from tests.models_factory import torch_threads

KEYS = {"auc", "accuracy", "sensitivity", "specificity", "f1", "loss", "num_examples"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


class _Oracle(nn.Module):
    """Logit = +/-5 from the image's mean sign, optionally flipped: a model with known answers."""

    def __init__(self, flip: bool = False) -> None:
        super().__init__()
        self.flip = flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sign(x.mean(dim=(1, 2, 3))).unsqueeze(1) * 5.0
        return -s if self.flip else s


def _data(labels: list[float]) -> TensorDataset:
    y = torch.tensor(labels, dtype=torch.float32)
    x = (y * 2 - 1).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone()
    return TensorDataset(x, y)


def test_keys_and_ranges_for_a_real_model() -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(20, 1, 32, 32), (torch.arange(20) % 2).float())
    m = evaluate(build_model(32), data, batch_size=6)
    assert set(m) == KEYS == set(METRIC_KEYS)
    assert m["num_examples"] == 20
    for k in ("auc", "accuracy", "sensitivity", "specificity", "f1"):
        assert 0.0 <= m[k] <= 1.0
    assert m["loss"] > 0 and all(isinstance(v, float) for v in m.values())


def test_perfect_and_inverted_models() -> None:
    data = _data([0, 1, 1, 0, 1])
    good = evaluate(_Oracle(), data)
    assert good["auc"] == good["accuracy"] == good["sensitivity"] == good["specificity"] == good["f1"] == 1.0
    assert good["loss"] < 0.01
    bad = evaluate(_Oracle(flip=True), data)
    assert bad["auc"] == bad["accuracy"] == bad["f1"] == 0.0
    assert bad["loss"] > 1.0


def test_one_class_gives_nan_not_a_crash() -> None:
    m = evaluate(_Oracle(), _data([1, 1, 1]))
    assert math.isnan(m["auc"]) and math.isnan(m["specificity"])
    assert m["sensitivity"] == m["accuracy"] == m["f1"] == 1.0
    n = evaluate(_Oracle(), _data([0, 0]))
    assert math.isnan(n["auc"]) and math.isnan(n["sensitivity"]) and math.isnan(n["f1"])
    assert n["specificity"] == 1.0


def test_empty_dataset() -> None:
    m = evaluate(_Oracle(), TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0)))
    assert m["num_examples"] == 0.0
    assert all(math.isnan(v) for k, v in m.items() if k != "num_examples")


def test_restores_training_mode() -> None:
    model = build_model(32)
    data = TensorDataset(torch.zeros(2, 1, 32, 32), torch.tensor([0.0, 1.0]))
    model.train()
    evaluate(model, data)
    assert model.training
    model.eval()
    evaluate(model, data)
    assert not model.training


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_batch_size_does_not_change_the_result(batch_size: int) -> None:
    data = _data([0, 1, 1, 0, 1])
    assert evaluate(_Oracle(), data, batch_size=batch_size) == evaluate(_Oracle(), data)
