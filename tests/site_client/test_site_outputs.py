"""What leaves a site: no training loss, no exact training-set size, nothing from a hostile model.

The attack these tests replay: a coordinator sends a crafted global model (all weights 0, final bias
-50) with batch-size >= n. Every logit is then -50, so the mean training loss is 50 * positives / n:
with the loss and n in the reply, the coordinator reads the exact count of positive labels and tells
two datasets that differ in one patient apart with certainty. A NaN or huge model is refused before
anything is spent; a non-finite update or optimizer state is never released or saved.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from torch import nn
from torch.utils.data import TensorDataset

from anonymization.audit import AuditTrail
from coordinator.federation import initial_state
from medfed.protocol import SITE_REFUSED
from medfed.settings import RunConfig, SiteConfig
from medfed.wire import pack
from models.accounting import epsilon_of_history
from models.dataset import ManifestDataset
from models.network import build_model
from models.training import DPSettings, planned_steps, train_local
from site_client.client_app import build_app
from site_client.egress import TRAIN_METRICS
from site_client.replay import ReplayStore
from site_client.task import (
    ENROLMENT_FILE,
    SiteRefusal,
    enrolled_size_bucket,
    ledger_for,
    load_optimizer_state,
    save_optimizer_state,
    size_bucket,
    train_round,
)
from tests.models_factory import make_store

# batch-size >= n: every example is in every step (q = 1), as the attack wants.
CFG = RunConfig().with_overrides(image_size=16, batch_size=256, lr=0.05, num_server_rounds=2, optimizer="sgd",
                                  local_epochs=1, noise_multiplier=1.0, calibrate_noise=True, grad_sample_mode="hooks")
HEAD_BIAS = "classifier.head.bias"


# Messages are built here as the coordinator would, outside Flower's runtime (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("task_identity")


def _n(root: Path) -> int:
    return len(ManifestDataset(root, split="train", image_size=CFG.image_size))


def _positives(root: Path) -> int:
    return int(ManifestDataset(root, split="train", image_size=CFG.image_size).labels.sum())


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two de-identified stores that differ in exactly one (positive, training-split) patient."""
    base = tmp_path_factory.mktemp("neighbours")
    store = make_store(base / "with", n_patients=16, images_per_patient=1, size=16, seed=5)
    split = ManifestDataset(store.root, split="train", image_size=CFG.image_size)
    victim = next(p for p, y in zip(split.patients, split.labels, strict=True) if y == 1)
    without = base / "without"
    shutil.copytree(store.root, without)
    store.root = without
    store.rows = [r for r in store.rows if r["patient"] != victim]
    store.write_manifest()
    return base / "with", without


def _site(tmp_path: Path, data: Path, name: str = "hospital-o", **extra: object) -> SiteConfig:
    site = SiteConfig(name=name, data_dir=data, state_dir=tmp_path / name / "state",
                      audit_dir=tmp_path / name / "audit", epsilon_cap=50.0, delta=1e-3)
    return site.model_copy(update=extra)


def _crafted() -> dict[str, torch.Tensor]:
    """The attack's global model: every weight 0, the final bias -50 (every logit is -50)."""
    state = {k: torch.zeros_like(v) for k, v in initial_state(CFG).items()}
    state[HEAD_BIAS] = torch.full_like(state[HEAD_BIAS], -50.0)
    return state


def _context(site: SiteConfig, tmp_path: Path) -> Context:
    toml = tmp_path / f"{site.name}.toml"
    toml.write_text(site.to_toml())
    return Context(run_id=7, node_id=1, node_config={"site-config": str(toml)}, state=RecordDict(), run_config={})


def _msg(state: dict[str, torch.Tensor], kind: str = "train") -> Message:
    return Message(content=RecordDict({"arrays": pack(state), "config": ConfigRecord({"server-round": 1})}),
                   dst_node_id=1, message_type=kind)


def test_the_crafted_model_turns_the_training_loss_into_a_label_count(neighbours: tuple[Path, Path]) -> None:
    """Why train-loss may not leave: (loss * n / 50) is exactly the number of positive labels."""
    root = neighbours[0]
    model = build_model(CFG.image_size)
    model.load_state_dict(_crafted())
    dataset = ManifestDataset(root, split="train", image_size=CFG.image_size)
    outcome = train_local(model, dataset, epochs=1, batch_size=CFG.batch_size, lr=CFG.lr,
                          dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0), grad_sample_mode="hooks", seed=0)
    assert outcome.loss * len(dataset) / 50 == pytest.approx(_positives(root), abs=1e-3)


def test_neighbouring_datasets_give_indistinguishable_train_replies(tmp_path: Path,
                                                                     neighbours: tuple[Path, Path]) -> None:
    with_one, without = neighbours
    n_with, n_without = _n(with_one), _n(without)
    assert n_with == n_without + 1 and _positives(with_one) == _positives(without) + 1
    assert size_bucket(n_with) == size_bucket(n_without), "the neighbours must share a bucket for this test"
    bucket = size_bucket(n_with)

    replies = [train_round(_site(tmp_path, data, name), CFG, "run-o", 1, _crafted())
               for data, name in ((with_one, "with"), (without, "without"))]
    for reply in replies:
        assert reply.state_dict is not None, reply.declined
        assert "train-loss" not in reply.metrics and set(reply.metrics) <= TRAIN_METRICS
        assert reply.metrics["num-examples"] == bucket
    a, b = (r.metrics for r in replies)
    # Everything but the (DP) update is identical: the bucket, the rate, the steps, sigma, epsilon.
    assert a == b
    steps, q = planned_steps(bucket, CFG.batch_size, CFG.local_epochs)
    assert a["steps"] == steps and a["sample-rate"] == q
    assert a["epsilon"] == pytest.approx(epsilon_of_history([(a["noise-multiplier"], q, steps)], 1e-3, CFG.accountant))


def test_the_poisson_rate_is_planned_on_the_bucket_not_on_n(tmp_path: Path, neighbours: tuple[Path, Path]) -> None:
    root = neighbours[0]
    n = _n(root)
    cfg = CFG.with_overrides(batch_size=3, calibrate_noise=False)
    site = _site(tmp_path, root, size_bucket=4 * n)  # set by the operator; far from n on purpose
    reply = train_round(site, cfg, "run-q", 1, initial_state(cfg))
    steps, q = planned_steps(4 * n, 3, 1)
    assert planned_steps(n, 3, 1) != (steps, q)
    assert (reply.metrics["steps"], reply.metrics["sample-rate"], reply.metrics["num-examples"]) == (steps, q, 4 * n)
    (trained,) = [r for r in AuditTrail(site.audit_path).records() if r["kind"] == "round_trained"]
    assert (trained["steps"], trained["sample_rate"]) == (steps, q)  # the site's own record, and what Opacus ran
    assert ledger_for(site).epsilon("run-q", site.delta) == pytest.approx(
        epsilon_of_history([(1.0, q, steps)], site.delta, cfg.accountant))


def test_train_local_samples_at_the_planned_rate_and_scales_by_the_planned_size() -> None:
    """Opacus draws each real example at q = batch / sampling_size and divides by sampling_size * q, not n * q."""
    from opacus.accountants import RDPAccountant

    n, planned, clip = 15, 10, 0.1
    data = TensorDataset(torch.ones(n, 1), torch.zeros(n))
    acc = RDPAccountant()
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    out = train_local(model, data, epochs=1, batch_size=5, lr=1.0, dp=DPSettings(1.0, clip), accountant=acc,
                      sampling_size=planned, seed=0)
    assert (out.steps, out.sample_rate) == planned_steps(planned, 5, 1) == (2, 0.5)
    assert acc.history == [(1.0, 0.5, 2)]
    # q = 1, no noise: each of the n examples adds a clipped gradient of `clip`; the sum is divided by 10.
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    train_local(model, data, epochs=1, batch_size=100, lr=1.0, dp=DPSettings(0.0, clip), sampling_size=planned,
                seed=0)
    assert float(model.weight) == pytest.approx(-n * clip / planned, rel=1e-4)  # Opacus' default: -clip


def test_the_bucket_is_coarse_and_fixed_at_enrolment(tmp_path: Path, neighbours: tuple[Path, Path]) -> None:
    assert [size_bucket(n) for n in (1, 9, 10, 16, 99, 987, 4321, 10000)] == [1, 9, 10, 10, 90, 900, 4000, 10000]
    with pytest.raises(ValueError):
        size_bucket(0)
    site = _site(tmp_path, neighbours[0])
    assert enrolled_size_bucket(site, 18) == 10
    assert enrolled_size_bucket(site, 57) == 10  # the split grew: the published bucket does not move
    assert json.loads((site.state_dir / ENROLMENT_FILE).read_text())["size-bucket"] == 10
    assert enrolled_size_bucket(site.model_copy(update={"size_bucket": 50}), 18) == 50  # site.toml rules
    (site.state_dir / ENROLMENT_FILE).write_text("{torn")
    with pytest.raises(SiteRefusal, match="unreadable.*set size-bucket in site.toml"):
        enrolled_size_bucket(site, 18)
    # A training round enrols the site (from its training split) and publishes that bucket.
    fresh = _site(tmp_path, neighbours[0], name="fresh")
    reply = train_round(fresh, CFG, "run-e", 1, initial_state(CFG))
    stored = json.loads((fresh.state_dir / ENROLMENT_FILE).read_text())["size-bucket"]
    assert stored == reply.metrics["num-examples"] == size_bucket(_n(neighbours[0]))


@pytest.mark.parametrize("poison", ["nan", "inf", "huge"])
def test_a_hostile_model_is_refused_before_any_spend(tmp_path: Path, neighbours: tuple[Path, Path],
                                                      poison: str) -> None:
    site = _site(tmp_path, neighbours[0])
    state = initial_state(CFG)
    value = {"nan": float("nan"), "inf": float("inf"), "huge": 2 * site.max_model_abs}[poison]
    state[HEAD_BIAS][0] = value
    with pytest.raises(SiteRefusal, match="refuses the global model.*nothing was spent"):
        train_round(site, CFG, "run-h", 1, state)
    reply = build_app(CFG)(_msg(state), _context(site, tmp_path))
    assert reply.has_error() and reply.error.code == SITE_REFUSED
    assert HEAD_BIAS in reply.error.reason and ("non-finite" if poison != "huge" else "max-model-abs") \
        in reply.error.reason
    ledger = ledger_for(site)
    assert ledger.epsilon("7", site.delta) == 0.0 and ledger.rounds("7") == []
    assert ledger.epsilon("run-h", site.delta) == 0.0 and ledger.rounds("run-h") == []
    refused = [r for r in AuditTrail(site.audit_path).records() if r["kind"] == "round_refused"]
    assert len(refused) == 1 and "refuses the global model" in refused[0]["reason"]
    assert not (site.state_dir / "optimizer-state").exists()
    # The same model is not scored either.
    ev = build_app(CFG)(_msg(state, "evaluate"), _context(site, tmp_path))
    assert ev.has_error() and ev.error.code == SITE_REFUSED and "refuses the global model" in ev.error.reason


def test_max_model_abs_is_the_sites_choice(tmp_path: Path, neighbours: tuple[Path, Path]) -> None:
    state = initial_state(CFG)
    state[HEAD_BIAS][0] = 5.0
    tight = _site(tmp_path, neighbours[0], max_model_abs=1.0)
    with pytest.raises(SiteRefusal, match=r"magnitude 5.*max-model-abs 1\b"):
        train_round(tight, CFG, "run-m", 1, state)
    assert train_round(_site(tmp_path, neighbours[0], name="loose"), CFG, "run-m", 1, state).state_dict is not None


def test_a_non_finite_update_is_never_released_nor_its_optimizer_state_saved(
        tmp_path: Path, neighbours: tuple[Path, Path]) -> None:
    """A hostile run config (lr 1e37) overflows the update: refused before the commit, nothing spent or kept.

    The site's own max-lr bound would refuse this run at once; raised here to reach the check after training.
    """
    from medfed.settings import RunBounds

    site = _site(tmp_path, neighbours[0]).model_copy(update={"run_bounds": RunBounds(max_lr=1e38)})
    cfg = CFG.with_overrides(lr=1e37, optimizer="adam", keep_optimizer_state=True, local_epochs=2)
    reply = build_app(cfg)(_msg(initial_state(cfg)), _context(site, tmp_path))
    assert reply.has_error() and reply.error.code == SITE_REFUSED
    assert "refuses to release round 1" in reply.error.reason and "non-finite" in reply.error.reason
    ledger = ledger_for(site)
    assert ledger.epsilon("7", site.delta) == 0.0 and [r["status"] for r in ledger.rounds("7")] == []
    assert ReplayStore(site.state_dir).released("7") == []
    assert not list((site.state_dir / ReplayStore(site.state_dir).root.name).rglob("update.pt"))
    assert load_optimizer_state(site, "7") == {} and not (site.state_dir / "optimizer-state").exists()
    kinds = [r["kind"] for r in AuditTrail(site.audit_path).records()]
    assert "round_refused" in kinds and "round_trained" not in kinds and "egress" not in kinds


def test_non_finite_optimizer_state_is_never_saved_nor_loaded(tmp_path: Path, neighbours: tuple[Path, Path]) -> None:
    site = _site(tmp_path, neighbours[0])
    good = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1}]}
    save_optimizer_state(site, "run-s", good)
    poisoned = {"state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.tensor([1.0, float("nan")])}},
                "param_groups": [{"lr": 0.1}]}
    save_optimizer_state(site, "run-s", poisoned)
    kept = load_optimizer_state(site, "run-s")
    assert float(kept["state"][0]["step"]) == 3.0  # type: ignore[index]  # the last good state stays
    # A NaN state already on disk (written before this check existed) is not loaded: a fresh optimizer.
    path = next((site.state_dir / "optimizer-state").glob("*.pt"))
    torch.save(poisoned, path)
    assert load_optimizer_state(site, "run-s") == {}


def test_a_round_is_recorded_trained_only_after_its_spend_is_committed(
    tmp_path: Path, neighbours: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit trail may never say "trained" for a round whose spend the ledger does not hold."""
    from site_client.ledger import PrivacyLedger

    site = _site(tmp_path, neighbours[0])
    cfg = CFG.with_overrides(calibrate_noise=False)
    real_commit = PrivacyLedger.commit_spend
    kinds_at_commit: list[list[str]] = []

    def spy(self: PrivacyLedger, *args: object, **kwargs: object) -> object:
        kinds_at_commit.append([r["kind"] for r in AuditTrail(site.audit_path).records()])
        return real_commit(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(PrivacyLedger, "commit_spend", spy)
    assert train_round(site, cfg, "run-order", 1, initial_state(cfg)).state_dict is not None
    assert len(kinds_at_commit) == 1 and "round_trained" not in kinds_at_commit[0]
    assert [r["server_round"] for r in AuditTrail(site.audit_path).records() if r["kind"] == "round_trained"] == [1]

    def disk_full(self: PrivacyLedger, *args: object, **kwargs: object) -> object:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PrivacyLedger, "commit_spend", disk_full)
    with pytest.raises(OSError, match="No space"):
        train_round(site, cfg, "run-order", 2, initial_state(cfg))
    assert [r["server_round"] for r in AuditTrail(site.audit_path).records() if r["kind"] == "round_trained"] == [1]
    assert [r["server_round"] for r in ledger_for(site).rounds("run-order") if r["status"] == "spent"] == [1]
