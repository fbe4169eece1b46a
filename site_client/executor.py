"""The site's own task executor: runs only approved apps, in one long-lived process.

Flower's SuperNode, started with ``--isolation process``, queues each message
from the coordinator as a task and leaves running it to an executor that
connects to its loopback Runtime API. Flower's default executor installs the
run's FAB and imports its ClientApp: code the coordinator chose. This one is
ours because none of Flower's checks the FAB against the site's approvals
before importing it. For every task it:

1. pulls the task's message, context and FAB (nothing of the FAB is imported);
2. hashes the FAB's bytes and looks the hash up in the site's approvals;
3. refuses an unapproved FAB with an error reply that names the hash, and
   records the refusal ("not approved") in the site's audit trail;
4. runs the installed release's own ClientApp in this process when the FAB is
   that release (torch, the network and the site's data stay loaded between
   rounds, which removes the per-round start-up cost), or an approved other
   release in a fresh child process that installs and loads that FAB.

Reuses Flower's Runtime API client and its task-input/output helpers, so the
protocol is Flower's; only the decision of what runs is the site's.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed import hardening
from medfed.fab import fab_sha256, release_fab_sha256
from medfed.protocol import SITE_REFUSED
from medfed.settings import ConfigError, SiteConfig

log = logging.getLogger(__name__)

#: Seconds between asking the SuperNode for a task (loopback; cheap).
POLL_SECONDS = 0.1
#: Seconds between task heartbeats while a task runs (Flower expires a silent task).
HEARTBEAT_SECONDS = 10.0
#: Longest wait for a task's message from the SuperNode's own store (loopback). Flower's default is two
#: hours, fine for a process per task; here a message that never arrives (e.g. of a run the coordinator
#: ended while the SuperNode fetched it) would hold up every later task.
PULL_SECONDS = 60.0


@dataclass(frozen=True)
class Runtime:
    """Where the SuperNode's Runtime API listens (loopback, TLS with the site's loopback CA)."""

    address: str
    ca_file: Path

    def client(self, token: str | None = None) -> Any:
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        from site_client.supernode import capped_retry_invoker

        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=False, root_certificates=self.ca_file.read_bytes(),
            interceptors=interceptors, retry_invoker=capped_retry_invoker())


def _heartbeat(client: Any, stop: threading.Event) -> None:
    """Keep the task alive at the SuperNode while it runs (without Flower's SIGINT on a lost task)."""
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except Exception as err:  # noqa: BLE001 - a missed heartbeat only risks the task's expiry
            log.debug("task heartbeat failed: %s", err)


def _pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """Flower's ``pull_task_input`` (message, context, run, FAB), with the message pull bounded by PULL_SECONDS."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode holds no message for this task")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, max_time=PULL_SECONDS, backoff_cap=2.0)
    message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message lacks its own id
    return message, context, run, fab


def _record_refusal(site: SiteConfig, run_id: int, digest: str, reason: str) -> None:
    from site_client.trail import audit_for

    audit = audit_for(site)
    audit.append("app_refused", run_id=str(run_id), fab_sha256=digest, reason=reason)
    audit.close()


def refusal_reason(site_name: str, digest: str) -> str:
    """What the coordinator is told when its FAB is not approved (the hash, nothing of the site)."""
    return (f"site {site_name} refuses app sha256:{digest}: not approved by the site's privacy officer "
            "(the site runs only approved apps: `medfed site approve KIT --app FAB` after review)")


def serve_task(runtime: Runtime, token: str, site_toml: Path, approved: frozenset[str],
               installed: Callable[[], Any], announced: str) -> str:
    """Run one task with the installed release's ClientApp, or refuse it; returns "ran", "refused" or "failed".

    Refused: a FAB not in ``approved``, or whose bytes do not hash to ``announced`` (the
    hash the task named, which :func:`serve` checked); nothing of the FAB is imported.
    """
    from flwr.app import Error, Message
    from flwr.common.constant import SubStatus
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    client = runtime.client(token)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(client, stop), daemon=True)
    beat.start()
    context = None
    outcome, details = "failed", "ClientApp task failed"
    try:
        message, context, run, fab = _pull_task_input(client)
        digest = fab_sha256(fab.content)
        try:
            site = SiteConfig.from_toml(site_toml)
        except ConfigError as err:
            log.error("%s", err)
            reply = Message(Error(code=SITE_REFUSED, reason=f"site refuses the task: {err}"), reply_to=message)
            outcome, details = "failed", "site config invalid"
        else:
            if digest not in approved:
                refusal = refusal_reason(site.name, digest)
            elif digest != announced:
                refusal = (f"site {site.name} refuses run {run.run_id}: its app bundle hashes to sha256:{digest}, "
                           f"not the announced sha256:{announced}")
            else:
                refusal = None
            if refusal is not None:  # nothing of the FAB was imported
                log.error("run %s: %s", run.run_id, refusal)
                _record_refusal(site, run.run_id, digest, refusal)
                reply = Message(Error(code=SITE_REFUSED, reason=refusal), reply_to=message)
                outcome, details = "refused", ""
            else:
                reply = installed()(message=message, context=context)
                outcome, details = "ran", ""
        push_message(client, reply, context)
        push_task_output(client, context, SubStatus.COMPLETED, details)
    except Exception as err:  # noqa: BLE001 - one bad task must not stop the site
        log.exception("task failed: %s", err)
        with contextlib.suppress(Exception):  # the SuperNode may be gone too; the log has the cause
            push_task_output(client, context, SubStatus.FAILED, f"{details} ({type(err).__name__})")
    finally:
        stop.set()
        client.close()
    return outcome


def _installed_app() -> Any:
    from site_client.client_app import app

    return app


def _flower_clientapp(runtime: Runtime, token: str) -> list[str]:
    """Flower's own per-task ClientApp process, for an approved FAB that is not the installed release."""
    return [str(Path(sys.executable).parent / "flwr-clientapp"), "--runtime-api-address", runtime.address,
            "--token", token, "--root-certificates", str(runtime.ca_file), "--parent-pid", str(os.getpid())]


def serve(kit: Path, site_toml: Path, runtime: Runtime, stop: threading.Event | None = None,
          max_tasks: int | None = None) -> int:
    """Take tasks from the SuperNode until ``stop`` is set (or ``max_tasks`` were served)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    from site_client.approval import ApprovalError, approved_hashes

    release = release_fab_sha256()
    log.info("site executor: installed release sha256:%s; serving %s", release, runtime.address)
    client = runtime.client()
    served = 0
    try:
        while not (stop is not None and stop.is_set()) and (max_tasks is None or served < max_tasks):
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except Exception as err:  # noqa: BLE001 - the SuperNode is (re)starting: wait for it
                log.debug("SuperNode runtime not reachable: %s", err)
                time.sleep(1.0)
                continue
            if not (res.HasField("task") and res.token):
                time.sleep(POLL_SECONDS)
                continue
            served += 1
            try:
                approved = approved_hashes(kit)  # read per task: an approval takes effect at once
            except ApprovalError as err:
                log.error("%s", err)
                approved = frozenset()
            claimed = res.task.fab_hash
            if claimed in approved and claimed != release:
                # An approved other release runs in its own process: its modules would clash with ours.
                rc = subprocess.run(_flower_clientapp(runtime, res.token), env=hardening.child_env(),
                                    check=False).returncode
                log.info("approved app sha256:%s ran in Flower's flwr-clientapp (exit %d)", claimed, rc)
            else:
                # the installed release runs here; anything else unapproved is refused here, unimported
                outcome = serve_task(runtime, res.token, site_toml, approved, _installed_app, claimed)
                log.info("task %d of run %d: %s", res.task.task_id, res.task.run_id, outcome)
    finally:
        client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m site_client.executor`: the site's long-lived executor (started by `medfed site start`)."""
    from medfed import logs

    parser = argparse.ArgumentParser(description="medfed's site task executor (started by `medfed site start`)")
    parser.add_argument("--kit", type=Path, required=True)
    parser.add_argument("--site-toml", type=Path, required=True)
    parser.add_argument("--runtime", required=True, help="host:port of the SuperNode's Runtime API")
    parser.add_argument("--runtime-ca", type=Path, required=True)
    args = parser.parse_args(argv)
    hardening.apply()
    logs.setup(os.environ.get("FLWR_LOG_LEVEL", "").upper() == "DEBUG")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    return serve(args.kit, args.site_toml, Runtime(args.runtime, args.runtime_ca))


if __name__ == "__main__":
    sys.exit(main())
