"""Empirical audit: a model trained without DP on a small site leaks membership; the DP model does not.

Also the `medfed privacy` commands (epsilon, plan, audit) through Typer's CliRunner.
``python -m tests.models.test_privacy_audit`` prints the attack table the README shows.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medfed.cli import app
from models.accounting import epsilon, plan
from models.dataset import ManifestDataset
from models.membership import AttackResult, attack_metrics, lira_attack, loss_threshold_attack
from models.network import build_model
from models.training import DPSettings, TrainOutcome, train_local
from tests.models_factory import make_store, torch_threads

SIZE = 32
#: The target's recipe: a small site, many epochs; Adam at lr 0.003 memorises its 40 images
#: (training loss ~0.02; at lr 0.01 the small batches keep it from settling at all).
RECIPE = {"epochs": 30, "batch_size": 8, "lr": 0.003, "optimizer": "adam"}
NOISE = 1.5
DELTA = 1e-3
runner = CliRunner()


def _stores(root: Path) -> tuple[Path, Path]:
    # A faint finding (blob of 60 HU) that 40 images cannot teach well: what the model learns is them.
    make_store(root / "members", n_patients=20, images_per_patient=2, size=SIZE, seed=11, blob_hu=60.0)
    make_store(root / "non-members", n_patients=20, images_per_patient=2, size=SIZE, seed=12, blob_hu=60.0)
    return root / "members", root / "non-members"


def _train(members: ManifestDataset, dp: DPSettings | None, seed: int = 0) -> tuple[torch.nn.Module, TrainOutcome]:
    torch.manual_seed(seed)
    model = build_model(SIZE)
    with torch_threads(1):
        outcome = train_local(model, members, dp=dp, seed=seed, **RECIPE)  # type: ignore[arg-type]
    return model, outcome


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    members_dir, non_dir = _stores(tmp_path_factory.mktemp("mia"))
    members = ManifestDataset(members_dir, split="all", image_size=SIZE)
    non = ManifestDataset(non_dir, split="all", image_size=SIZE)
    plain, _ = _train(members, None)
    private, outcome = _train(members, DPSettings(NOISE, 1.0))
    model_pt = members_dir.parent / "model.pt"
    torch.save(plain.state_dict(), model_pt)
    return {"members": members, "non": non, "members_dir": members_dir, "non_dir": non_dir, "plain": plain,
            "private": private, "outcome": outcome, "model_pt": model_pt}


def test_non_dp_model_leaks_clearly_more_than_the_dp_model(site: dict) -> None:
    leak = loss_threshold_attack(site["plain"], site["members"], site["non"])
    dp = loss_threshold_attack(site["private"], site["members"], site["non"])
    eps = epsilon(site["outcome"].sample_rate, NOISE, site["outcome"].steps, DELTA)
    assert leak.members == dp.members == len(site["members"]) == 40
    assert leak.auc >= 0.8, leak
    assert dp.auc <= 0.65, (dp, eps)
    assert leak.auc - dp.auc >= 0.25
    assert eps < 10  # a guarantee worth the name, not a formality


def test_attack_metrics_on_known_scores() -> None:
    perfect = attack_metrics("x", torch.arange(10.0, 20.0).numpy(), torch.arange(0.0, 10.0).numpy())
    assert (perfect.auc, perfect.tpr_at_low_fpr) == (1.0, 1.0)
    chance = attack_metrics("x", torch.zeros(50).numpy(), torch.zeros(50).numpy())
    assert chance.auc == 0.5 and chance.tpr_at_low_fpr == 0.0
    with pytest.raises(ValueError, match="non-finite"):
        attack_metrics("x", torch.tensor([float("nan")]).numpy(), torch.zeros(1).numpy())


def test_lira_needs_shadows() -> None:
    with pytest.raises(ValueError, match="at least 2 shadow"):
        lira_attack(build_model(SIZE), [], [], lambda ds, s: build_model(SIZE), num_shadows=1)


def _last_float(text: str) -> float:
    return float(text.strip().splitlines()[-1])


def test_cli_epsilon_prints_epsilon_last() -> None:
    for acc in ("rdp", "prv"):
        res = runner.invoke(app, ["privacy", "epsilon", "--sample-rate", "0.05", "--noise-multiplier", "1.1",
                                  "--steps", "300", "--delta", "1e-5", "--accountant", acc])
        assert res.exit_code == 0, res.output
        assert _last_float(res.output) == pytest.approx(epsilon(0.05, 1.1, 300, 1e-5, acc), rel=1e-5)
    bad = runner.invoke(app, ["privacy", "epsilon", "--sample-rate", "1.5", "--noise-multiplier", "1",
                              "--steps", "3", "--delta", "1e-5"])
    assert bad.exit_code == 2 and "sample_rate must lie in [0, 1]" in bad.output


def test_cli_plan_prints_noise_and_epsilon() -> None:
    res = runner.invoke(app, ["privacy", "plan", "--epsilon", "3", "--delta", "1e-5", "--dataset-size", "500",
                              "--batch-size", "25", "--rounds", "5", "--local-epochs", "2"])
    assert res.exit_code == 0, res.output
    m = re.fullmatch(r"noise-multiplier ([\d.]+) epsilon ([\d.]+)", res.output.strip().splitlines()[-1])
    assert m is not None, res.output
    p = plan(3.0, 1e-5, 500, 25, 5, 2)
    assert float(m.group(1)) == pytest.approx(p.noise_multiplier) and float(m.group(2)) == pytest.approx(
        p.epsilon, abs=1e-4
    )
    assert float(m.group(2)) <= 3.0
    bad = runner.invoke(app, ["privacy", "plan", "--epsilon", "3", "--delta", "0.05", "--dataset-size", "50",
                              "--batch-size", "5", "--rounds", "5", "--local-epochs", "1"])
    assert bad.exit_code == 2 and "not below 1/n = 1/50" in bad.output


def test_cli_audit_runs_both_attacks(site: dict) -> None:
    res = runner.invoke(app, ["privacy", "audit", str(site["model_pt"]), "--members", str(site["members_dir"]),
                              "--non-members", str(site["non_dir"]), "--image-size", str(SIZE), "--shadows", "2",
                              "--shadow-epochs", "3", "--shadow-lr", "0.01", "--shadow-batch-size", "8"])
    assert res.exit_code == 0, res.output
    lines = dict(re.findall(r"^(loss-threshold|lira): AUC ([\d.]+)", res.output, flags=re.M))
    assert set(lines) == {"loss-threshold", "lira"}
    want = loss_threshold_attack(site["plain"], site["members"], site["non"]).auc
    assert float(lines["loss-threshold"]) == pytest.approx(want, abs=1e-4)
    assert 0.0 <= float(lines["lira"]) <= 1.0 and "TPR@1%FPR" in res.output


def test_cli_audit_says_what_is_wrong(site: dict, tmp_path: Path) -> None:
    args = ["--members", str(site["members_dir"]), "--non-members", str(site["non_dir"]), "--shadows", "0"]
    missing = runner.invoke(app, ["privacy", "audit", str(tmp_path / "nope.pt"), *args])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    junk = tmp_path / "junk.pt"
    junk.write_text("not a model")
    assert "not a saved state dict" in runner.invoke(app, ["privacy", "audit", str(junk), *args]).output
    other = tmp_path / "other.pt"
    torch.save({"w": torch.zeros(3)}, other)
    assert "does not fit the consortium model" in runner.invoke(app, ["privacy", "audit", str(other), *args]).output
    same = runner.invoke(app, ["privacy", "audit", str(site["model_pt"]), "--members", str(site["members_dir"]),
                               "--non-members", str(site["members_dir"])])
    assert same.exit_code == 2 and "same store" in same.output
    odd = runner.invoke(app, ["privacy", "audit", str(site["model_pt"]), *args, "--shadow-optimizer", "lbfgs"])
    assert odd.exit_code == 2 and "'lbfgs' is not one of 'adam', 'sgd'" in odd.output
    raw = runner.invoke(app, ["privacy", "audit", str(site["model_pt"]), "--members", str(tmp_path),
                              "--non-members", str(site["non_dir"])])
    assert raw.exit_code == 2 and "manifest.csv" in raw.output


def _report(root: Path, shadows: int = 8) -> list[tuple[str, AttackResult, float]]:
    members_dir, non_dir = _stores(root)
    members = ManifestDataset(members_dir, split="all", image_size=SIZE)
    non = ManifestDataset(non_dir, split="all", image_size=SIZE)
    rows = []
    for label, dp in (("no DP", None), (f"DP-SGD σ={NOISE}", DPSettings(NOISE, 1.0))):
        model, outcome = _train(members, dp)
        eps = epsilon(outcome.sample_rate, NOISE, outcome.steps, DELTA) if dp else float("inf")

        def shadow(ds, seed: int, dp: DPSettings | None = dp) -> torch.nn.Module:
            return _train(ds, dp, seed)[0]

        rows.append((label, loss_threshold_attack(model, members, non), eps))
        rows.append((label, lira_attack(model, members, non, shadow, num_shadows=shadows), eps))
    return rows


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print("| model | ε (δ=1e-3) | attack | AUC | TPR @ 1% FPR |")
        print("|---|---|---|---|---|")
        for label, r, eps in _report(Path(tmp), shadows=int(sys.argv[1]) if len(sys.argv) > 1 else 8):
            print(f"| {label} | {eps:.2f} | {r.attack} | {r.auc:.3f} | {r.tpr_at_low_fpr:.3f} |")
