"""The Flower ClientApp a hospital runs: thin wiring around :mod:`site_client.task`.

Every reply goes through :func:`egress_guard`, a Flower mod, so nothing outside
the allow-list can leave the site whatever the handlers do.
"""

from __future__ import annotations

import logging
from typing import Callable

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from anonymization.audit import AuditError
from medfed.protocol import EGRESS_BLOCKED, SITE_DECLINED, SITE_FAILED, SITE_REFUSED
from medfed.settings import ConfigError, RunConfig
from site_client.egress import ARRAYS_KEY, METRICS_KEY, EgressViolation, check_reply
from site_client.site import resolve_site
from site_client.task import SiteRefusal, audit_for, evaluate_round, train_round

log = logging.getLogger(__name__)


def _error(msg: Message, code: int, reason: str) -> Message:
    return Message(error=Error(code=code, reason=reason), reply_to=msg)


def make_egress_guard(base: RunConfig | None) -> Callable[[Message, Context, Callable[[Message, Context], Message]], Message]:
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
        try:
            reply = call_next(msg, context)
        except (SiteRefusal, ConfigError) as err:
            log.error("%s", err)
            audit.append("round_refused", run_id=str(context.run_id), server_round=server_round, reason=str(err))
            audit.close()
            return _error(msg, SITE_REFUSED, str(err))
        except Exception as err:  # noqa: BLE001 - the site must answer, but without its internals
            log.exception("site %s failed on %s", site.name, msg.metadata.message_type)
            reason = f"site {site.name} failed ({type(err).__name__}); see the site's log"
            audit.append("round_failed", run_id=str(context.run_id), server_round=server_round,
                         message_type=msg.metadata.message_type, reason=reason)
            audit.close()  # a failed round still ends its run with a seal
            return _error(msg, SITE_FAILED, reason)
        if reply.has_error():  # a decline: only its code and reason leave; record them
            audit.append("egress_error", run_id=str(context.run_id), server_round=server_round,
                         message_type=msg.metadata.message_type, code=int(reply.error.code),
                         reason=str(reply.error.reason))
            audit.close()
            return reply
        expected = msg.content[ARRAYS_KEY] if ARRAYS_KEY in msg.content else None
        try:
            report = check_reply(reply.content, msg.metadata.message_type, expected)
        except EgressViolation as err:
            audit.append(
                "egress_blocked", run_id=str(context.run_id), server_round=server_round,
                message_type=msg.metadata.message_type, reason=str(err),
            )
            audit.close()
            log.error("reply blocked by the egress allow-list: %s", err)
            return _error(msg, EGRESS_BLOCKED, f"site {site.name}: reply blocked by the egress allow-list: {err}")
        audit.append("egress", run_id=str(context.run_id), server_round=server_round, **report.as_record())
        audit.close()  # seals what left the site
        return reply

    return egress_guard


def build_app(base: RunConfig | None = None) -> ClientApp:
    """The ClientApp; ``base`` supplies run settings where Flower passes none (in-process simulation)."""
    app = ClientApp(mods=[make_egress_guard(base)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = RunConfig.from_flower(context.run_config, base)
        site = resolve_site(context.node_config, cfg)
        server_round = int(msg.content["config"]["server-round"])
        global_state = msg.content[ARRAYS_KEY].to_torch_state_dict()
        reply = train_round(site, cfg, str(context.run_id), server_round, global_state)
        if reply.declined is not None:
            return _error(msg, SITE_DECLINED, reply.declined)
        assert reply.state_dict is not None
        content = RecordDict({ARRAYS_KEY: ArrayRecord(reply.state_dict), METRICS_KEY: MetricRecord(reply.metrics)})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg = RunConfig.from_flower(context.run_config, base)
        site = resolve_site(context.node_config, cfg)
        global_state = msg.content[ARRAYS_KEY].to_torch_state_dict()
        metrics = evaluate_round(site, cfg, str(context.run_id), global_state)
        return Message(content=RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)

    return app


#: What `flwr run` / a SuperNode loads (pyproject: clientapp = "site_client.client_app:app").
app = build_app()
