"""Re-release instead of re-spend: a repeated training request gets the update already released.

When the coordinator is restarted and resumes a run from its checkpoint (Flower
gives the resumed run a new run id, so sites key their ledger on the stable
``run-name``), it asks again for a round some sites may already have trained:
the same run, the same round, the same global model. Training again would
spend privacy budget a second time for a new, different release; sending the
very update already released costs nothing more (DP is closed under
re-publishing the same output).

So for every (run, round, digest of the global arrays) the site keeps the
update it released in its state folder:

1. before the round's spend is committed, the update is written as *pending*
   together with how many spends the ledger held for the run;
2. after the commit it is marked *committed* with its metrics;
3. a repeated request finds the committed update and re-sends it, or finds a
   pending one and asks the ledger whether the spend went in (one more spend
   than recorded at step 1: the update was paid for, promote it; otherwise it
   was never released: drop it and train).

Spend is never lost (the ledger commits before anything leaves) and never
counted twice for the same release.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.files import open_atomic, write_text

log = logging.getLogger(__name__)

STORE_DIR = "released-updates"
#: Rounds of committed updates kept per run: a resumed run repeats the round after its last checkpoint
#: (checkpoints are written every round), so the last few suffice.
KEEP_ROUNDS = 3


def arrays_digest(state: dict[str, Any]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of each array, in order: the identity of a global model."""
    h = hashlib.sha256()
    for name, value in state.items():
        arr = np.ascontiguousarray(value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value))
        h.update(name.encode())
        h.update(str(arr.dtype).encode())
        h.update(str(tuple(arr.shape)).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


@dataclass
class Released:
    """An update this site already released (or paid for) for one request."""

    state: dict[str, Any]
    metrics: dict[str, float]
    promoted: bool = False  # recovered from a pending update whose spend the ledger shows


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


class ReplayStore:
    """Pending and committed updates, one folder per (run, round, global digest)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / STORE_DIR

    def _dir(self, run: str, server_round: int, digest: str) -> Path:
        return self.root / _safe(run) / f"round-{server_round:05d}-{digest[:32]}"

    @staticmethod
    def _spent(ledger: Any, run: str) -> int:
        return sum(1 for r in ledger.rounds(run) if r["status"] == "spent")

    def lookup(self, run: str, server_round: int, digest: str, ledger: Any) -> Released | None:
        """The update already released for this request, if any (see the module docstring)."""
        import torch

        d = self._dir(run, server_round, digest)
        committed, pending = d / "committed.json", d / "pending.json"
        if committed.is_file():
            meta = json.loads(committed.read_text())
            return Released(torch.load(d / "update.pt", weights_only=True), meta["metrics"])
        if pending.is_file():
            meta = json.loads(pending.read_text())
            rows = [r for r in ledger.rounds(run) if r["status"] == "spent"]
            if len(rows) > int(meta["spent_before"]) and rows[-1]["server_round"] == server_round:
                row = rows[-1]
                metrics = {
                    "num-examples": int(meta.get("num_examples", 0)),
                    "epsilon": float(row["epsilon_after"]), "epsilon-cap": float(row["epsilon_cap"]),
                    "steps": int(row["steps"]), "sample-rate": float(row["sample_rate"]),
                    "noise-multiplier": float(row["noise_multiplier"]),
                }
                self.commit(run, server_round, digest, metrics)
                log.warning("run %s round %d: the site stopped after paying for its update and before "
                            "sending it; sending that update now, without spending again", run, server_round)
                return Released(torch.load(d / "update.pt", weights_only=True), metrics, promoted=True)
            self.discard(run, server_round, digest)  # never paid for, never released
        return None

    def save_pending(self, run: str, server_round: int, digest: str, state: dict[str, Any], ledger: Any,
                     num_examples: int = 0) -> None:
        """Keep ``state`` before its spend is committed (step 1)."""
        import torch

        d = self._dir(run, server_round, digest)
        d.mkdir(parents=True, exist_ok=True)
        with open_atomic(d / "update.pt", mode=None) as fh:
            torch.save({k: v.detach().cpu() for k, v in state.items()}, fh)
        _write_json(d / "pending.json", {"spent_before": self._spent(ledger, run), "num_examples": num_examples})

    def commit(self, run: str, server_round: int, digest: str, metrics: dict[str, float]) -> None:
        """Mark the update released-and-paid-for (step 2); drop those a resume can no longer ask for."""
        d = self._dir(run, server_round, digest)
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        _write_json(d / "committed.json", {"metrics": clean})
        (d / "pending.json").unlink(missing_ok=True)
        self.prune(run, keep_from=server_round - KEEP_ROUNDS + 1)

    def prune(self, run: str, keep_from: int) -> None:
        """Remove committed updates of rounds before ``keep_from`` (a resume repeats only the latest rounds)."""
        base = self.root / _safe(run)
        if not base.is_dir():
            return
        for d in base.iterdir():
            try:
                rnd = int(d.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if rnd < keep_from and (d / "committed.json").is_file():
                for f in d.iterdir():
                    f.unlink()
                d.rmdir()

    def discard(self, run: str, server_round: int, digest: str) -> None:
        d = self._dir(run, server_round, digest)
        for f in ("pending.json", "update.pt", ".update.pt.tmp"):
            (d / f).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            d.rmdir()

    def released(self, run: str) -> list[dict[str, Any]]:
        """Every committed update of a run (round, digest prefix, metrics), oldest round first."""
        out = []
        base = self.root / _safe(run)
        if not base.is_dir():
            return out
        for d in sorted(base.iterdir()):
            if (d / "committed.json").is_file():
                _, rnd, dig = d.name.split("-", 2)
                out.append({"round": int(rnd), "digest": dig, "path": d / "update.pt",
                            **json.loads((d / "committed.json").read_text())})
        return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data), mode=None)


def train_once(site: Any, cfg: Any, run: str, server_round: int, global_state: dict[str, Any], train_fn: Any,
               audit: Any | None = None) -> Any:
    """``train_fn`` (site_client.task.train_round) unless this exact request was already paid for.

    ``audit`` makes the site's audit trail (opened only to record a re-send). Returns a ``TrainReply``.
    """
    from site_client.task import TrainReply, ledger_for, published_size_bucket

    ledger = ledger_for(site)
    store = ReplayStore(site.state_dir)
    digest = arrays_digest(global_state)
    hit = store.lookup(run, server_round, digest, ledger)
    if hit is not None:
        log.info("run %s round %d: this global model was already trained on; re-sending the released update "
                 "(no new privacy spend)", run, server_round)
        if audit is not None:
            trail = audit()
            trail.append("round_resent", run_id=run, server_round=server_round, global_digest=digest,
                         recovered=hit.promoted, update_digest=arrays_digest(hit.state))
            trail.close()
        metrics = {k: (float("nan") if v is None else v) for k, v in hit.metrics.items()}
        return TrainReply(state_dict=hit.state, metrics=metrics)

    def before_commit(state: dict[str, Any]) -> None:
        # The published size bucket (fixed before training), not n: a recovered reply carries the same weight.
        store.save_pending(run, server_round, digest, state, ledger, num_examples=published_size_bucket(site) or 0)

    started = time.monotonic()
    try:
        reply = train_fn(site, cfg, run, server_round, global_state, before_commit=before_commit)
    except BaseException:
        store.lookup(run, server_round, digest, ledger)  # promote if paid for, else drop
        raise
    _record_timing(site.state_dir, run, server_round, time.monotonic() - started)
    if reply.declined is not None or reply.state_dict is None:
        store.discard(run, server_round, digest)
        return reply
    store.commit(run, server_round, digest, reply.metrics)
    return reply


TIMINGS_FILE = "timings.jsonl"


def _record_timing(state_dir: Path, run: str, server_round: int, seconds: float) -> None:
    """Local training time of a round, kept at the site (never sent): bench/round_overhead.py reads it."""
    try:
        with open(state_dir / TIMINGS_FILE, "a") as fh:
            fh.write(json.dumps({"run": run, "round": server_round, "seconds": round(seconds, 4)}) + "\n")
    except OSError:
        pass
