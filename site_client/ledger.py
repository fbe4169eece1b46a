"""The site's privacy budget ledger: one durable account per run.

SQLite in WAL mode with synchronous=FULL, so a round's spend survives a crash
once committed. The spend is committed *before* the update is released
(DESIGN.md invariant 3): if the site dies between the two, the spend stands —
over-counting is safe, under-counting never is.

Each run's account keeps its accountant ("rdp" or "prv", fixed when the account
is opened, so a restarted site prices the run the same way) and the Opacus
history of every DP-SGD step, from which ε is recomputed by
:mod:`models.accounting`.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.accounting import Segment, check_accountant, epsilon_of_history, make_accountant

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    run_id      TEXT PRIMARY KEY,
    mechanism   TEXT NOT NULL,          -- the run's accountant: rdp | prv
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

#: Accountant of an account opened before accountants were selectable.
LEGACY_ACCOUNTANT = "rdp"


class LedgerError(Exception):
    """The ledger refuses an operation that could under-count the privacy spent; the message says why."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _segments(raw: Any) -> list[Segment]:
    return [(float(s), float(q), int(t)) for s, q, t in raw]


def _total_steps(history: list[Segment]) -> int:
    return sum(t for _, _, t in history)


def _extends(old: list[Segment], new: list[Segment]) -> bool:
    """Whether ``new`` is ``old`` plus more steps (Opacus merges a repeated (σ, q) into the last segment)."""
    if not old:
        return True
    if len(new) < len(old) or new[: len(old) - 1] != old[:-1]:
        return False
    (s0, q0, t0), (s1, q1, t1) = old[-1], new[len(old) - 1]
    return s0 == s1 and q0 == q1 and t1 >= t0


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

    # -- reading ---------------------------------------------------------------------------------

    def _row(self, db: sqlite3.Connection, run_id: str) -> sqlite3.Row | None:
        return db.execute("SELECT mechanism, history FROM accounts WHERE run_id = ?", (run_id,)).fetchone()

    def accountant_name(self, run_id: str) -> str | None:
        """The run's accountant ("rdp" | "prv"), or None before the account is opened."""
        with closing(self._connect()) as db:
            row = self._row(db, run_id)
        return None if row is None else str(row["mechanism"])

    def history(self, run_id: str) -> list[Segment]:
        """Every DP-SGD step committed in this run, as Opacus segments (σ, q, steps)."""
        with closing(self._connect()) as db:
            row = self._row(db, run_id)
        return [] if row is None else _segments(json.loads(row["history"]))

    def open_account(self, run_id: str, accountant: str) -> str:
        """Open the run's account with ``accountant`` (persisted), or check an open one uses it.

        The accountant is fixed for the life of the run so that a restarted site (or
        an edited run config) never switches how the spend so far is priced.
        """
        check_accountant(accountant)
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = self._row(db, run_id)
                if row is None:
                    db.execute(
                        "INSERT INTO accounts(run_id, mechanism, history, delta, epsilon, updated_at) "
                        "VALUES (?, ?, '[]', 0.0, 0.0, ?)",
                        (run_id, accountant, _now()),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        stored = accountant if row is None else str(row["mechanism"])
        if stored != accountant:
            raise LedgerError(
                f"run {run_id} is accounted with the {stored} accountant in {self.path}; the run config now "
                f"asks for {accountant}. An account never changes accountant mid-run: set accountant = "
                f'"{stored}" for this run, or start a new run'
            )
        return stored

    def accountant(self, run_id: str, accountant: str | None = None):  # -> opacus IAccountant
        """The run's Opacus accountant, restored with every step spent so far.

        ``accountant`` opens the account with that kind if it is new (and must match
        an open one); without it an unopened run gets the legacy RDP accountant.
        """
        if accountant is not None:
            kind = self.open_account(run_id, accountant)
        else:
            kind = self.accountant_name(run_id) or LEGACY_ACCOUNTANT
        return make_accountant(kind, self.history(run_id))

    def epsilon(self, run_id: str, delta: float) -> float:
        """ε spent so far in this run (0 before the first round)."""
        kind = self.accountant_name(run_id) or LEGACY_ACCOUNTANT
        return epsilon_of_history(self.history(run_id), delta, kind)

    def project(self, run_id: str, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """ε the run would have spent after ``steps`` more DP-SGD steps."""
        kind = self.accountant_name(run_id) or LEGACY_ACCOUNTANT
        return epsilon_of_history(self.history(run_id) + [(noise_multiplier, sample_rate, steps)], delta, kind)

    # -- writing ---------------------------------------------------------------------------------

    def commit_spend(
        self,
        run_id: str,
        server_round: int,
        accountant: Any,
        *,
        delta: float,
        epsilon_cap: float,
        steps: int,
        sample_rate: float,
        noise_multiplier: float,
    ) -> tuple[float, float]:
        """Persist the accountant after a round, atomically; returns (ε before, ε after).

        Refuses (:class:`LedgerError`) an accountant whose history does not extend the
        committed one by exactly ``steps`` steps: committing it would forget spend.
        """
        new = _segments(accountant.history)
        kind = str(accountant.mechanism())
        check_accountant(kind)
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = self._row(db, run_id)
                old = [] if row is None else _segments(json.loads(row["history"]))
                stored_kind = kind if row is None else str(row["mechanism"])
                if stored_kind != kind:
                    raise LedgerError(
                        f"run {run_id} is accounted with {stored_kind}, not {kind}; refusing to commit round "
                        f"{server_round}"
                    )
                if not _extends(old, new) or _total_steps(new) - _total_steps(old) != steps:
                    raise LedgerError(
                        f"round {server_round} of run {run_id}: the accountant's history {new} does not extend "
                        f"the committed {old} by {steps} step(s); refusing a commit that could under-count"
                    )
                eps_before = epsilon_of_history(old, delta, kind)
                eps_after = epsilon_of_history(new, delta, kind)
                db.execute(
                    "INSERT INTO accounts(run_id, mechanism, history, delta, epsilon, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(run_id) DO UPDATE SET "
                    "history=excluded.history, delta=excluded.delta, epsilon=excluded.epsilon, "
                    "updated_at=excluded.updated_at",
                    (run_id, kind, json.dumps(new), delta, eps_after, _now()),
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
        """One row per run: its accountant, ε so far and δ."""
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT run_id, mechanism AS accountant, delta, epsilon, updated_at FROM accounts ORDER BY updated_at"
            ).fetchall()
        return [dict(r) for r in rows]
