"""The fixed front end runs once per dataset: same training, same scores, bounded memory."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from models import features
from models.evaluation import evaluate
from models.network import build_model
from models.training import DPSettings, train_local
from tests.models_factory import torch_threads

SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def _data(n: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, SIZE, SIZE, generator=g)
    y = (torch.arange(n) % 3 == 0).float()
    x[y == 1, :, 10:16, 12:18] += 2.0  # a learnable blob
    return TensorDataset(x, y)


def _counting_front(model: nn.Module) -> list[int]:
    """Count the images the model's front end sees."""
    seen: list[int] = []
    model.fixed_front.register_forward_hook(lambda _m, inputs, _o: seen.append(int(inputs[0].shape[0])))
    return seen


def test_split_names_the_front_and_the_trained_part() -> None:
    model = build_model(SIZE)
    front, trained = features.split(model)
    assert front is model.fixed_front and trained is model.trainable
    plain = nn.Linear(3, 1)
    assert features.split(plain) == (None, plain)


def test_features_are_computed_once_per_dataset_and_reused() -> None:
    model = build_model(SIZE)
    seen = _counting_front(model)
    data = _data()
    train_local(model, data, epochs=2, batch_size=16, lr=0.01, optimizer="adam", seed=0)
    first = sum(seen)
    assert first >= len(data)  # every image once (plus one to size the cache)
    train_local(model, data, epochs=2, batch_size=16, lr=0.01, optimizer="adam", seed=1)
    evaluate(model, data)
    assert sum(seen) == first  # the second round and the evaluation reused them
    evaluate(model, _data(seed=1))
    assert sum(seen) > first  # another dataset is another cache entry


def test_cache_lets_go_of_a_dataset() -> None:
    model = build_model(SIZE)
    data = _data(8)
    features.precompute(model.fixed_front, data)
    assert data in features._cache
    alive = weakref.ref(data)
    del data
    gc.collect()
    assert alive() is None  # the cache held no strong reference


@pytest.mark.parametrize("dp", [None, DPSettings(1.0, 1.0)], ids=["sgd", "dp-sgd"])
def test_training_on_features_equals_training_the_whole_model(monkeypatch: pytest.MonkeyPatch,
                                                             dp: DPSettings | None) -> None:
    """Precomputing is only an optimisation: same seed, same per-example gradients, same noise, same weights."""
    data = _data()
    torch.manual_seed(0)
    fast = build_model(SIZE)
    slow = build_model(SIZE)
    slow.load_state_dict(fast.state_dict())
    train_local(fast, data, epochs=2, batch_size=16, lr=0.01, optimizer="adam", dp=dp, seed=3)
    monkeypatch.setattr(features, "MAX_FEATURE_BYTES", 0)  # too large: the front end runs per batch
    seen = _counting_front(slow)
    train_local(slow, _data(), epochs=2, batch_size=16, lr=0.01, optimizer="adam", dp=dp, seed=3)
    assert sum(seen) > 2 * len(data)  # ran per batch, every epoch
    for (name, a), b in zip(fast.state_dict().items(), slow.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_evaluation_on_features_equals_evaluation_of_the_whole_model(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(SIZE)
    data = _data()
    fast = evaluate(model, data)
    monkeypatch.setattr(features, "MAX_FEATURE_BYTES", 0)
    slow = evaluate(model, _data())
    assert fast.keys() == slow.keys()
    for k in fast:
        assert fast[k] == pytest.approx(slow[k], rel=1e-5, abs=1e-6), k


def test_too_large_a_dataset_is_not_precomputed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = build_model(SIZE)
    monkeypatch.setattr(features, "MAX_FEATURE_BYTES", 1024)
    with caplog.at_level("INFO", logger="models.features"):
        assert features.precompute(model.fixed_front, _data(4)) is None
    assert "running the front end per batch" in caplog.text
    module, data = features.apply_front(model, _data(4))
    assert module is model and len(data) == 4


class _Augmenting(TensorDataset):
    """A dataset whose every read is a new random view (StudyDataset's train split with augmentation)."""

    augments = True


def test_an_augmenting_dataset_is_never_precomputed() -> None:
    """Precomputing would freeze the first random draw: the front end must then run per batch."""
    model = build_model(32)
    data = _Augmenting(torch.randn(8, 1, 32, 32), torch.zeros(8))
    assert features.precompute(model.fixed_front, data) is None
    trained, fed = features.apply_front(model, data)
    assert trained is model and fed is data
    assert features.precompute(model.fixed_front, TensorDataset(*data.tensors)) is not None
