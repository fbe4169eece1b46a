"""What happened in a run, round by round: the source of metrics.json and the plot.

Kept as plain data so checkpoints can carry it and a resumed run continues it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


def _clean(values: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN: an undefined metric (e.g. AUC on a one-class split) is null.
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}


@dataclass
class SiteRound:
    """One site's part in one round, as the coordinator saw it (scalars only)."""

    # not-sampled (evaluated only) | trained | declined | refused | failed | egress-blocked | no-reply
    # | rejected (the coordinator refused the reply: coordinator.screening)
    status: str = "not-sampled"
    reason: str | None = None  # why it did not train (its train reply's error)
    evaluate_error: str | None = None  # why it did not evaluate, kept apart so it cannot hide the train reason
    train: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)  # the scalars of its evaluate reply
    name: str | None = None  # the site's name, as its audit anchor gives it (a label, not an identity)
    #: Its per-class and macro figures, computed here from the noisy counts it released (models.metrics).
    metrics: dict[str, Any] | None = None

    def no_result(self, phase: str, status: str, reason: str) -> None:
        """Record why the site gave no ``phase`` result; ``status`` applies to training only."""
        if phase == "train":
            self.status, self.reason = status, reason
        else:
            self.evaluate_error = reason


@dataclass
class RoundRecord:
    """The aggregated and per-site metrics of one round."""

    round: int
    seconds: float = 0.0
    train: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    sites: dict[str, SiteRound] = field(default_factory=dict)
    #: The consortium's figures from the sum of the sites' noisy counts (post-processing), with the sites pooled.
    pooled: dict[str, Any] | None = None

    def site(self, node_id: int | str) -> SiteRound:
        return self.sites.setdefault(str(node_id), SiteRound())


@dataclass
class RunHistory:
    """Every round of a run so far."""

    rounds: list[RoundRecord] = field(default_factory=list)

    def named_sites(self) -> dict[str, str]:
        """node id -> the name its site gave (its audit anchor), for the nodes that gave one (the latest)."""
        return {node: s.name for r in self.rounds for node, s in r.sites.items() if s.name}

    def site_names(self) -> dict[str, str]:
        """node id -> the label a person reads: the site's name (with its node where two share one)."""
        named = self.named_sites()
        nodes = sorted({n for r in self.rounds for n in r.sites})
        counts: dict[str, int] = {}
        for n in nodes:
            counts[named.get(n, "")] = counts.get(named.get(n, ""), 0) + 1
        return {n: (named[n] if n in named and counts[named[n]] == 1 else
                    f"{named[n]} (node {n[:6]})" if n in named else f"node {n[:6]}") for n in nodes}

    def round(self, number: int) -> RoundRecord:
        for r in self.rounds:
            if r.round == number:
                return r
        rec = RoundRecord(round=number)
        self.rounds.append(rec)
        self.rounds.sort(key=lambda r: r.round)
        return rec

    def to_json(self) -> list[dict[str, Any]]:
        out = []
        for r in self.rounds:
            d = asdict(r)
            d["train"] = _clean(d["train"])
            d["evaluate"] = _clean(d["evaluate"])
            d["auc"] = d["evaluate"].get("auc")
            for s in d["sites"].values():
                s["train"] = _clean(s["train"])
                s["evaluate"] = _clean(s["evaluate"])
                s["epsilon"] = s["evaluate"].get("epsilon", s["train"].get("epsilon"))
                s["epsilon_cap"] = s["evaluate"].get("epsilon-cap", s["train"].get("epsilon-cap"))
            out.append(d)
        return out

    @classmethod
    def from_json(cls, data: list[dict[str, Any]]) -> RunHistory:
        hist = cls()
        for d in data:
            rec = RoundRecord(round=d["round"], seconds=d.get("seconds", 0.0), train=d.get("train", {}),
                              evaluate=d.get("evaluate", {}), pooled=d.get("pooled"))
            for node, s in d.get("sites", {}).items():
                rec.sites[node] = SiteRound(status=s.get("status", "not-sampled"), reason=s.get("reason"),
                                            evaluate_error=s.get("evaluate_error"), train=s.get("train", {}),
                                            evaluate=s.get("evaluate", {}), name=s.get("name"),
                                            metrics=s.get("metrics"))
            hist.rounds.append(rec)
        return hist
