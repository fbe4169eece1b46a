"""The site's privacy ledger: one account per run, durable, composing across rounds."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from models.accounting import AccountingError, epsilon_of_history
from site_client.ledger import LedgerError, PrivacyLedger


def _spend(ledger: PrivacyLedger, run: str, rnd: int, steps: int = 10, q: float = 0.1, sigma: float = 1.0) -> tuple[float, float]:
    acc = ledger.accountant(run)
    acc.history.append((sigma, q, steps))
    return ledger.commit_spend(run, rnd, acc, delta=1e-5, epsilon_cap=100.0, steps=steps, sample_rate=q,
                               noise_multiplier=sigma)


def test_spend_composes_across_rounds_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = PrivacyLedger(path)
    assert ledger.epsilon("run-1", 1e-5) == 0.0
    b1, a1 = _spend(ledger, "run-1", 1)
    b2, a2 = _spend(PrivacyLedger(path), "run-1", 2)  # a restarted site
    assert b1 == 0.0 and a1 > 0 and b2 == pytest.approx(a1) and a2 > a1
    # the same as one accountant that took all 20 steps
    assert a2 == pytest.approx(epsilon_of_history([(1.0, 0.1, 20)], 1e-5, "rdp"), rel=1e-9)
    # and RDP with Opacus' own orders is never tighter than ours (we add orders, never remove any)
    ref = RDPAccountant()
    ref.history = [(1.0, 0.1, 20)]
    assert a2 <= ref.get_epsilon(1e-5) + 1e-12
    # another run has its own account
    assert PrivacyLedger(path).epsilon("run-2", 1e-5) == 0.0
    assert [r["server_round"] for r in ledger.rounds("run-1")] == [1, 2]


def test_project_matches_commit(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    _spend(ledger, "r", 1)
    projected = ledger.project("r", noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1e-5)
    _, after = _spend(ledger, "r", 2)
    assert projected == pytest.approx(after)


def test_decline_is_recorded_without_spend(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    _, eps = _spend(ledger, "r", 1)
    ledger.record_decline("r", 2, reason="over cap", epsilon_before=eps, epsilon_projected=eps * 2,
                          epsilon_cap=eps * 1.5, steps=10, sample_rate=0.1, noise_multiplier=1.0)
    assert ledger.epsilon("r", 1e-5) == pytest.approx(eps)
    assert [r["status"] for r in ledger.rounds("r")] == ["spent", "declined"]


def test_ledger_is_wal_and_committed_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    ledger = PrivacyLedger(path)
    _spend(ledger, "r", 1)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT count(*) FROM rounds").fetchone()[0] == 1


def test_accountant_is_chosen_per_run_and_persisted(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    ledger = PrivacyLedger(path)
    assert ledger.open_account("run-prv", "prv") == "prv"
    acc = PrivacyLedger(path).accountant("run-prv", "prv")  # a restarted site
    assert acc.mechanism() == "prv"
    acc.history.append((1.0, 0.1, 10))
    ledger.commit_spend("run-prv", 1, acc, delta=1e-5, epsilon_cap=100.0, steps=10, sample_rate=0.1,
                        noise_multiplier=1.0)
    restarted = PrivacyLedger(path)
    assert restarted.accountant_name("run-prv") == "prv"
    # the PRV account prices the run by PRV, below what RDP would say for the same steps
    assert restarted.epsilon("run-prv", 1e-5) == pytest.approx(epsilon_of_history([(1.0, 0.1, 10)], 1e-5, "prv"))
    assert restarted.epsilon("run-prv", 1e-5) < epsilon_of_history([(1.0, 0.1, 10)], 1e-5, "rdp")
    # the account never switches accountant mid-run
    with pytest.raises(LedgerError, match="accounted with the prv accountant"):
        restarted.accountant("run-prv", "rdp")
    assert restarted.open_account("run-rdp", "rdp") == "rdp"
    with pytest.raises(AccountingError, match="accountant must be one of"):
        restarted.open_account("run-x", "gdp")


def test_commit_refuses_a_history_that_forgets_spend(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    _spend(ledger, "r", 1)
    fresh = RDPAccountant()  # a round trained against a new accountant, not the ledger's
    fresh.history.append((1.0, 0.1, 10))
    with pytest.raises(LedgerError, match="does not extend"):
        ledger.commit_spend("r", 2, fresh, delta=1e-5, epsilon_cap=100.0, steps=10, sample_rate=0.1,
                            noise_multiplier=1.0)
    acc = ledger.accountant("r")
    acc.history.append((1.0, 0.1, 5))
    with pytest.raises(LedgerError, match="by 10 step"):  # steps claimed differ from steps recorded
        ledger.commit_spend("r", 2, acc, delta=1e-5, epsilon_cap=100.0, steps=10, sample_rate=0.1,
                            noise_multiplier=1.0)
    assert len(ledger.history("r")) == 1 and ledger.history("r")[0][2] == 10
    assert [r["server_round"] for r in ledger.rounds("r")] == [1]


def test_merged_segments_compose(tmp_path: Path) -> None:
    # Opacus merges steps of the same (σ, q) into the last segment; other σ start a new one.
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    _spend(ledger, "r", 1)
    acc = ledger.accountant("r")
    for _ in range(4):
        acc.step(noise_multiplier=1.0, sample_rate=0.1)
    for _ in range(3):
        acc.step(noise_multiplier=2.0, sample_rate=0.1)
    ledger.commit_spend("r", 2, acc, delta=1e-5, epsilon_cap=100.0, steps=7, sample_rate=0.1, noise_multiplier=1.0)
    assert ledger.history("r") == [(1.0, 0.1, 14), (2.0, 0.1, 3)]
