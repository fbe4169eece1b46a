"""The site's privacy ledger: one account per run, durable, composing across rounds."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from site_client.ledger import PrivacyLedger


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
    ref = RDPAccountant()
    ref.history = [(1.0, 0.1, 20)]
    assert a2 == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
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
