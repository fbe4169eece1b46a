"""The site's privacy budget ledger: one durable accountant per run.

SQLite in WAL mode with synchronous=FULL, so a round's spend survives a crash
once committed. The spend is committed *before* the update is released
(DESIGN.md invariant 3): if the site dies between the two, the spend stands —
over-counting is safe, under-counting never is.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opacus.accountants import RDPAccountant

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    run_id      TEXT PRIMARY KEY,
    mechanism   TEXT NOT NULL,
    history     TEXT NOT NULL,          -- Opacus accountant history, JSON
    delta       REAL NOT NULL,
    epsilon     REAL NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id            TEXT NOT NULL,
    server_round      INTEGER NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('spent', 'declined')),
    steps             INTEGER NOT NULL,
    sample_rate       REAL NOT NULL,
    noise_multiplier  REAL NOT NULL,
    epsilon_before    REAL NOT NULL,
    epsilon_after     REAL NOT NULL,
    epsilon_cap       REAL NOT NULL,
    reason            TEXT,
    at                TEXT NOT NULL
);
"""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class PrivacyLedger:
    """Durable record of the privacy spent by this site, per run, across every round."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.row_factory = sqlite3.Row
        return db

    def accountant(self, run_id: str) -> RDPAccountant:
        """The run's accountant, restored with every step spent so far."""
        acc = RDPAccountant()
        with closing(self._connect()) as db:
            row = db.execute("SELECT history FROM accounts WHERE run_id = ?", (run_id,)).fetchone()
        if row is not None:
            acc.history = [tuple(h) for h in json.loads(row["history"])]
        return acc

    def epsilon(self, run_id: str, delta: float) -> float:
        """ε spent so far in this run (0 before the first round)."""
        acc = self.accountant(run_id)
        return float(acc.get_epsilon(delta)) if acc.history else 0.0

    def project(self, run_id: str, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """ε the run would have spent after ``steps`` more DP-SGD steps."""
        acc = self.accountant(run_id)
        acc.history.append((noise_multiplier, sample_rate, steps))
        return float(acc.get_epsilon(delta))

    def commit_spend(
        self,
        run_id: str,
        server_round: int,
        accountant: RDPAccountant,
        *,
        delta: float,
        epsilon_cap: float,
        steps: int,
        sample_rate: float,
        noise_multiplier: float,
    ) -> tuple[float, float]:
        """Persist the accountant after a round, atomically; returns (ε before, ε after)."""
        eps_after = float(accountant.get_epsilon(delta)) if accountant.history else 0.0
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT history FROM accounts WHERE run_id = ?", (run_id,)).fetchone()
                prev = RDPAccountant()
                if row is not None:
                    prev.history = [tuple(h) for h in json.loads(row["history"])]
                eps_before = float(prev.get_epsilon(delta)) if prev.history else 0.0
                db.execute(
                    "INSERT INTO accounts(run_id, mechanism, history, delta, epsilon, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(run_id) DO UPDATE SET "
                    "history=excluded.history, delta=excluded.delta, epsilon=excluded.epsilon, "
                    "updated_at=excluded.updated_at",
                    (run_id, accountant.mechanism(), json.dumps(accountant.history), delta, eps_after, _now()),
                )
                db.execute(
                    "INSERT INTO rounds(run_id, server_round, status, steps, sample_rate, noise_multiplier, "
                    "epsilon_before, epsilon_after, epsilon_cap, reason, at) "
                    "VALUES (?, ?, 'spent', ?, ?, ?, ?, ?, ?, NULL, ?)",
                    (run_id, server_round, steps, sample_rate, noise_multiplier, eps_before, eps_after,
                     epsilon_cap, _now()),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return eps_before, eps_after

    def record_decline(
        self,
        run_id: str,
        server_round: int,
        *,
        reason: str,
        epsilon_before: float,
        epsilon_projected: float,
        epsilon_cap: float,
        steps: int,
        sample_rate: float,
        noise_multiplier: float,
    ) -> None:
        """Record that the site declined a round (no spend)."""
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT INTO rounds(run_id, server_round, status, steps, sample_rate, noise_multiplier, "
                "epsilon_before, epsilon_after, epsilon_cap, reason, at) "
                "VALUES (?, ?, 'declined', ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, server_round, steps, sample_rate, noise_multiplier, epsilon_before,
                 epsilon_projected, epsilon_cap, reason, _now()),
            )

    def rounds(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Every round recorded (optionally for one run), oldest first."""
        with closing(self._connect()) as db:
            if run_id is None:
                rows = db.execute("SELECT * FROM rounds ORDER BY id").fetchall()
            else:
                rows = db.execute("SELECT * FROM rounds WHERE run_id = ? ORDER BY id", (run_id,)).fetchall()
        return [dict(r) for r in rows]

    def runs(self) -> list[dict[str, Any]]:
        """One row per run: its ε so far and δ."""
        with closing(self._connect()) as db:
            rows = db.execute("SELECT run_id, delta, epsilon, updated_at FROM accounts ORDER BY updated_at").fetchall()
        return [dict(r) for r in rows]
