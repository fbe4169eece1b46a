"""The site enforces its record-level budget: refusals before training, declines, calibration, crash safety."""

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
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from anonymization.audit import AuditTrail
from coordinator.federation import initial_state
from medfed.wire import pack
from medfed.protocol import SITE_DECLINED, SITE_REFUSED
from medfed.settings import RunConfig, SiteConfig
from models.accounting import calibrate_noise, epsilon_of_history
from models.training import planned_steps
from site_client.client_app import build_app
from site_client.task import SiteRefusal, ledger_for, size_bucket, train_round
from tests.models_factory import make_store

# A fixed noise multiplier (no calibration), so each round's spend is known in advance.
CFG = RunConfig().with_overrides(image_size=16, batch_size=3, lr=0.05, num_server_rounds=3, grad_sample_mode="hooks",
                                  optimizer="sgd", local_epochs=1, noise_multiplier=1.0, calibrate_noise=False)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _task_identity() -> object:
    # Outside a Flower runtime a Message needs the run/task ids Flower normally sets.
    from flwr.supercore.task_identity import TaskIdentity

    names = ("_run_id", "_task_id", "_node_id")
    old = {n: getattr(TaskIdentity, n) for n in names}
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
    yield
    for n, v in old.items():
        setattr(TaskIdentity, n, v)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deid")
    make_store(root, n_patients=12, images_per_patient=2, size=16, seed=2)
    return root


def _site(tmp_path: Path, store: Path, cap: float, delta: float = 1e-3) -> SiteConfig:
    return SiteConfig(name="hospital-p", data_dir=store, state_dir=tmp_path / "state",
                      audit_dir=tmp_path / "audit", epsilon_cap=cap, delta=delta)


def _n(store: Path) -> int:
    from models.dataset import ManifestDataset

    return len(ManifestDataset(store, split="train", image_size=16))


def _bucket(store: Path) -> int:
    """The size bucket the site publishes and plans its sampling on (its n to one significant digit)."""
    return size_bucket(_n(store))


def _one_round_eps(store: Path, cfg: RunConfig = CFG, sigma: float | None = None) -> float:
    steps, q = planned_steps(_bucket(store), cfg.batch_size, cfg.local_epochs)
    return epsilon_of_history([(sigma or cfg.noise_multiplier, q, steps)], 1e-3, cfg.accountant)


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
    assert "refuses the run" in msg and f"{one:.4g}" in msg and f"cap {one / 2:g}" in msg
    assert "noise-multiplier >= " in msg and "fits 1 round(s)" in msg and "fits 3 round(s)" in msg
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
    expected = calibrate_noise([], q, steps, 3, cap, site.delta, "rdp", floor=0.5)
    assert expected > 0.5
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
    assert 0.98 * cap <= spent <= cap
    trained = [r for r in AuditTrail(site.audit_path).records() if r["kind"] == "round_trained"]
    assert [r["noise_multiplier"] for r in trained] == sigmas and all(r["noise_calibrated"] for r in trained)
    # a round past num-server-rounds may only use what is left: far more noise, still within the cap
    late = train_round(site, cfg, "run-c", 4, state)
    assert late.state_dict is not None and late.metrics["noise-multiplier"] > 3 * expected
    assert spent < ledger_for(site).epsilon("run-c", site.delta) <= cap


def test_calibration_that_needs_absurd_noise_is_refused(tmp_path: Path, store: Path) -> None:
    cfg = CFG.with_overrides(calibrate_noise=True, num_server_rounds=50)
    site = _site(tmp_path, store, cap=0.05)
    with pytest.raises(SiteRefusal, match=r"calibrate-noise over 50 round\(s\).*even noise multiplier 20"):
        train_round(site, cfg, "run-a", 1, initial_state(cfg))


def test_delta_not_below_one_over_the_bucket_or_n_is_refused_without_n(tmp_path: Path, store: Path) -> None:
    n, bucket = _n(store), _bucket(store)
    expected = rf"delta=0.1 is too large.*1/size-bucket = 1/{bucket}.*below {0.1 / bucket:.2g}"
    with pytest.raises(SiteRefusal, match=expected) as err:
        train_round(_site(tmp_path, store, cap=50.0, delta=0.1), CFG, "run-d", 1, initial_state(CFG))
    assert str(n) not in str(err.value)
    # A bucket set below n does not loosen delta < 1/n: delta 0.08 is below 1/5 but not below 1/n.
    assert 0.08 >= 1 / n
    low = _site(tmp_path / "low", store, cap=50.0, delta=0.08).model_copy(update={"size_bucket": 5})
    with pytest.raises(SiteRefusal, match=r"1/size-bucket = 1/5 and below 1/\(training examples\)") as err:
        train_round(low, CFG, "run-d", 1, initial_state(CFG))
    assert str(n) not in str(err.value) and ledger_for(low).rounds("run-d") == []


def test_the_accountant_is_fixed_for_the_run(tmp_path: Path, store: Path) -> None:
    site = _site(tmp_path, store, cap=50.0)
    prv = CFG.with_overrides(accountant="prv")
    reply = train_round(site, prv, "run-p", 1, initial_state(CFG))
    ledger = ledger_for(site)
    assert ledger.accountant_name("run-p") == "prv"
    assert reply.metrics["epsilon"] == pytest.approx(ledger.epsilon("run-p", site.delta))
    assert reply.metrics["epsilon"] < epsilon_of_history(ledger.history("run-p"), site.delta, "rdp")
    with pytest.raises(SiteRefusal, match="never changes accountant mid-run"):
        train_round(site, CFG, "run-p", 2, reply.state_dict)


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
    child = subprocess.Popen([sys.executable, str(script), str(toml), str(signal_file), json.dumps(CFG.to_flower())], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
    assert again.metrics["epsilon"] == pytest.approx(epsilon_of_history(hist, site.delta, "rdp"))
    assert again.metrics["epsilon"] > spent["epsilon_after"]
