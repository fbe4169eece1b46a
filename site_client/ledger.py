"""The site's privacy budget ledger: one durable account per run, one budget for the site's lifetime.

SQLite in WAL mode with synchronous=FULL, so a round's spend survives a crash
once committed. The spend is committed *before* the update (or the evaluation)
is released (docs/design.md invariant 3): if the site dies between the two, the
spend stands — over-counting is safe, under-counting never is.

Each run's account keeps its accountant ("rdp" or "prv", fixed when the account
is opened, so a restarted site prices the run the same way) and the Opacus
history of every DP-SGD step and every evaluation (a Gaussian release, the
segment ``(σ_eval, 1.0, 1)``), from which ε is recomputed by
:mod:`models.accounting`. Run names are the coordinator's to choose, so the
site's cap is a *lifetime* cap: the ε of every run's history composed, checked
again inside the commit's transaction so that two runs at once cannot both
slip under it. The ``meta`` table keeps the site's caps and δ, so the ledger
alone answers "how much has this site spent" (``medfed privacy ledger``).
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.accounting import Segment, check_accountant, epsilon_of_history, make_accountant

#: ``rounds.status`` of a training round that was paid for / declined, of an evaluation paid for / declined.
SPENT, DECLINED, EVALUATED, EVALUATION_DECLINED = "spent", "declined", "evaluated", "evaluation-declined"
#: An evaluation's segment: the Gaussian mechanism on the whole test split (no subsampling), once.
EVALUATION_SAMPLE_RATE = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    run_id      TEXT PRIMARY KEY,
    mechanism   TEXT NOT NULL,          -- the run's accountant: rdp | prv
    history     TEXT NOT NULL,          -- Opacus accountant history, JSON
    delta       REAL NOT NULL,
    epsilon     REAL NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key    TEXT PRIMARY KEY,            -- epsilon_cap | epsilon_cap_per_run | delta | accountant
    value  TEXT NOT NULL
);
"""
_ROUNDS = """
CREATE TABLE IF NOT EXISTS {name} (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id            TEXT NOT NULL,
    server_round      INTEGER NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('spent', 'declined', 'evaluated', 'evaluation-declined')),
    steps             INTEGER NOT NULL,
    sample_rate       REAL NOT NULL,
    noise_multiplier  REAL NOT NULL,
    epsilon_before    REAL NOT NULL,   -- the run's ε
    epsilon_after     REAL NOT NULL,   -- the run's ε after (or, declined, as projected)
    epsilon_cap       REAL NOT NULL,   -- the site's lifetime cap
    reason            TEXT,
    at                TEXT NOT NULL,
    digest            TEXT             -- evaluations: SHA-256 of the global model evaluated
);
"""
_ROUND_COLUMNS = ("id, run_id, server_round, status, steps, sample_rate, noise_multiplier, epsilon_before, "
                  "epsilon_after, epsilon_cap, reason, at")

#: Accountant of an account opened before accountants were selectable.
LEGACY_ACCOUNTANT = "rdp"


class LedgerError(Exception):
    """The ledger refuses an operation that could under-count the privacy spent; the message says why."""


class CapExceeded(LedgerError):
    """The spend would cross the lifetime or the per-run cap; nothing was recorded. The message names the cap."""


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
            db.executescript(_SCHEMA + _ROUNDS.format(name="rounds"))
            self._migrate(db)

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Widen a ledger written before evaluations were paid for (its ``rounds`` CHECK knows two statuses)."""
        def current() -> bool:
            sql = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'rounds'").fetchone()[0]
            return "'evaluated'" in sql

        if current():
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            if current():  # another process migrated it while we waited for the lock
                db.execute("ROLLBACK")
                return
            db.execute(_ROUNDS.format(name="rounds_v2"))
            db.execute(f"INSERT INTO rounds_v2 ({_ROUND_COLUMNS}) SELECT {_ROUND_COLUMNS} FROM rounds")
            db.execute("DROP TABLE rounds")
            db.execute("ALTER TABLE rounds_v2 RENAME TO rounds")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.row_factory = sqlite3.Row
        return db

    # -- reading ---------------------------------------------------------------------------------

    def _row(self, db: sqlite3.Connection, run_id: str) -> sqlite3.Row | None:
        return db.execute("SELECT mechanism, history FROM accounts WHERE run_id = ?", (run_id,)).fetchone()

    @staticmethod
    def _histories(db: sqlite3.Connection) -> dict[str, list[Segment]]:
        rows = db.execute("SELECT run_id, history FROM accounts ORDER BY rowid").fetchall()
        return {str(r["run_id"]): _segments(json.loads(r["history"])) for r in rows}

    def accountant_name(self, run_id: str) -> str | None:
        """The run's accountant ("rdp" | "prv"), or None before the account is opened."""
        with closing(self._connect()) as db:
            row = self._row(db, run_id)
        return None if row is None else str(row["mechanism"])

    def history(self, run_id: str) -> list[Segment]:
        """Every DP-SGD step and evaluation committed in this run, as Opacus segments (σ, q, steps)."""
        with closing(self._connect()) as db:
            row = self._row(db, run_id)
        return [] if row is None else _segments(json.loads(row["history"]))

    def lifetime_history(self) -> list[Segment]:
        """Every segment of every run on this site's data, runs in the order they were opened."""
        with closing(self._connect()) as db:
            return [seg for hist in self._histories(db).values() for seg in hist]

    def lifetime_epsilon(self, delta: float, accountant: str) -> float:
        """ε the site has spent over its lifetime (every run composed), priced by ``accountant``."""
        return epsilon_of_history(self.lifetime_history(), delta, accountant)

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

    def project_lifetime(self, run_id: str, *, noise_multiplier: float, sample_rate: float, steps: int,
                         delta: float) -> float:
        """ε the site would have spent over its lifetime after ``steps`` more steps in ``run_id`` (its accountant)."""
        kind = self.accountant_name(run_id) or LEGACY_ACCOUNTANT
        return epsilon_of_history(self.lifetime_history() + [(noise_multiplier, sample_rate, steps)], delta, kind)

    # -- the site's policy -----------------------------------------------------------------------

    def record_policy(self, *, epsilon_cap: float, delta: float, epsilon_cap_per_run: float | None,
                      accountant: str) -> None:
        """Keep the site's caps, δ and the accountant last used, so the ledger alone can price the lifetime."""
        values = {"epsilon_cap": repr(float(epsilon_cap)), "delta": repr(float(delta)),
                  "epsilon_cap_per_run": "" if epsilon_cap_per_run is None else repr(float(epsilon_cap_per_run)),
                  "accountant": check_accountant(accountant)}
        with closing(self._connect()) as db, db:
            db.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                list(values.items()),
            )

    def policy(self) -> dict[str, Any] | None:
        """The caps, δ and accountant :meth:`record_policy` kept, or None if none were ever recorded."""
        with closing(self._connect()) as db:
            meta = {str(r["key"]): str(r["value"]) for r in db.execute("SELECT key, value FROM meta")}
        if "epsilon_cap" not in meta or "delta" not in meta:
            return None
        per_run = meta.get("epsilon_cap_per_run", "")
        return {"epsilon_cap": float(meta["epsilon_cap"]), "delta": float(meta["delta"]),
                "epsilon_cap_per_run": float(per_run) if per_run else None,
                "accountant": meta.get("accountant", LEGACY_ACCOUNTANT)}

    # -- writing ---------------------------------------------------------------------------------

    @staticmethod
    def _check_caps(db: sqlite3.Connection, run_id: str, kind: str, new: list[Segment], *, delta: float,
                    epsilon_cap: float, epsilon_cap_per_run: float | None, what: str) -> float:
        """Refuse (:class:`CapExceeded`) a run history ``new`` that would cross a cap; returns the lifetime ε.

        Runs inside the commit's transaction: the lifetime is read under the write lock.
        """
        others = [seg for run, hist in PrivacyLedger._histories(db).items() if run != run_id for seg in hist]
        if epsilon_cap_per_run is not None:
            run_eps = epsilon_of_history(new, delta, kind)
            if run_eps > epsilon_cap_per_run:
                raise CapExceeded(f"{what} would take run {run_id}'s epsilon to {run_eps:.4f}, over the site's "
                                  f"per-run cap of {epsilon_cap_per_run:g} (delta={delta:g}); nothing was spent")
        life = epsilon_of_history(others + new, delta, kind)
        if life > epsilon_cap:
            raise CapExceeded(f"{what} would take the site's lifetime epsilon to {life:.4f}, over its lifetime "
                              f"cap of {epsilon_cap:g} (delta={delta:g}); nothing was spent")
        return life

    def _commit(self, db: sqlite3.Connection, run_id: str, kind: str, old: list[Segment], new: list[Segment],
                delta: float) -> tuple[float, float]:
        eps_before = epsilon_of_history(old, delta, kind)
        eps_after = epsilon_of_history(new, delta, kind)
        db.execute(
            "INSERT INTO accounts(run_id, mechanism, history, delta, epsilon, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(run_id) DO UPDATE SET "
            "history=excluded.history, delta=excluded.delta, epsilon=excluded.epsilon, "
            "updated_at=excluded.updated_at",
            (run_id, kind, json.dumps(new), delta, eps_after, _now()),
        )
        return eps_before, eps_after

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
        epsilon_cap_per_run: float | None = None,
    ) -> tuple[float, float]:
        """Persist the accountant after a round, atomically; returns the run's (ε before, ε after).

        Refuses (:class:`LedgerError`) an accountant whose history does not extend the
        committed one by exactly ``steps`` steps: committing it would forget spend; and
        (:class:`CapExceeded`) one that would take the site's lifetime ε over
        ``epsilon_cap`` or the run's over ``epsilon_cap_per_run``. Refused, nothing is recorded.
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
                self._check_caps(db, run_id, kind, new, delta=delta, epsilon_cap=epsilon_cap,
                                 epsilon_cap_per_run=epsilon_cap_per_run, what=f"round {server_round}")
                eps_before, eps_after = self._commit(db, run_id, kind, old, new, delta)
                db.execute(
                    "INSERT INTO rounds(run_id, server_round, status, steps, sample_rate, noise_multiplier, "
                    "epsilon_before, epsilon_after, epsilon_cap, reason, at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                    (run_id, server_round, SPENT, steps, sample_rate, noise_multiplier, eps_before, eps_after,
                     epsilon_cap, _now()),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return eps_before, eps_after

    def commit_evaluation(
        self,
        run_id: str,
        server_round: int,
        *,
        noise_multiplier: float,
        digest: str,
        delta: float,
        epsilon_cap: float,
        epsilon_cap_per_run: float | None = None,
        accountant: str | None = None,
    ) -> tuple[float, float]:
        """Persist one evaluation's spend, the segment (σ_eval, 1.0, 1), before its metrics leave; (ε before, after).

        Same durability and cap checks as :meth:`commit_spend`; the row's status is ``evaluated``
        and it keeps the digest of the model evaluated.
        """
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = self._row(db, run_id)
                old = [] if row is None else _segments(json.loads(row["history"]))
                kind = str(row["mechanism"]) if row is not None else check_accountant(accountant or LEGACY_ACCOUNTANT)
                segment = (float(noise_multiplier), EVALUATION_SAMPLE_RATE, 1)
                if old and old[-1][:2] == segment[:2]:  # merged as Opacus merges a repeated (σ, q)
                    new = old[:-1] + [(segment[0], segment[1], old[-1][2] + 1)]
                else:
                    new = old + [segment]
                self._check_caps(db, run_id, kind, new, delta=delta, epsilon_cap=epsilon_cap,
                                 epsilon_cap_per_run=epsilon_cap_per_run, what="this evaluation")
                eps_before, eps_after = self._commit(db, run_id, kind, old, new, delta)
                db.execute(
                    "INSERT INTO rounds(run_id, server_round, status, steps, sample_rate, noise_multiplier, "
                    "epsilon_before, epsilon_after, epsilon_cap, reason, at, digest) "
                    "VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?, NULL, ?, ?)",
                    (run_id, server_round, EVALUATED, EVALUATION_SAMPLE_RATE, noise_multiplier, eps_before,
                     eps_after, epsilon_cap, _now(), digest),
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
        evaluation: bool = False,
        digest: str | None = None,
    ) -> None:
        """Record that the site declined a round (or, ``evaluation``, an evaluation): no spend."""
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT INTO rounds(run_id, server_round, status, steps, sample_rate, noise_multiplier, "
                "epsilon_before, epsilon_after, epsilon_cap, reason, at, digest) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, server_round, EVALUATION_DECLINED if evaluation else DECLINED, steps, sample_rate,
                 noise_multiplier, epsilon_before, epsilon_projected, epsilon_cap, reason, _now(), digest),
            )

    def rounds(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Every round and evaluation recorded (optionally for one run), oldest first."""
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

    def summary(self, delta: float) -> list[dict[str, Any]]:
        """One row per run, in the order opened: accountant, rounds spent / declined, evaluations, ε at ``delta``."""
        with closing(self._connect()) as db:
            accounts = db.execute("SELECT run_id, mechanism, history FROM accounts ORDER BY rowid").fetchall()
            counts = {(str(r["run_id"]), str(r["status"])): int(r["n"]) for r in db.execute(
                "SELECT run_id, status, count(*) AS n FROM rounds GROUP BY run_id, status")}
        out = []
        for a in accounts:
            run = str(a["run_id"])
            out.append({
                "run": run, "accountant": str(a["mechanism"]),
                "spent": counts.get((run, SPENT), 0), "declined": counts.get((run, DECLINED), 0),
                "evaluations": counts.get((run, EVALUATED), 0),
                "evaluations_declined": counts.get((run, EVALUATION_DECLINED), 0),
                "epsilon": epsilon_of_history(_segments(json.loads(a["history"])), delta, str(a["mechanism"])),
            })
        return out
