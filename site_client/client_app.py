"""The Flower ClientApp a hospital runs: thin wiring around :mod:`site_client.task`.

Every reply goes through :func:`egress_guard`, a Flower mod, so nothing outside
the allow-list can leave the site whatever the handlers do.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from anonymization.audit import AuditError
from medfed.protocol import EGRESS_BLOCKED, RELEASE_KEPT, SITE_DECLINED, SITE_FAILED, SITE_REFUSED
from medfed.settings import ConfigError, OutOfBounds, RunConfig
from medfed.wire import WireError, pack, unpack
from models.study import served_study
from site_client.anchor import anchor_reply
from site_client.egress import (
    ARRAYS_KEY,
    METRICS_KEY,
    EgressViolation,
    check_reply,
    check_secagg_reply,
    is_secagg_reply,
)
from site_client.secagg import clipping_mod, is_secagg, legacy_arrays, secagg_mod
from site_client.site import resolve_site
from site_client.trail import audit_for

# site_client.task (torch, Opacus, MONAI) is imported by the handlers only: SecAgg+'s key-exchange
# stages run in short-lived ClientApp processes that never train.

log = logging.getLogger(__name__)


def _error(msg: Message, code: int, reason: str) -> Message:
    return Message(error=Error(code=code, reason=reason), reply_to=msg)


def _is_refusal(err: Exception) -> bool:
    task = sys.modules.get("site_client.task")
    return isinstance(err, (ConfigError, WireError)) or (task is not None and isinstance(err, task.SiteRefusal))


def run_key(cfg: RunConfig, context: Context) -> str:
    """The run a site's ledger and audit records are keyed on: ``run-name``, else Flower's run id.

    A resumed run gets a new Flower run id; the stable run name keeps its privacy account.
    """
    return cfg.run_name or str(context.run_id)


def make_egress_guard(
    base: RunConfig | None,
) -> Callable[[Message, Context, Callable[[Message, Context], Message]], Message]:
    """A mod that checks and records every reply before it leaves the site."""

    def egress_guard(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        try:
            cfg = RunConfig.from_flower(context.run_config, base)
            site = resolve_site(context.node_config, cfg)
            audit = audit_for(site)
        except (ConfigError, AuditError) as err:
            log.error("%s", err)
            return _error(msg, SITE_REFUSED, str(err))
        server_round = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
        if not server_round and msg.metadata.group_id.isdigit():  # SecAgg+ stages carry the round as group id
            server_round = int(msg.metadata.group_id)
        run = run_key(cfg, context)
        try:
            site.check_run(cfg)  # the site's own [run-bounds], before anything runs on its data
            served_study(site, cfg)  # and only a study its privacy officer approved
        except (OutOfBounds, ConfigError) as err:
            log.error("%s", err)
            audit.append("round_refused", run_id=run, server_round=server_round, reason=str(err))
            audit.close()
            return _error(msg, SITE_REFUSED, str(err))
        secure = is_secagg(msg)
        try:
            expected = legacy_arrays(msg.content) if secure else (
                msg.content.get(ARRAYS_KEY, None))
            reply = call_next(msg, context)
        except Exception as err:  # noqa: BLE001 - the site must answer, but without its internals
            if _is_refusal(err):
                log.error("%s", err)
                audit.append("round_refused", run_id=run, server_round=server_round, reason=str(err))
                audit.close()
                return _error(msg, SITE_REFUSED, str(err))
            log.exception("site %s failed on %s", site.name, msg.metadata.message_type)
            reason = f"site {site.name} failed ({type(err).__name__}); see the site's log"
            audit.append("round_failed", run_id=run, server_round=server_round,
                         message_type=msg.metadata.message_type, reason=reason)
            audit.close()  # a failed round still ends its run with a seal
            return _error(msg, SITE_FAILED, reason)
        if reply.has_error():  # a decline: only its code and reason leave; record them
            audit.append("egress_error", run_id=run, server_round=server_round,
                         message_type=msg.metadata.message_type, code=int(reply.error.code),
                         reason=str(reply.error.reason))
            audit.close()
            return reply
        if not is_secagg_reply(reply.content):
            anchor_reply(reply, site, audit)  # the trail's head, kept off-site by the coordinator
        try:
            if is_secagg_reply(reply.content):
                report = check_secagg_reply(reply.content, msg.metadata.message_type, expected)
            else:
                report = check_reply(reply.content, msg.metadata.message_type, expected)
        except EgressViolation as err:
            audit.append(
                "egress_blocked", run_id=run, server_round=server_round,
                message_type=msg.metadata.message_type, reason=str(err),
            )
            audit.close()
            log.error("reply blocked by the egress allow-list: %s", err)
            return _error(msg, EGRESS_BLOCKED, f"site {site.name}: reply blocked by the egress allow-list: {err}")
        # SecAgg+ replies carry key material or a masked update, not the update itself: their own kind.
        audit.append("egress_secagg" if secure else "egress", run_id=run, server_round=server_round,
                     **report.as_record())
        audit.close()  # seals what left the site
        return reply

    return egress_guard


def build_app(base: RunConfig | None = None) -> ClientApp:
    """The ClientApp; ``base`` supplies run settings where Flower passes none (in-process simulation)."""
    # Outermost first: the egress guard sees exactly what leaves; SecAgg+ masks the update after the
    # (optional) site-level DP clipping; both switch themselves on per message (site_client/secagg.py).
    app = ClientApp(mods=[make_egress_guard(base), secagg_mod, clipping_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from site_client.replay import train_once
        from site_client.task import model_template, train_round

        cfg = RunConfig.from_flower(context.run_config, base)
        site = resolve_site(context.node_config, cfg)
        server_round = int(msg.content["config"]["server-round"])
        global_state = unpack(msg.content[ARRAYS_KEY], model_template(cfg))
        # A repeated (run, round, global model) request re-sends the update already paid for.
        reply = train_once(site, cfg, run_key(cfg, context), server_round, global_state, train_round,
                           audit=lambda: audit_for(site))
        if reply.declined is not None:
            return _error(msg, SITE_DECLINED, reply.declined)
        assert reply.state_dict is not None
        content = RecordDict({ARRAYS_KEY: pack(reply.state_dict), METRICS_KEY: MetricRecord(reply.metrics)})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from site_client.task import evaluate_round, model_template

        cfg = RunConfig.from_flower(context.run_config, base)
        site = resolve_site(context.node_config, cfg)
        global_state = unpack(msg.content[ARRAYS_KEY], model_template(cfg))
        server_round = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
        metrics = evaluate_round(site, cfg, run_key(cfg, context), global_state, server_round)
        return Message(content=RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """The run's last message: the signed release, kept only if the site's own release key verifies it."""
        from site_client.releases import ReleaseNotKept, keep_sent_release

        cfg = RunConfig.from_flower(context.run_config, base)
        site = resolve_site(context.node_config, cfg)
        try:
            keep_sent_release(site, msg.content, run_key(cfg, context))
        except ReleaseNotKept as err:
            log.warning("%s", err)
            return _error(msg, SITE_DECLINED if err.declined else SITE_REFUSED, str(err))
        return Message(content=RecordDict({METRICS_KEY: MetricRecord({RELEASE_KEPT: 1})}), reply_to=msg)

    return app


#: What `flwr run` / a SuperNode loads (pyproject: clientapp = "site_client.client_app:app").
app = build_app()
