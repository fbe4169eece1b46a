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
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from medfed import hardening
from medfed.fab import fab_sha256, release_fab_sha256
from medfed.protocol import SITE_FAILED, SITE_REFUSED
from medfed.settings import ConfigError, SiteConfig

log = logging.getLogger(__name__)

#: Seconds between asking the SuperNode for a task (loopback; cheap).
POLL_SECONDS = 0.1
#: Seconds between task heartbeats while a task runs (Flower expires a silent task).
HEARTBEAT_SECONDS = 10.0


@dataclass(frozen=True)
class Runtime:
    """Where the SuperNode's Runtime API listens (loopback, TLS with the site's loopback CA)."""

    address: str
    ca_file: Path

    def client(self, token: str | None = None) -> Any:
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=False, root_certificates=self.ca_file.read_bytes(),
            interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())


def _heartbeat(client: Any, stop: threading.Event) -> None:
    """Keep the task alive at the SuperNode while it runs (without Flower's SIGINT on a lost task)."""
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except Exception as err:  # noqa: BLE001 - a missed heartbeat only risks the task's expiry
            log.debug("task heartbeat failed: %s", err)


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
               installed: Callable[[], Any] | None) -> str:
    """Run one task; return what happened ("ran", "refused", "ran-fab" or "failed").

    ``installed`` gives the installed release's ClientApp (run here when the FAB is that
    release); None makes this process load an approved FAB instead (the child's path).
    """
    from flwr.app import Error, Message
    from flwr.common.constant import SubStatus
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    client = runtime.client(token)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(client, stop), daemon=True)
    beat.start()
    context = None
    outcome, details = "failed", "ClientApp task failed"
    try:
        message, context, run, fab = pull_task_input(client)
        digest = fab_sha256(fab.content)
        try:
            site = SiteConfig.from_toml(site_toml)
        except ConfigError as err:
            log.error("%s", err)
            reply = Message(Error(code=SITE_REFUSED, reason=f"site refuses the task: {err}"), reply_to=message)
            outcome, details = "failed", "site config invalid"
        else:
            if digest not in approved:
                reason = refusal_reason(site.name, digest)
                log.error("run %s: %s", run.run_id, reason)
                _record_refusal(site, run.run_id, digest, reason)
                reply = Message(Error(code=SITE_REFUSED, reason=reason), reply_to=message)
                outcome, details = "refused", ""
            elif installed is not None and digest == release_fab_sha256():
                reply = installed()(message=message, context=context)
                outcome, details = "ran", ""
            else:
                reply = _load_fab_app(fab, run)(message=message, context=context)
                outcome, details = "ran-fab", ""
        push_message(client, reply, context)
        push_task_output(client, context, SubStatus.COMPLETED, details)
    except Exception as err:  # noqa: BLE001 - one bad task must not stop the site
        log.exception("task failed: %s", err)
        try:
            push_task_output(client, context, SubStatus.FAILED, f"{details} ({type(err).__name__})")
        except Exception:  # noqa: BLE001
            pass
    finally:
        stop.set()
        client.close()
    return outcome


def _load_fab_app(fab: Any, run: Any) -> Any:
    """Install an approved FAB and load its ClientApp, as Flower's own `flwr-clientapp` does."""
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn

    install_from_fab(fab.content, skip_prompt=True)
    load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    return load(run.fab_id, run.fab_version, fab.hash_str)


def _installed_app() -> Any:
    from site_client.client_app import app

    return app


def _child_command(runtime: Runtime, token: str, kit: Path, site_toml: Path) -> list[str]:
    return [sys.executable, "-m", "site_client.executor", "--kit", str(kit), "--site-toml", str(site_toml),
            "--runtime", runtime.address, "--runtime-ca", str(runtime.ca_file), "--token", token]


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
                # An approved other release runs in its own process (its modules would clash with ours);
                # the child checks the hash of the bytes it receives again.
                rc = subprocess.run(_child_command(runtime, res.token, kit, site_toml), env=hardening.child_env(),
                                    check=False).returncode
                log.info("approved app sha256:%s ran in a child process (exit %d)", claimed, rc)
            else:
                outcome = serve_task(runtime, res.token, site_toml, approved, _installed_app)
                log.info("task %d of run %d: %s", res.task.task_id, res.task.run_id, outcome)
    finally:
        client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m site_client.executor`: the long-lived executor, or (with --token) one task in a child."""
    from medfed import logs
    from site_client.approval import ApprovalError, approved_hashes

    parser = argparse.ArgumentParser(description="medfed's site task executor (started by `medfed site start`)")
    parser.add_argument("--kit", type=Path, required=True)
    parser.add_argument("--site-toml", type=Path, required=True)
    parser.add_argument("--runtime", required=True, help="host:port of the SuperNode's Runtime API")
    parser.add_argument("--runtime-ca", type=Path, required=True)
    parser.add_argument("--token", default=None, help="serve this one task (an approved FAB) and exit")
    args = parser.parse_args(argv)
    hardening.apply()
    logs.setup(os.environ.get("FLWR_LOG_LEVEL", "").upper() == "DEBUG")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    runtime = Runtime(args.runtime, args.runtime_ca)
    if args.token is None:
        return serve(args.kit, args.site_toml, runtime)
    try:
        approved = approved_hashes(args.kit)
    except ApprovalError as err:
        log.error("%s", err)
        approved = frozenset()
    return 0 if serve_task(runtime, args.token, args.site_toml, approved, None) != "failed" else SITE_FAILED % 256


if __name__ == "__main__":
    sys.exit(main())
