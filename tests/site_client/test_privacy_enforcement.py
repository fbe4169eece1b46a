"""The site enforces its record-level budget: refusals before training, declines, calibration, crash safety,
and a lifetime cap over every run on its data (the coordinator picks run names; it cannot reset the budget)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from anonymization.audit import AuditTrail
from coordinator.federation import initial_state
from medfed.protocol import SITE_DECLINED, SITE_REFUSED
from medfed.settings import RunConfig, SiteConfig
from medfed.wire import pack
from models.accounting import calibrate_noise, epsilon_of_history
from models.training import planned_steps
from site_client.client_app import build_app
from site_client.task import SiteRefusal, evaluate_round, ledger_for, size_bucket, train_round
from tests.models_factory import make_store

# A fixed noise multiplier (no calibration), so each round's spend is known in advance.
CFG = RunConfig().with_overrides(image_size=16, batch_size=3, lr=0.05, num_server_rounds=3, grad_sample_mode="hooks",
                                  optimizer="sgd", local_epochs=1, noise_multiplier=1.0, calibrate_noise=False)
ROOT = Path(__file__).resolve().parents[2]


# Messages are built here as the coordinator would, outside Flower's runtime (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deid")
    make_store(root, n_patients=12, images_per_patient=2, size=16, seed=2)
    return root


def _site(tmp_path: Path, store: Path, cap: float, delta: float = 1e-3, per_run: float | None = None) -> SiteConfig:
    return SiteConfig(name="hospital-p", data_dir=store, state_dir=tmp_path / "state",
                      audit_dir=tmp_path / "audit", epsilon_cap=cap, delta=delta, epsilon_cap_per_run=per_run)


def _n(store: Path) -> int:
    from models.dataset import ManifestDataset

    return len(ManifestDataset(store, split="train", image_size=16))


def _bucket(store: Path) -> int:
    """The size bucket the site publishes and plans its sampling on (its n to one significant digit)."""
    return size_bucket(_n(store))


def _one_round_eps(store: Path, cfg: RunConfig = CFG, sigma: float | None = None, rounds: int = 1) -> float:
    steps, q = planned_steps(_bucket(store), cfg.batch_size, cfg.local_epochs)
    return epsilon_of_history([(sigma or cfg.noise_multiplier, q, steps * rounds)], 1e-3, cfg.accountant)


def _context(site: SiteConfig, tmp_path: Path) -> Context:
    toml = tmp_path / "site.toml"
    toml.write_text(site.to_toml())
    return Context(run_id=7, node_id=1, node_config={"site-config": str(toml)}, state=RecordDict(), run_config={})


def _msg(server_round: int) -> Message:
    return Message(content=RecordDict({"arrays": pack(initial_state(CFG)),
                                       "config": ConfigRecord({"server-round": server_round})}),
                   dst_node_id=1, message_type="train")


def test_a_cap_one_round_cannot_meet_is_refused_with_the_numbers(tmp_path: Path, store: Path) -> None:
    one = _one_round_eps(store)
    site = _site(tmp_path, store, cap=one / 2)
    with pytest.raises(SiteRefusal) as err:
        train_round(site, CFG, "run-r", 1, initial_state(CFG))
    msg = str(err.value)
    assert "refuses the run" in msg and f"{one:.4g}" in msg and f"lifetime cap {one / 2:g}" in msg
    assert "noise-multiplier >= " in msg and "fits 1 round(s)" in msg and "fits 3 round(s)" in msg
    assert f"1/{_n(store)}" not in msg and "n=" not in msg  # the figures are ε, never the data's size
    # the σ it names does fit one round
    need = float(msg.split("noise-multiplier >= ")[1].split(" ")[0])
    assert _one_round_eps(store, sigma=need) <= one / 2 < _one_round_eps(store, sigma=need * 0.99)
    ledger = ledger_for(site)
    assert ledger.epsilon("run-r", site.delta) == 0.0
    assert [(r["status"], "refuses" in r["reason"]) for r in ledger.rounds("run-r")] == [("declined", True)]
    # through the ClientApp: the coordinator hears SITE_REFUSED, the audit trail records it
    reply = build_app(CFG)(_msg(1), _context(site, tmp_path))
    assert reply.has_error() and reply.error.code == SITE_REFUSED and "refuses the run" in reply.error.reason
    assert "round_refused" in [r["kind"] for r in AuditTrail(site.audit_path).records()]


def test_a_round_over_the_cap_after_spending_is_declined_and_audited(tmp_path: Path, store: Path) -> None:
    one = _one_round_eps(store)
    site = _site(tmp_path, store, cap=one * 1.2)  # room for one round, not two
    app, ctx = build_app(CFG), _context(site, tmp_path)
    first = app(_msg(1), ctx)
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    second = app(_msg(2), ctx)
    assert second.has_error() and second.error.code == SITE_DECLINED and "declines round 2" in second.error.reason
    records = AuditTrail(site.audit_path).records()
    (declined,) = [r for r in records if r["kind"] == "round_declined"]
    assert declined["server_round"] == 2 and declined["epsilon_projected"] > site.epsilon_cap
    assert declined["reason"] == second.error.reason
    ledger = ledger_for(site)
    assert [r["status"] for r in ledger.rounds("7")] == ["spent", "declined"]
    assert ledger.epsilon("7", site.delta) == pytest.approx(one)


def test_calibrated_noise_spends_the_cap_over_the_run_and_no_more(tmp_path: Path, store: Path) -> None:
    cfg = CFG.with_overrides(calibrate_noise=True, noise_multiplier=0.5)
    one_at_floor = _one_round_eps(store, cfg)
    cap = one_at_floor * 1.5  # 3 rounds at the floor would overspend: calibration must add noise
    site = _site(tmp_path, store, cap=cap)
    steps, q = planned_steps(_bucket(store), cfg.batch_size, cfg.local_epochs)
    evaluations = [(site.evaluation_noise, 1.0, 3)]  # one a round (fraction-evaluate > 0): reserved
    expected = calibrate_noise([], q, steps, 3, cap, site.delta, "prv", floor=0.5, reserve=evaluations)
    assert expected > calibrate_noise([], q, steps, 3, cap, site.delta, "prv", floor=0.5) > 0.5
    state = initial_state(cfg)
    sigmas = []
    for rnd in (1, 2, 3):
        reply = train_round(site, cfg, "run-c", rnd, state)
        assert reply.state_dict is not None, reply.declined
        sigmas.append(reply.metrics["noise-multiplier"])
        state = reply.state_dict
    assert sigmas[0] == expected
    assert all(abs(s - expected) <= 2e-3 * expected for s in sigmas)
    spent = ledger_for(site).epsilon("run-c", site.delta)
    # training alone stays below the cap by what the planned evaluations will cost
    assert spent < cap and 0.98 * cap <= epsilon_of_history(ledger_for(site).history("run-c") + evaluations,
                                                            site.delta, "prv") <= cap
    trained = [r for r in AuditTrail(site.audit_path).records() if r["kind"] == "round_trained"]
    assert [r["noise_multiplier"] for r in trained] == sigmas and all(r["noise_calibrated"] for r in trained)
    # a round past num-server-rounds may only use what is left: far more noise, still within the cap
    late = train_round(site, cfg, "run-c", 4, state)
    assert late.state_dict is not None and late.metrics["noise-multiplier"] > 3 * expected
    assert spent < ledger_for(site).epsilon("run-c", site.delta) <= cap


def test_calibration_that_needs_absurd_noise_is_refused(tmp_path: Path, store: Path) -> None:
    cfg = CFG.with_overrides(calibrate_noise=True, num_server_rounds=50, fraction_evaluate=0.0)
    site = _site(tmp_path, store, cap=0.05)
    with pytest.raises(SiteRefusal, match=r"calibrate-noise over 50 round\(s\), lifetime cap 0.05.*even noise "
                                          r"multiplier 20"):
        train_round(site, cfg, "run-a", 1, initial_state(cfg))
    # with 50 evaluations planned, their reserve alone is over the cap: the refusal says so and what to change
    with pytest.raises(SiteRefusal, match=r"with the planned evaluations reserved.*evaluation-noise"):
        train_round(site, cfg.with_overrides(fraction_evaluate=1.0), "run-b", 1, initial_state(cfg))
    assert ledger_for(site).lifetime_history() == []


def test_delta_not_below_one_over_the_bucket_or_n_is_refused_without_n(tmp_path: Path, store: Path) -> None:
    n, bucket = _n(store), _bucket(store)
    expected = rf"delta=0.1 is too large.*1/size-bucket = 1/{bucket}.*below {0.1 / bucket:.2g}"
    with pytest.raises(SiteRefusal, match=expected) as err:
        train_round(_site(tmp_path, store, cap=50.0, delta=0.1), CFG, "run-d", 1, initial_state(CFG))
    assert str(n) not in str(err.value)
    # A bucket set below n does not loosen delta < 1/n: delta 0.08 is below 1/5 but not below 1/n.
    assert 1 / n <= 0.08
    low = _site(tmp_path / "low", store, cap=50.0, delta=0.08).model_copy(update={"size_bucket": 5})
    with pytest.raises(SiteRefusal, match=r"1/size-bucket = 1/5 and below 1/\(training examples\)") as err:
        train_round(low, CFG, "run-d", 1, initial_state(CFG))
    assert str(n) not in str(err.value) and ledger_for(low).rounds("run-d") == []


def test_the_accountant_is_fixed_for_the_run(tmp_path: Path, store: Path) -> None:
    site = _site(tmp_path, store, cap=50.0)
    assert CFG.accountant == "prv"  # the default: tight (tests/models/test_privacy_accounting.py)
    reply = train_round(site, CFG, "run-p", 1, initial_state(CFG))
    ledger = ledger_for(site)
    assert ledger.accountant_name("run-p") == "prv"
    assert reply.metrics["epsilon"] == pytest.approx(ledger.epsilon("run-p", site.delta))
    assert reply.metrics["epsilon"] < epsilon_of_history(ledger.history("run-p"), site.delta, "rdp")
    with pytest.raises(SiteRefusal, match="never changes accountant mid-run"):
        train_round(site, CFG.with_overrides(accountant="rdp"), "run-p", 2, reply.state_dict)


def test_the_cap_is_the_sites_lifetime_not_each_runs(tmp_path: Path, store: Path) -> None:
    """Run names are the coordinator's: a new name must not buy a fresh budget on the same data."""
    cfg = CFG.with_overrides(calibrate_noise=True, noise_multiplier=0.5)
    cap = _one_round_eps(store, cfg) * 1.5
    site = _site(tmp_path, store, cap=cap)
    ledger = ledger_for(site)
    state = initial_state(cfg)
    for rnd in (1, 2, 3):  # the first run calibrates to all the site's lifetime allows, its evaluations paid
        reply = train_round(site, cfg, "run-1", rnd, state)
        assert reply.state_dict is not None, reply.declined
        state = reply.state_dict
        evaluate_round(site, cfg, "run-1", state, rnd)
    spent = ledger.lifetime_epsilon(site.delta, "prv")
    assert 0.98 * cap <= spent <= cap
    for run in ("run-2", "run-3"):  # the same data under new names: refused before any spend, saying why
        with pytest.raises(SiteRefusal, match="lifetime cap") as err:
            train_round(site, cfg, run, 1, state)
        assert "refuses the run" in str(err.value) and f"{cap:g}" in str(err.value)
        assert ledger.history(run) == []
    assert ledger.lifetime_epsilon(site.delta, "prv") == spent
    # through the ClientApp the coordinator hears SITE_REFUSED with the reason
    reply = build_app(cfg)(_msg(1), _context(site, tmp_path))
    assert reply.has_error() and reply.error.code == SITE_REFUSED and "lifetime" in reply.error.reason


def test_a_fixed_noise_run_stops_at_what_earlier_runs_left(tmp_path: Path, store: Path) -> None:
    one, two, three = (_one_round_eps(store, rounds=r) for r in (1, 2, 3))
    site = _site(tmp_path, store, cap=(two + three) / 2)  # two rounds (not three) in the site's whole life
    ledger = ledger_for(site)
    first = train_round(site, CFG, "run-1", 1, initial_state(CFG))
    assert first.state_dict is not None
    second = train_round(site, CFG, "run-2", 1, initial_state(CFG))  # another run: composes, fits
    assert second.state_dict is not None
    third = train_round(site, CFG, "run-2", 2, second.state_dict)  # its own account is far below the cap ...
    assert third.state_dict is None and "lifetime cap" in third.declined  # ... the site's lifetime is not
    assert ledger.epsilon("run-2", site.delta) == pytest.approx(one)
    life = ledger.lifetime_epsilon(site.delta, "prv")
    assert life == pytest.approx(two) and f"{life:.3f} -> {three:.3f}" in third.declined
    assert [r["status"] for r in ledger.rounds("run-2")] == ["spent", "declined"]


def test_a_per_run_cap_bounds_each_run_within_the_lifetime(tmp_path: Path, store: Path) -> None:
    one, two = _one_round_eps(store), _one_round_eps(store, rounds=2)
    site = _site(tmp_path, store, cap=one * 10, per_run=(one + two) / 2)
    ledger = ledger_for(site)
    state = initial_state(CFG)
    assert train_round(site, CFG, "run-1", 1, state).state_dict is not None
    declined = train_round(site, CFG, "run-1", 2, state)
    assert declined.state_dict is None and "per-run cap" in declined.declined and "lifetime" not in declined.declined
    # another run gets its own per-run allowance while the lifetime has room
    assert train_round(site, CFG, "run-2", 1, state).state_dict is not None
    assert ledger.epsilon("run-1", site.delta) == ledger.epsilon("run-2", site.delta) == pytest.approx(one)
    # calibration meets both caps: a calibrated run spends its per-run cap (evaluations reserved), no more
    cfg = CFG.with_overrides(calibrate_noise=True, noise_multiplier=0.5)
    for rnd in (1, 2, 3):
        reply = train_round(site, cfg, "run-3", rnd, state)
        assert reply.state_dict is not None, reply.declined
    assert ledger.epsilon("run-3", site.delta) <= site.epsilon_cap_per_run
    assert ledger.lifetime_epsilon(site.delta, "prv") <= site.epsilon_cap


def test_the_ledger_refuses_a_commit_over_the_lifetime_cap(tmp_path: Path, store: Path) -> None:
    """Two runs at once both pass the check before training; the commit re-checks under the write lock."""
    from site_client.ledger import CapExceeded

    one, two = _one_round_eps(store), _one_round_eps(store, rounds=2)
    site = _site(tmp_path, store, cap=(one + two) / 2)
    ledger = ledger_for(site)
    steps, q = planned_steps(_bucket(store), CFG.batch_size, CFG.local_epochs)
    accs = {}
    for run in ("run-a", "run-b"):  # both projected alone: each fits
        accs[run] = ledger.accountant(run, "prv")
        assert ledger.project_lifetime(run, noise_multiplier=1.0, sample_rate=q, steps=steps, delta=site.delta) <= \
            site.epsilon_cap
        accs[run].history.append((1.0, q, steps))
    ledger.commit_spend("run-a", 1, accs["run-a"], delta=site.delta, epsilon_cap=site.epsilon_cap, steps=steps,
                        sample_rate=q, noise_multiplier=1.0)
    with pytest.raises(CapExceeded, match="lifetime cap"):
        ledger.commit_spend("run-b", 1, accs["run-b"], delta=site.delta, epsilon_cap=site.epsilon_cap, steps=steps,
                            sample_rate=q, noise_multiplier=1.0)
    assert ledger.history("run-b") == [] and [r["run_id"] for r in ledger.rounds()] == ["run-a"]


_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from coordinator.federation import initial_state
    from medfed.settings import RunConfig
    from medfed.wire import pack
    from site_client import ledger as ledger_mod
    from site_client.client_app import build_app

    toml, signal_file = sys.argv[1], Path(sys.argv[2])
    cfg = RunConfig.from_flower(json.loads(sys.argv[3]))  # the test's CFG
    real_commit = ledger_mod.PrivacyLedger.commit_spend

    def commit_then_wait(self, *args, **kwargs):
        out = real_commit(self, *args, **kwargs)   # the spend is durable ...
        signal_file.write_text("committed")        # ... tell the test, and hang before the reply leaves
        time.sleep(600)
        return out

    ledger_mod.PrivacyLedger.commit_spend = commit_then_wait
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
    msg = Message(content=RecordDict({"arrays": pack(initial_state(cfg)),
                                      "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=1, message_type="train")
    ctx = Context(run_id=7, node_id=1, node_config={"site-config": toml}, state=RecordDict(), run_config={})
    build_app(cfg)(msg, ctx)
    print("REPLY SENT")
    """
)


@pytest.mark.integration
def test_spend_stands_when_the_site_dies_between_commit_and_send(tmp_path: Path, store: Path) -> None:
    site = _site(tmp_path, store, cap=50.0)
    toml = tmp_path / "site.toml"
    toml.write_text(site.to_toml())
    script, signal_file = tmp_path / "site_child.py", tmp_path / "committed"
    script.write_text(_CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, str(script), str(toml), str(signal_file), json.dumps(CFG.to_flower())],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        while not signal_file.exists():
            if child.poll() is not None:
                pytest.fail(f"site process ended before committing: {child.stdout.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("site process did not reach the commit within 300 s")
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)  # the site dies after the commit, before the reply leaves
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert b"REPLY SENT" not in child.stdout.read()

    ledger = ledger_for(site)  # the restarted site opens the same ledger
    (spent,) = ledger.rounds("7")
    assert spent["status"] == "spent" and spent["server_round"] == 1 and spent["epsilon_after"] > 0
    assert ledger.epsilon("7", site.delta) == pytest.approx(spent["epsilon_after"])
    kinds = [r["kind"] for r in AuditTrail(site.audit_path).records()]
    assert "egress" not in kinds  # nothing left the site
    # the restarted site's next round composes on top of the spend that stood
    again = train_round(site, CFG, "7", 2, initial_state(CFG))
    assert again.state_dict is not None
    hist = ledger.history("7")
    assert sum(t for *_, t in hist) == 2 * spent["steps"]
    assert again.metrics["epsilon"] == pytest.approx(epsilon_of_history(hist, site.delta, CFG.accountant))
    assert again.metrics["epsilon"] > spent["epsilon_after"]


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew", "ghost"])
def test_the_update_carries_the_noise_the_accountant_records(mode: str) -> None:
    """A model whose every per-sample gradient is exactly 0 moves only by the DP noise: std σ·C/B per weight.

    If the noise were switched off (or scaled down) while the accountant still records σ, the released
    update would be 0 (or too small) and ε a fiction; the statistical audit would notice late, this at once.
    """
    import torch
    from opacus.accountants import RDPAccountant
    from torch import nn
    from torch.utils.data import TensorDataset

    from models.training import DPSettings, train_local

    n, d, sigma, clip, lr = 32, 64 * 64, 1.5, 0.8, 0.1
    # zero images and no bias: dL/dw = (sigmoid(z) - y) * x = 0 for every example, in every mode
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 1, bias=False))
    with torch.no_grad():
        model[1].weight.fill_(0.01)
    before = model[1].weight.detach().clone()
    dataset = TensorDataset(torch.zeros(n, 1, 64, 64), torch.randint(0, 2, (n,)))
    accountant = RDPAccountant()
    outcome = train_local(model, dataset, epochs=1, batch_size=n, lr=lr, optimizer="sgd", seed=7,
                          dp=DPSettings(noise_multiplier=sigma, max_grad_norm=clip), accountant=accountant,
                          grad_sample_mode=mode)
    assert (outcome.steps, outcome.sample_rate) == (1, 1.0)  # one step, the whole dataset: B = n
    assert accountant.history == [(sigma, 1.0, 1)]
    noise = (before - model[1].weight.detach()) / lr  # SGD's first step: w -= lr * (sum of grads + noise) / B
    assert noise.mean().abs() < 4 * sigma * clip / n / d**0.5
    assert noise.std().item() == pytest.approx(sigma * clip / n, rel=0.06)
