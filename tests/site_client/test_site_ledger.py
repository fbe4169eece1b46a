"""The site's privacy ledger: one account per run, durable, composing across rounds."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from models.accounting import AccountingError, epsilon_of_history
from site_client.ledger import LedgerError, PrivacyLedger


def _spend(
    ledger: PrivacyLedger, run: str, rnd: int, steps: int = 10, q: float = 0.1, sigma: float = 1.0
) -> tuple[float, float]:
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


# ---- the site's lifetime ----------------------------------------------------------------------------


def test_lifetime_composes_every_run_and_evaluation(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    _spend(ledger, "run-1", 1)
    _spend(ledger, "run-2", 1, sigma=1.5)
    ledger.commit_evaluation("run-2", 1, noise_multiplier=10.0, digest="ab" * 32, delta=1e-5, epsilon_cap=100.0)
    assert ledger.history("run-2") == [(1.5, 0.1, 10), (10.0, 1.0, 1)]
    assert ledger.lifetime_history() == [(1.0, 0.1, 10), (1.5, 0.1, 10), (10.0, 1.0, 1)]
    for acc in ("rdp", "prv"):
        assert ledger.lifetime_epsilon(1e-5, acc) == pytest.approx(
            epsilon_of_history([(1.0, 0.1, 10), (1.5, 0.1, 10), (10.0, 1.0, 1)], 1e-5, acc))
    assert ledger.lifetime_epsilon(1e-5, "prv") > max(epsilon_of_history(ledger.history(run), 1e-5, "prv")
                                                      for run in ("run-1", "run-2"))
    assert [r["status"] for r in ledger.rounds("run-2")] == ["spent", "evaluated"]
    # a second evaluation at the same σ merges into the segment, as Opacus merges steps
    ledger.commit_evaluation("run-2", 2, noise_multiplier=10.0, digest="cd" * 32, delta=1e-5, epsilon_cap=100.0)
    assert ledger.history("run-2") == [(1.5, 0.1, 10), (10.0, 1.0, 2)]


def test_commits_over_a_cap_are_refused_and_leave_nothing(tmp_path: Path) -> None:
    from site_client.ledger import CapExceeded

    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    _, eps = _spend(ledger, "run-1", 1)
    acc = ledger.accountant("run-2")
    acc.history.append((1.0, 0.1, 10))
    with pytest.raises(CapExceeded, match=r"lifetime epsilon to [0-9.]+, over its lifetime cap of"):
        ledger.commit_spend("run-2", 1, acc, delta=1e-5, epsilon_cap=eps * 1.2, steps=10, sample_rate=0.1,
                            noise_multiplier=1.0)
    with pytest.raises(CapExceeded, match="per-run cap of 0.01"):
        ledger.commit_evaluation("run-2", 1, noise_multiplier=10.0, digest="ab" * 32, delta=1e-5,
                                 epsilon_cap=100.0, epsilon_cap_per_run=0.01)
    assert ledger.history("run-2") == [] and [r["run_id"] for r in ledger.rounds()] == ["run-1"]


def test_the_policy_is_kept_for_the_ledger_alone(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    assert PrivacyLedger(path).policy() is None
    PrivacyLedger(path).record_policy(epsilon_cap=8.0, delta=1e-5, epsilon_cap_per_run=None, accountant="prv")
    assert PrivacyLedger(path).policy() == {"epsilon_cap": 8.0, "delta": 1e-5, "epsilon_cap_per_run": None,
                                            "accountant": "prv"}
    PrivacyLedger(path).record_policy(epsilon_cap=6.0, delta=1e-6, epsilon_cap_per_run=2.0, accountant="rdp")
    assert PrivacyLedger(path).policy() == {"epsilon_cap": 6.0, "delta": 1e-6, "epsilon_cap_per_run": 2.0,
                                            "accountant": "rdp"}


def test_a_ledger_from_before_evaluations_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE accounts (run_id TEXT PRIMARY KEY, mechanism TEXT NOT NULL, history TEXT NOT NULL,
            delta REAL NOT NULL, epsilon REAL NOT NULL, updated_at TEXT NOT NULL);
        CREATE TABLE rounds (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL,
            server_round INTEGER NOT NULL, status TEXT NOT NULL CHECK (status IN ('spent', 'declined')),
            steps INTEGER NOT NULL, sample_rate REAL NOT NULL, noise_multiplier REAL NOT NULL,
            epsilon_before REAL NOT NULL, epsilon_after REAL NOT NULL, epsilon_cap REAL NOT NULL, reason TEXT,
            at TEXT NOT NULL);
        INSERT INTO accounts VALUES ('old-run', 'rdp', '[[1.0, 0.1, 10]]', 1e-5, 1.0, '2024-01-01');
        INSERT INTO rounds (run_id, server_round, status, steps, sample_rate, noise_multiplier, epsilon_before,
            epsilon_after, epsilon_cap, reason, at) VALUES ('old-run', 1, 'spent', 10, 0.1, 1.0, 0, 1.0, 8, NULL, 'x');
    """)
    db.commit()
    db.close()
    ledger = PrivacyLedger(path)
    assert [(r["run_id"], r["status"], r["digest"]) for r in ledger.rounds()] == [("old-run", "spent", None)]
    ledger.commit_evaluation("old-run", 2, noise_multiplier=10.0, digest="ab" * 32, delta=1e-5, epsilon_cap=100.0)
    assert [r["status"] for r in PrivacyLedger(path).rounds()] == ["spent", "evaluated"]
    assert ledger.lifetime_history() == [(1.0, 0.1, 10), (10.0, 1.0, 1)]


# ---- `medfed privacy ledger` -------------------------------------------------------------------------


def _cli(*args: str):  # -> click Result
    from typer.testing import CliRunner

    from medfed.cli import app

    return CliRunner().invoke(app, ["privacy", "ledger", *args])


def test_cli_ledger_prints_runs_and_the_lifetime_last(tmp_path: Path) -> None:
    from medfed.settings import SiteConfig

    site = SiteConfig(name="h", data_dir=tmp_path / "deid", state_dir=tmp_path / "state", epsilon_cap=8.0)
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "site.toml").write_text(site.to_toml())
    ledger = PrivacyLedger(site.state_dir / "privacy-ledger.sqlite")
    _spend(ledger, "run-1", 1)
    _spend(ledger, "run-1", 2)
    _spend(ledger, "run-2", 1, sigma=1.5)
    ledger.record_decline("run-2", 2, reason="over cap", epsilon_before=1.0, epsilon_projected=9.0,
                          epsilon_cap=8.0, steps=10, sample_rate=0.1, noise_multiplier=1.0)
    ledger.commit_evaluation("run-2", 1, noise_multiplier=10.0, digest="ab" * 32, delta=1e-5, epsilon_cap=8.0)
    ledger.record_policy(epsilon_cap=8.0, delta=1e-5, epsilon_cap_per_run=None, accountant="prv")
    lifetime = ledger.lifetime_epsilon(1e-5, "prv")
    for folder in (kit, site.state_dir):  # a kit folder (site.toml) or the state folder itself
        res = _cli(str(folder))
        assert res.exit_code == 0, res.output
        lines = res.output.strip().splitlines()
        assert lines[-1] == f"lifetime ε {lifetime:.3f} of cap 8 (δ 1e-05)"
        run1 = next(line for line in lines if line.startswith("run-1")).split()
        assert run1[1:] == ["rdp", "2", "0", "0", f"{ledger.epsilon('run-1', 1e-5):.3f}"]
        run2 = next(line for line in lines if line.startswith("run-2")).split()
        assert run2[1:] == ["rdp", "1", "1", "1", f"{ledger.epsilon('run-2', 1e-5):.3f}"]


def test_cli_ledger_says_what_is_wrong(tmp_path: Path) -> None:
    res = _cli(str(tmp_path / "nowhere"))
    assert res.exit_code == 2 and "is not a folder" in res.output
    res = _cli(str(tmp_path))
    assert res.exit_code == 2 and "neither site.toml" in res.output and "Traceback" not in res.output
    (tmp_path / "kit.toml").write_text("")
    res = _cli(str(tmp_path))
    assert res.exit_code == 2 and "start the site once" in res.output
    state = tmp_path / "state"
    PrivacyLedger(state / "privacy-ledger.sqlite")  # an old ledger: no caps recorded
    res = _cli(str(state))
    assert res.exit_code == 2 and "records no lifetime cap" in res.output
