"""Flower's `flower-supernode`, pulling every half second and presenting the site's TLS client certificate.

Flower's SuperNode sleeps a fixed 3 s after every pull that finds no message
(``flwr.supernode.start_client_internal``), so each round of a deployment waits
up to 3 s per message before a site even sees it, however fast the site trains.
Flower offers no setting for it; this entry point runs Flower's own SuperNode
with that module's sleeps capped at :data:`POLL_SECONDS` (two small HTTPS
requests a second per site). If Flower stops using ``time.sleep`` there, the
SuperNode simply keeps its own interval. Two more of Flower's waits are set the
same way, from its module constants: a lost coordinator is tried again at most
:data:`RECONNECT_MAX_SECONDS` apart, and heartbeats go every
:data:`HEARTBEAT_SECONDS`, so a site restarted after a crash rejoins sooner.
Nothing else of Flower's SuperNode changes.

The coordinator's public port admits only clients with a certificate from the
consortium CA (mutual TLS, docs/deployment.md "The control plane"), and
Flower's SuperNode has no option for a client certificate either: with
:data:`CLIENT_CERT_FLAG` / :data:`CLIENT_KEY_FLAG` (taken off the command line
before Flower parses it) the Fleet API client's TLS context also loads that
certificate and key. Nothing else of Flower's TLS set-up changes.

A refusal no retry can cure (the coordinator answers 401: this site's certificate
is revoked or expired, or its key is not enrolled; or the coordinator's
certificate does not verify against the kit's CA) ends the SuperNode at once
with one line saying why and exit code :data:`FATAL_EXIT`, which `medfed site
start` and systemd (``RestartPreventExitStatus=``) do not restart.
"""

from __future__ import annotations

import os
import ssl
import sys
import time as _time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.supercore.retry import RetryInvoker

#: Longest wait between two pulls of the SuperNode (and between checks for the site's reply).
POLL_SECONDS = 0.5
#: Longest wait between two attempts to reach a coordinator that does not answer (Flower's: 20 s).
RECONNECT_MAX_SECONDS = 4
#: Seconds between heartbeats the SuperNode announces (Flower's: 30 s; the least its SuperLink takes: 10 s).
#: The coordinator counts a silent site online for two of them, and refuses that site's restarted SuperNode
#: meanwhile: a site killed without a goodbye rejoins after 20 s instead of 60 s.
HEARTBEAT_SECONDS = 10
#: Our own arguments (the site's TLS client certificate and key), removed before Flower's parser sees argv.
CLIENT_CERT_FLAG = "--medfed-client-cert"
CLIENT_KEY_FLAG = "--medfed-client-key"
#: Exit code of a site that must not be restarted (EX_CONFIG): its kit, key or certificate has to change first.
FATAL_EXIT = 78
#: Where :func:`fatal` writes its reason for `medfed site start` to print (else: stderr).
FATAL_FILE_ENV = "MEDFED_SITE_FATAL_FILE"


def fatal(reason: str) -> None:
    """Say why this site cannot connect, once, and end the process with :data:`FATAL_EXIT` (no retry helps)."""
    target = os.environ.get(FATAL_FILE_ENV)
    try:
        if target:
            with open(target, "w") as fh:
                fh.write(reason + "\n")
        else:
            sys.stderr.write(f"error: {reason}\n")
            sys.stderr.flush()
    finally:
        os._exit(FATAL_EXIT)  # at once: Flower's retry loop and its threads must not go on


def refusal_reason(exc: BaseException, superlink: str, ca_cert: str) -> str | None:
    """The fatal cause behind a Fleet API error, or None when retrying may help (network, coordinator restart)."""
    import httpx

    if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 401:
        return (f"the coordinator {superlink} refused this site (HTTP 401): its TLS certificate is revoked or "
                "expired, or its node key is not enrolled (or this host's clock is wrong). Ask the consortium "
                "operator for a new kit (`medfed consortium add-site`); restarting will not help")
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return (f"the coordinator {superlink} presented a certificate that {ca_cert} does not verify ({text}): this "
                "kit is from another consortium, or the coordinator's certificate changed. Ask the consortium "
                "operator for this consortium's kit (ca.pem); restarting will not help")
    return None


class _CappedClock:
    """The ``time`` module, except that ``sleep`` waits at most :data:`POLL_SECONDS`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        _time.sleep(min(seconds, POLL_SECONDS))


def _pop_option(argv: list[str], flag: str) -> str | None:
    """Remove ``flag VALUE`` from ``argv``; the value, or None when absent."""
    if flag not in argv:
        return None
    i = argv.index(flag)
    if i + 1 >= len(argv):
        raise SystemExit(f"{flag} needs a file")
    value = argv[i + 1]
    del argv[i:i + 2]
    return value


def present_client_certificate(cert: str | None, key: str | None, *, superlink: str = "the coordinator",
                               ca_cert: str = "the kit's ca.pem") -> None:
    """Make Flower's Fleet client load ``cert``/``key`` into the TLS context it verifies the coordinator with,
    and end the SuperNode with one clear line on a refusal no retry cures (:func:`refusal_reason`).

    Flower builds that context in ``ProtobufClient.from_server_address`` (a CA file path, CA bytes, or the
    system CAs) and hands it to ``ProtobufClient.__init__``; we wrap ``__init__`` of the Fleet client only.
    """
    from flwr.supernode import fleet_http_connection
    from flwr.supernode.fleet_http_client import FleetHttpClient

    class _FleetClientWithCertificate(FleetHttpClient):
        def __init__(self, base_url: str, *, verify: ssl.SSLContext | bool | str = True, **kwargs: Any) -> None:
            if verify is not False and cert and key:  # Flower's insecure mode stays as it is
                if isinstance(verify, ssl.SSLContext):
                    ctx = verify
                else:
                    ctx = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
                ctx.load_cert_chain(cert, key)
                verify = ctx
            super().__init__(base_url, verify=verify, **kwargs)

        def _unary_unary(self, **kwargs: Any) -> Any:
            try:
                return super()._unary_unary(**kwargs)
            except Exception as exc:
                if (reason := refusal_reason(exc, superlink, ca_cert)) is not None:
                    fatal(reason)
                raise

    fleet_http_connection.FleetHttpClient = _FleetClientWithCertificate  # type: ignore[misc]


def capped_retry_invoker() -> RetryInvoker:
    """Flower's HTTP retry invoker, waiting at most :data:`RECONNECT_MAX_SECONDS` between attempts (Flower's: 20 s).

    What is retried, the jitter and when to give up stay Flower's. Used by the SuperNode towards the
    coordinator and by the site executor towards its SuperNode, which `medfed site start` may be restarting.
    """
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.retry.retry_invoker import exponential

    invoker = make_simple_http_retry_invoker()
    invoker.wait_gen_factory = lambda: exponential(max_delay=RECONNECT_MAX_SECONDS)
    return invoker


def cap_reconnect_wait() -> None:
    """Make the Fleet connection's retries wait at most :data:`RECONNECT_MAX_SECONDS` between attempts."""
    from flwr.supernode import fleet_http_connection

    fleet_http_connection.make_simple_http_retry_invoker = capped_retry_invoker  # type: ignore[assignment]


def shorten_heartbeat() -> None:
    """Announce, and keep, heartbeats every :data:`HEARTBEAT_SECONDS` (Flower reads its constant at each use)."""
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    for module in (heartbeat, fleet_http_connection):
        module.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_SECONDS  # type: ignore[attr-defined]


def main() -> int:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    cert, key = _pop_option(sys.argv, CLIENT_CERT_FLAG), _pop_option(sys.argv, CLIENT_KEY_FLAG)
    superlink = sys.argv[sys.argv.index("--superlink") + 1] if "--superlink" in sys.argv[:-1] else "the coordinator"
    ca = (sys.argv[sys.argv.index("--root-certificates") + 1] if "--root-certificates" in sys.argv[:-1]
          else "the kit's ca.pem")
    present_client_certificate(cert, key, superlink=superlink, ca_cert=ca)
    cap_reconnect_wait()
    shorten_heartbeat()
    if getattr(start_client_internal, "time", None) is _time:
        start_client_internal.time = _CappedClock()  # type: ignore[assignment]
    sys.argv[0] = "flower-supernode"
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
