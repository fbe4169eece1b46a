"""The consortium's release of a run's model: written beside model.pt and signed with the release key."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from coordinator.checkpoint import load_checkpoint
from medfed.files import write_text
from medfed.settings import RunConfig
from medfed.signing import Signer
from models.release import ReleaseError, model_card, write_release

RELEASE_DIR = "release"


def _final_round(metrics: dict[str, Any], upto: int | None) -> dict[str, Any]:
    rounds = [r for r in metrics.get("rounds", []) if upto is None or r["round"] <= upto]
    return rounds[-1] if rounds else {}


def _sites(last: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each site's ε, δ and its DP metrics of the release's round (what the sites chose to release)."""
    out = {}
    for node, s in last.get("sites", {}).items():
        train, evaluate = s.get("train", {}), s.get("evaluate", {})
        name = s.get("name") or node  # the site's name from its audit anchor; the node id if it sent none
        out[name if name not in out else f"{name} ({node})"] = {
            "epsilon": s.get("epsilon"), "epsilon_cap": s.get("epsilon_cap"),
            "delta": train.get("delta", evaluate.get("delta")),
            "metrics": s.get("metrics") or {k: v for k, v in evaluate.items() if k not in ("epsilon", "epsilon-cap")}}
    return out


def release_run(run_dir: Path, signer: Signer, *, server_round: int | None = None,
                out: Path | None = None) -> Path:
    """Sign the model of ``run_dir`` (its final model, or the checkpoint of ``server_round``) as a release."""
    from medfed.fab import release_fab_sha256
    from models.study import study_of

    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise ReleaseError(f"{run_dir} holds no metrics.json: pass the output folder of a run (its out-dir)")
    metrics = json.loads(metrics_path.read_text())
    if server_round is None:
        import torch

        model = run_dir / "model.pt"
        if not model.is_file():
            raise ReleaseError(f"{run_dir} holds no model.pt (the run did not finish); release a checkpoint "
                               "with --round N")
        state = torch.load(model, map_location="cpu", weights_only=True)
        run_config = metrics.get("run_config", {})
    else:
        ckpt_path = run_dir / "checkpoints" / f"round-{server_round:04d}.pt"
        if not ckpt_path.is_file():
            raise ReleaseError(f"{ckpt_path} does not exist: choose a round that has a checkpoint")
        ckpt = load_checkpoint(ckpt_path)
        state, run_config = ckpt.state_dict, ckpt.run_config
    cfg = RunConfig.from_flower(run_config)
    study = study_of(cfg)
    last = _final_round(metrics, server_round)
    card = model_card(study=study, run_name=cfg.run_name or run_dir.name, rounds=int(last.get("round", 0)),
                      fab_sha256=metrics.get("fab_sha256") or release_fab_sha256(),
                      metrics=last.get("pooled") or last.get("evaluate", {}), sites=_sites(last))
    target = out or (run_dir / (RELEASE_DIR if server_round is None else f"{RELEASE_DIR}-round-{server_round:04d}"))
    return write_release(target, state, study, card, signer)


#: The file beside release/ that says which site kept the release sent in the run's last message.
DELIVERY_FILE = "release-delivery.json"
#: Longest wait for the sites' answers to that message: a site that is away gets the release as a file.
DELIVERY_TIMEOUT = 60.0


def deliver_release(grid: Any, release_dir: Path, server_round: int, timeout: float = DELIVERY_TIMEOUT,
                    names: Mapping[str, str] | None = None) -> Path:
    """Send the signed release to every connected site in the run's last message; write who kept it.

    Each site verifies it with the release key of its own kit and keeps it, or refuses it
    (site_client.releases); the coordinator only reports. ``release-delivery.json`` (beside
    ``release_dir``) maps each node to its site's name and "kept", or the site's reason, or "no answer".
    ``names`` (node id -> site) names the sites whose answer carries no name: a refusal, or silence.
    """
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from medfed.protocol import RELEASE_RECORD
    from models.release import release_bytes

    files = release_bytes(release_dir)
    nodes = sorted(grid.get_node_ids())
    messages = [Message(RecordDict({RELEASE_RECORD: ConfigRecord(dict(files)),
                                    "config": ConfigRecord({"server-round": server_round})}),
                        dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
    outcome = delivery_outcomes(nodes, grid.send_and_receive(messages, timeout=timeout), names or {})
    path = Path(release_dir).parent / DELIVERY_FILE
    write_text(path, json.dumps({"release": Path(release_dir).name, "nodes": outcome}, indent=2) + "\n")
    return path


def delivery_outcomes(nodes: Iterable[int], replies: Iterable[Any],
                      names: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Node id -> its site and "kept", "not kept: REASON" or "no answer"; a keeping site names itself (its anchor)."""
    from anonymization.audit.anchors import ANCHOR_RECORD, AnchorError, parse_anchor

    outcome = {str(n): {"site": names.get(str(n), ""), "outcome": "no answer"} for n in nodes}
    for reply in replies:
        node = str(reply.metadata.src_node_id)
        entry = outcome.setdefault(node, {"site": names.get(node, ""), "outcome": ""})
        if reply.has_error():
            entry["outcome"] = f"not kept: {reply.error.reason}"
            continue
        entry["outcome"] = "kept"
        with contextlib.suppress(AnchorError, KeyError, TypeError):  # no anchor: the name the run knew, if any
            entry["site"] = parse_anchor(reply.content[ANCHOR_RECORD])[0]
    return outcome


def delivery_line(release_dir: Path) -> str:
    """One line on who kept the release sent in the run's last message, for the run's summary ("" if none was sent)."""
    path = Path(release_dir).parent / DELIVERY_FILE
    if not path.is_file():
        return ""
    nodes = json.loads(path.read_text()).get("nodes", {})

    def label(node: str, entry: dict[str, str]) -> str:  # "site node N": `medfed run` puts the enrolled name there
        return entry.get("site") or f"site node {node}"

    kept = sorted(label(node, n) for node, n in nodes.items() if n.get("outcome") == "kept")
    others = [f"{label(node, n)}: {n.get('outcome')}" for node, n in sorted(nodes.items())
              if n.get("outcome") != "kept"]
    return f"sent to the sites: kept by {len(kept)} of {len(nodes)} ({', '.join(kept) or 'none'})" + (
        f"; {'; '.join(others)}" if others else "")
