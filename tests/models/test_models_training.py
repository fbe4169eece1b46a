"""train_local: trains in place, learns, accounts DP-SGD steps into the caller's accountant, FedProx."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import TensorDataset

from models.dataset import ManifestDataset
from models.evaluation import evaluate
from models.network import build_model
from models.training import DPSettings, TrainOutcome, planned_steps, train_local
from tests.models_factory import make_store, torch_threads

SIZE = 32
DELTA = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[ManifestDataset, ManifestDataset]:
    root = tmp_path_factory.mktemp("deid")
    make_store(root, n_patients=40, images_per_patient=3, size=128, seed=11)
    return ManifestDataset(root, "train", image_size=SIZE), ManifestDataset(root, "test", image_size=SIZE)


def _tiny(n: int = 24) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, SIZE, SIZE, generator=g), (torch.arange(n) % 2).float())


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(SIZE)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _logged_steps(acc: RDPAccountant) -> int:
    return sum(num_steps for _, _, num_steps in acc.history)


@pytest.mark.parametrize(
    ("n", "batch", "epochs", "expected"),
    [(100, 32, 2, (8, 0.25)), (64, 32, 3, (6, 0.5)), (10, 32, 1, (1, 1.0)), (5, 1, 4, (20, 0.2)), (7, 2, 0, (0, 0.25))],
)
def test_planned_steps(n: int, batch: int, epochs: int, expected: tuple[int, float]) -> None:
    steps, rate = planned_steps(n, batch, epochs)
    assert steps == expected[0] and rate == pytest.approx(expected[1])


@pytest.mark.parametrize("args", [(0, 32, 1), (10, 0, 1), (10, 2, -1)])
def test_planned_steps_rejects_nonsense(args: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        planned_steps(*args)


def test_non_dp_training_learns_the_toy_task(splits: tuple[ManifestDataset, ManifestDataset]) -> None:
    train, test = splits
    model = _model()
    keys = list(model.state_dict())
    before = _flat(model)
    loss_before = evaluate(model, train)["loss"]
    out = train_local(model, train, epochs=8, batch_size=16, lr=0.02, seed=0)
    assert isinstance(out, TrainOutcome)
    assert (out.steps, out.sample_rate) == planned_steps(len(train), 16, 8)
    assert out.num_examples == len(train)
    assert list(model.state_dict()) == keys
    assert not torch.equal(before, _flat(model))
    assert out.loss < loss_before
    assert evaluate(model, train)["loss"] < loss_before
    metrics = evaluate(model, test)
    assert metrics["auc"] > 0.8, metrics


def test_dp_records_planned_steps_in_the_given_accountant() -> None:
    data = _tiny()
    model = _model()
    keys = list(model.state_dict())
    before = _flat(model)
    acc = RDPAccountant()
    out = train_local(model, data, epochs=2, batch_size=8, lr=0.05, dp=DPSettings(1.0, 1.0), accountant=acc, seed=1)
    steps, rate = planned_steps(len(data), 8, 2)
    assert (out.steps, out.sample_rate) == (steps, rate)
    assert _logged_steps(acc) == steps
    assert {(sigma, q) for sigma, q, _ in acc.history} == {(1.0, rate)}
    # trained in place, handed back as the same plain module
    assert type(model).__name__ == "ScatterCTNet"
    assert list(model.state_dict()) == keys
    assert not torch.equal(before, _flat(model))
    for p in model.parameters():
        assert not hasattr(p, "grad_sample") and p.grad is None
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
        assert not hasattr(m, "activations")


def test_dp_spend_composes_across_calls() -> None:
    data = _tiny()
    model = _model()
    acc = RDPAccountant()
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    train_local(model, data, epochs=1, batch_size=8, lr=0.05, dp=dp, accountant=acc, seed=1)
    eps1 = acc.get_epsilon(DELTA)
    # the ledger persists the accountant between rounds
    restored = RDPAccountant()
    restored.load_state_dict(acc.state_dict())
    train_local(model, data, epochs=1, batch_size=8, lr=0.05, dp=dp, accountant=restored, seed=2)
    eps2 = restored.get_epsilon(DELTA)
    assert eps2 > eps1 > 0
    assert _logged_steps(restored) == 2 * planned_steps(len(data), 8, 1)[0]


def test_dp_without_accountant_and_with_empty_poisson_batches() -> None:
    """Batch size 1 over 5 examples: some Poisson batches are empty and still count as steps."""
    data = _tiny(5)
    model = _model()
    out = train_local(model, data, epochs=4, batch_size=1, lr=0.05, dp=DPSettings(1.0, 1.0), seed=3)
    assert out.steps == planned_steps(5, 1, 4)[0] == 20
    assert all(math.isfinite(v) for v in _flat(model).tolist())


def test_seed_makes_training_reproducible() -> None:
    data = _tiny()
    for dp in (None, DPSettings(1.0, 1.0)):
        a, b = _model(), _model()
        train_local(a, data, epochs=1, batch_size=8, lr=0.05, dp=dp, seed=5)
        train_local(b, data, epochs=1, batch_size=8, lr=0.05, dp=dp, seed=5)
        assert torch.equal(_flat(a), _flat(b))


@pytest.mark.parametrize("dp", [None, DPSettings(1.0, 1.0)])
def test_proximal_term_pulls_towards_the_start_weights(dp: DPSettings | None) -> None:
    data = _tiny()
    start = _model()
    w0 = _flat(start)
    distances = {}
    for mu in (0.0, 1.0):
        model = _model()
        train_local(model, data, epochs=2, batch_size=8, lr=0.1, dp=dp, proximal_mu=mu, seed=9)
        distances[mu] = float((_flat(model) - w0).norm())
    assert 0 < distances[1.0] < distances[0.0]


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        train_local(_model(), _tiny(), epochs=1, batch_size=8, lr=0.0)
    with pytest.raises(ValueError):
        train_local(_model(), _tiny(), epochs=1, batch_size=8, lr=0.1, proximal_mu=-1.0)
    with pytest.raises(ValueError):
        DPSettings(noise_multiplier=1.0, max_grad_norm=0.0)


@pytest.mark.parametrize("dp", [None, DPSettings(1.0, 1.0)])
def test_optimizer_state_carries_adam_moments_across_calls(dp: DPSettings | None) -> None:
    """Round 2 continues round 1's Adam (step count and moments), so it does not re-warm."""
    data = _tiny()
    steps = planned_steps(len(data), 8, 1)[0]
    state: dict[str, object] = {}
    model = _model()
    train_local(model, data, epochs=1, batch_size=8, lr=0.01, optimizer="adam", dp=dp, optimizer_state=state, seed=1)
    first = {i: float(s["step"]) for i, s in state["state"].items()}  # type: ignore[index]
    assert first and set(first.values()) == {float(steps)}
    moments = state["state"][0]["exp_avg"].clone()  # type: ignore[index]
    train_local(model, data, epochs=1, batch_size=8, lr=0.01, optimizer="adam", dp=dp, optimizer_state=state, seed=2)
    assert {float(s["step"]) for s in state["state"].values()} == {2.0 * steps}  # type: ignore[union-attr]
    train_local(model, data, epochs=1, batch_size=8, lr=0.002, optimizer="adam", dp=dp, optimizer_state=state, seed=2)
    assert [g["lr"] for g in state["param_groups"]] == [0.002]  # type: ignore[index]  # the call's lr, not the saved one
    assert not torch.equal(moments, state["state"][0]["exp_avg"])  # type: ignore[index]
    assert {float(s["step"]) for s in state["state"].values()} == {3.0 * steps}  # type: ignore[union-attr]
    # Without it, every call starts from zero moments: the carried state is what differs.
    a, b = _model(), _model()
    warm: dict[str, object] = {}
    train_local(a, data, epochs=1, batch_size=8, lr=0.01, optimizer="adam", dp=dp, optimizer_state=warm, seed=1)
    train_local(b, data, epochs=1, batch_size=8, lr=0.01, optimizer="adam", dp=dp, seed=1)
    assert torch.equal(_flat(a), _flat(b))
    train_local(a, data, epochs=1, batch_size=8, lr=0.01, optimizer="adam", dp=dp, optimizer_state=warm, seed=3)
    train_local(b, data, epochs=1, batch_size=8, lr=0.01, optimizer="adam", dp=dp, seed=3)
    assert not torch.equal(_flat(a), _flat(b))


def test_optimizer_state_of_another_model_is_refused() -> None:
    state: dict[str, object] = {}
    train_local(_model(), _tiny(), epochs=1, batch_size=8, lr=0.01, optimizer="adam", optimizer_state=state)
    state["param_groups"][0]["params"] = [0]  # type: ignore[index]  # one parameter: not this model
    with pytest.raises(ValueError, match="optimizer_state does not fit"):
        train_local(_model(), _tiny(), epochs=1, batch_size=8, lr=0.01, optimizer="adam", optimizer_state=state)


def test_round_lr_cosine_decays_to_the_floor_and_constant_stays() -> None:
    from models.training import LR_FLOOR, round_lr

    rates = [round_lr(0.02, r, 20) for r in range(1, 21)]
    assert rates[0] == pytest.approx(0.02)
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    assert LR_FLOOR * 0.02 < rates[-1] < 0.2 * 0.02
    assert round_lr(0.02, 25, 20) == rates[-1]  # past the planned rounds (a resumed run): stays at the end
    assert [round_lr(0.02, r, 20, "constant") for r in (1, 20)] == [0.02, 0.02]
    assert round_lr(0.5, 1, 1) == 0.5
    with pytest.raises(ValueError, match="lr schedule"):
        round_lr(0.02, 1, 20, "step")
    with pytest.raises(ValueError):
        round_lr(0.02, 0, 20)


def test_unseeded_dp_noise_does_not_follow_the_global_rng() -> None:
    """Production (seed=None): the noise must not be predictable from torch's global seed."""
    data = _tiny()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # as if some code in the process had seeded torch with a known value
        model = _model()
        train_local(model, data, epochs=1, batch_size=8, lr=0.05, dp=DPSettings(1.0, 1.0))
        runs.append(_flat(model))
    assert not torch.equal(runs[0], runs[1])


# ---- tasks and physical batches -------------------------------------------------------------------
def _separable(task: str, n: int = 60) -> tuple[TensorDataset, nn.Module]:
    """Gaussian clusters a linear model separates: 3 classes, or 2 findings present independently."""
    gen = torch.Generator().manual_seed(0)
    if task == "multiclass":
        y = torch.arange(n) % 3
        centres = torch.eye(3, 8) * 3.0
        x = centres[y] + torch.randn(n, 8, generator=gen) * 0.5
        outputs = 3
    else:
        y = torch.stack([torch.arange(n) % 2, torch.arange(n) // 2 % 2], 1).float()
        x = torch.cat([y * 6.0 - 3.0, torch.zeros(n, 6)], 1) + torch.randn(n, 8, generator=gen) * 0.5
        outputs = 2
    torch.manual_seed(0)
    return TensorDataset(x, y), nn.Linear(8, outputs)


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_multiclass_and_multilabel_losses_train(task: str) -> None:
    from models.training import TaskLoss

    data, model = _separable(task)
    x, y = data.tensors
    loss_fn = TaskLoss(task)
    with torch.no_grad():
        before = float(loss_fn(model(x), y))
    out = train_local(model, data, epochs=15, batch_size=10, lr=0.1, task=task, seed=0)
    with torch.no_grad():
        logits = model(x)
        after = float(loss_fn(logits, y))
    assert out.loss < before and after < 0.3 * before, (before, after)
    predicted = logits.argmax(1) if task == "multiclass" else (logits > 0).float()
    assert (predicted == y).float().mean() > 0.95
    # under DP too (ghost clipping needs one loss per example from the task's loss)
    for mode in ("hooks", "ghost"):
        data, model = _separable(task)
        dp_out = train_local(model, data, epochs=2, batch_size=10, lr=0.1, task=task, seed=0,
                             dp=DPSettings(0.5, 1.0), grad_sample_mode=mode)
        assert dp_out.steps == planned_steps(len(data), 10, 2)[0] and math.isfinite(dp_out.loss)


def test_task_loss_per_example_and_mean() -> None:
    from models.training import TaskLoss

    logits = torch.randn(4, 3)
    cases = {"binary": (logits[:, :1], torch.tensor([0.0, 1.0, 1.0, 0.0])),
             "multiclass": (logits, torch.tensor([0, 2, 1, 2])),
             "multilabel": (logits, (torch.rand(4, 3) > 0.5).float())}
    for task, (z, y) in cases.items():
        per = TaskLoss(task, reduction="none")(z, y)
        assert per.shape == (4,)
        torch.testing.assert_close(TaskLoss(task)(z, y), per.mean())
    torch.testing.assert_close(TaskLoss("multiclass")(logits, cases["multiclass"][1]),
                               nn.functional.cross_entropy(logits, cases["multiclass"][1]))
    torch.testing.assert_close(TaskLoss("multilabel")(logits, cases["multilabel"][1]),
                               nn.functional.binary_cross_entropy_with_logits(logits, cases["multilabel"][1]))
    with pytest.raises(ValueError, match="task must be one of"):
        train_local(_model(), _tiny(), epochs=1, batch_size=8, lr=0.1, task="regression")


@pytest.mark.parametrize("mode", ["hooks", "ew", "ghost"])
def test_large_logical_batches_are_split_into_physical_ones(mode: str) -> None:
    """Memory bounds the physical batch, not the privacy: same steps, same q, same update (noise 0)."""
    data = _tiny(24)
    results = []
    for physical in (128, 3):
        model = _model()
        sizes: list[int] = []
        model.trainable.register_forward_pre_hook(lambda _m, args, seen=sizes: seen.append(args[0].shape[0]))
        acc = RDPAccountant()
        out = train_local(model, data, epochs=2, batch_size=12, lr=0.1, dp=DPSettings(0.0, 0.05), accountant=acc,
                          seed=4, grad_sample_mode=mode, max_physical_batch_size=physical)
        assert (out.steps, out.sample_rate) == planned_steps(len(data), 12, 2)
        assert acc.history == [(0.0, out.sample_rate, out.steps)]
        results.append((_flat(model), max(sizes)))
    (whole, big), (split, small) = results
    assert big > 3 >= small
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-4)


def test_non_dp_batches_are_accumulated_over_physical_chunks() -> None:
    data = _tiny(24)
    a, b = _model(), _model()
    train_local(a, data, epochs=1, batch_size=12, lr=0.1, seed=1)
    train_local(b, data, epochs=1, batch_size=12, lr=0.1, seed=1, max_physical_batch_size=5)
    torch.testing.assert_close(_flat(a), _flat(b), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        train_local(_model(), data, epochs=1, batch_size=12, lr=0.1, max_physical_batch_size=0)
