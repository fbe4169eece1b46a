"""`medfed consortium|coordinator|site ...` and `medfed run`: deployment across hospitals.

Thin Typer wiring over coordinator.provision / coordinator.superlink /
coordinator.launch (operator side) and site_client.kit (site side). Light to
import: no torch or Flower until a command runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from medfed.cli.output import console, fail, round_table

log = logging.getLogger("medfed")

consortium_app = typer.Typer(help="Provision a consortium: CA, coordinator TLS identity, enrol sites by public key.",
                             no_args_is_help=True)
coordinator_app = typer.Typer(help="Run the coordinator's Flower SuperLink (TLS, SuperNode authentication).",
                              no_args_is_help=True)
site_app = typer.Typer(help="Make the site's key (keygen), run its Flower SuperNode from its kit, receive from PACS.",
                        no_args_is_help=True)



#: Default of `medfed run --wait-for-sites`: how long a run waits for the consortium's sites before it is submitted.
WAIT_FOR_SITES = 120.0

_DIR = Annotated[Path, typer.Argument(help="Consortium folder (made by `medfed consortium init`).")]


_CA_PASSPHRASE = Annotated[Path | None, typer.Option(
    "--ca-passphrase-file", help="File holding the passphrase of the consortium CA key (ca/ca.key); "
    "or set MEDFED_CA_PASSPHRASE. Without either the key is unencrypted.")]


@consortium_app.command("init")
def consortium_init(
    directory: Annotated[Path, typer.Argument(help="New consortium folder to create.")],
    name: Annotated[str, typer.Option("--name", help="Consortium name (goes into the CA certificate).")],
    coordinator_host: Annotated[list[str], typer.Option(
        "--coordinator-host", help="Name or address sites use to reach the coordinator (repeat, or comma-separate); "
        "localhost and 127.0.0.1 are always added.")],
    site: Annotated[list[str] | None, typer.Option(
        "--site", help="Enrol a site by what `medfed site keygen` made there: NAME=PATH/TO/node.pub, its TLS "
        "certificate request being the tls.csr next to it (or NAME=node.pub,tls.csr); repeat per site, or enrol "
        "later with add-site.")] = None,
    port: Annotated[int, typer.Option(help="The SuperLink's HTTPS port.")] = 9093,
    bind_host: Annotated[str, typer.Option("--bind-host", help="Address the SuperLink listens on.")] = "0.0.0.0",
    ca_passphrase_file: _CA_PASSPHRASE = None,
) -> None:
    """Create the CA, the coordinator's TLS certificate and key, and a kit (no private key) per enrolled site."""
    from coordinator.provision import ProvisionError, ca_passphrase, init_consortium, parse_site_spec

    try:
        sites = [parse_site_spec(s) for s in site or []]
        passphrase = ca_passphrase(ca_passphrase_file)
        cfg = init_consortium(directory, name, coordinator_host, sites, port=port, bind_host=bind_host,
                              ca_passphrase=passphrase)
    except ProvisionError as err:
        fail(str(err))
        return
    root = directory.resolve()
    typer.echo(f"consortium {cfg.name} in {root}: coordinator https://{cfg.coordinator_hosts[0]}:{cfg.port}, "
               f"CA key {root / 'ca' / 'ca.key'} ({'passphrase-encrypted' if passphrase else 'NOT encrypted'}; "
               "keep ca/ offline)")
    _print_kits(root, cfg.sites)
    if not cfg.sites:
        typer.echo("enrol sites: each runs `medfed site keygen KIT` and sends its auth/node.pub; then "
                   f"`medfed consortium add-site {directory} NAME --public-key node.pub`")


def _print_kits(root: Path, entries: list[Any]) -> None:
    """Each enrolled site's key fingerprint (to compare with the site's) and the kit to send back."""
    from coordinator.provision import site_fingerprint

    for e in entries:
        typer.echo(f"  site {e.name}: key {site_fingerprint(root, e)} (must equal what `medfed site keygen` printed "
                   f"at the site); send it {root / 'kits' / e.name} — the kit holds no private key")


def _change_sites(directory: Path, site: str, change: Callable[[Path, str], Any]) -> tuple[Any, bool]:
    """Apply ``change`` to the consortium; a running coordinator picks it up at once (registrations, CRL)."""
    from coordinator.provision import ProvisionError
    from coordinator.superlink import CoordinatorError, reload_proxy, running_pid, sync_registrations

    try:
        entry = change(directory, site)
    except (ProvisionError, CoordinatorError) as err:
        fail(str(err))
    live = running_pid(directory) is not None
    if live:
        try:
            reload_proxy(directory)  # nginx re-reads the CRL: a revoked certificate is refused from now on
            sync_registrations(directory)
        except (ProvisionError, CoordinatorError, OSError) as err:
            fail(f"{directory / 'consortium.toml'} records the change to site {site}, but the running coordinator "
                  f"could not be told ({err}); `medfed run` applies it before the next run, or restart the "
                  f"coordinator (`medfed coordinator start {directory}`)", 1)
    return entry, live


@consortium_app.command("add-site")
def consortium_add_site(
    directory: _DIR,
    site: Annotated[str, typer.Argument(help="New site's name.")],
    public_key: Annotated[Path, typer.Option(
        "--public-key", help="The site's public key (auth/node.pub from `medfed site keygen` at the site; "
        "OpenSSH or PEM). Never a private key.")],
    csr: Annotated[Path | None, typer.Option(
        "--csr", help="The site's TLS certificate request (auth/tls.csr from `medfed site keygen`); default: the "
        "tls.csr next to --public-key.")] = None,
    ca_passphrase_file: _CA_PASSPHRASE = None,
) -> None:
    """Enrol a site by its public key, sign its TLS certificate (needs the CA key), write its kit."""
    from coordinator.provision import ProvisionError, add_site, ca_passphrase

    try:
        passphrase = ca_passphrase(ca_passphrase_file)
    except ProvisionError as err:
        fail(str(err))
    entry, live = _change_sites(directory, site, lambda d, s: add_site(d, s, public_key, csr,
                                                                       ca_passphrase=passphrase))
    typer.echo(f"site {entry.name} added"
               + ("; registered at the running SuperLink" if live else "; registered at the next coordinator start"))
    _print_kits(directory.resolve(), [entry])


@consortium_app.command("revoke-site")
def consortium_revoke_site(directory: _DIR, site: Annotated[str, typer.Argument(help="Site to revoke.")],
                           ca_passphrase_file: _CA_PASSPHRASE = None) -> None:
    """Revoke a site: its certificate goes on the CRL (needs the CA key), its node key is unregistered."""
    from coordinator.provision import ProvisionError, ca_passphrase, revoke_site

    try:
        passphrase = ca_passphrase(ca_passphrase_file)
    except ProvisionError as err:
        fail(str(err))
    entry, live = _change_sites(directory, site, lambda d, s: revoke_site(d, s, passphrase))
    typer.echo(f"site {entry.name} revoked ({entry.revoked}): its certificate is on the CRL"
               + ("; refused by the running coordinator" if live else "; refused from the next coordinator start"))


@consortium_app.command("renew-tls")
def consortium_renew_tls(directory: _DIR, ca_passphrase_file: _CA_PASSPHRASE = None) -> None:
    """Issue the coordinator a new TLS certificate (hosts from consortium.toml); needs the CA key."""
    from coordinator.provision import ProvisionError, ca_passphrase, renew_tls

    try:
        cert = renew_tls(directory, ca_passphrase(ca_passphrase_file))
    except ProvisionError as err:
        fail(str(err))
        return
    typer.echo(f"new coordinator certificate in {directory.resolve() / 'coordinator' / 'tls'}, valid until "
               f"{cert.not_valid_after_utc:%Y-%m-%d}; restart the coordinator to use it")


@coordinator_app.command("start")
def coordinator_start(
    directory: _DIR,
    port: Annotated[int | None, typer.Option(help="Override the port in consortium.toml.")] = None,
    bind_host: Annotated[str | None, typer.Option("--bind-host", help="Override the listen address.")] = None,
) -> None:
    """Run the SuperLink in the foreground (TLS, node authentication, state on disk, no telemetry)."""
    from coordinator.provision import ProvisionError
    from coordinator.superlink import CoordinatorError, start_coordinator

    try:
        raise typer.Exit(start_coordinator(directory, port=port, bind_host=bind_host))
    except (ProvisionError, CoordinatorError) as err:
        fail(str(err))


@coordinator_app.command("nodes")
def coordinator_nodes(directory: _DIR) -> None:
    """List the SuperNodes the running SuperLink knows (registered, online, offline)."""
    from coordinator.provision import ProvisionError
    from coordinator.superlink import CoordinatorError, list_nodes

    try:
        nodes = list_nodes(directory)
    except (ProvisionError, CoordinatorError) as err:
        fail(str(err))
    for n in nodes:
        typer.echo(f"{n['name'] or '-':<24} {n['node_id']:>22} {n['status']}")


@site_app.command("keygen")
def site_keygen(
    kit: Annotated[Path, typer.Argument(help="This site's kit folder (may not exist yet).")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key (it must then be enrolled again).")]
    = False,
) -> None:
    """Make this site's SuperNode key pair here; only auth/node.pub goes to the consortium operator."""
    from site_client.kit import KitError, generate_site_key

    try:
        key = generate_site_key(kit, force=force)
    except KitError as err:
        fail(str(err))
        return
    typer.echo(f"{'replaced the' if key.replaced else 'made this'} site's SuperNode key pair:\n"
               f"  private key {key.private} (mode 600; never leaves this site)\n"
               f"  public key  {key.public}\n"
               f"  fingerprint {key.fingerprint}\n"
               f"  TLS request {key.csr} (its key auth/tls.key, mode 600, stays here)")
    typer.echo(f"next: send {key.public} and {key.csr} (only those files) to the consortium operator, who runs\n"
               f"  medfed consortium add-site DIR {key.site or 'NAME'} --public-key node.pub --csr tls.csr\n"
               "and reads you the fingerprint it prints; then copy the kit they send back into "
               f"{kit.resolve()} (cp -r KIT/. {kit.resolve()}/), keeping auth/node.key")
    if key.replaced:
        typer.echo("the old key is gone: the operator revokes this site's old enrolment and adds the new key")


@site_app.command("start")
def site_start(
    kit: Annotated[Path, typer.Argument(help="This site's kit folder (from the consortium operator).")],
    data: Annotated[Path | None, typer.Option(
        "--data", help="De-identified store (`medfed deid run` output), relative to the current folder.")] = None,
    superlink: Annotated[str | None, typer.Option(help="Override the coordinator address (host:port).")] = None,
    reconnect_seconds: Annotated[float | None, typer.Option(
        "--reconnect-seconds", help="Give up after the coordinator has been unreachable this long.")] = None,
    clientapp_port: Annotated[int | None, typer.Option(
        "--clientapp-port", help="Override the loopback port between the SuperNode and its ClientApps.")] = None,
) -> None:
    """Run this site's SuperNode: TLS to the coordinator, its authentication key, its node config.

    Exits 78 when restarting cannot help (a bad kit or data folder, the ClientApp port in use, the site's certificate revoked, a kit from another CA): the unit's RestartPreventExitStatus=78 keeps systemd from restarting it.
    """  # noqa: E501 - one paragraph per line: --help wraps it
    from site_client.kit import KitError, SiteFatal, load_kit, run_site, write_site_config
    from site_client.supernode import FATAL_EXIT

    try:
        k = load_kit(kit)
        if superlink:
            k.config.superlink = superlink
        if clientapp_port:
            k.config.clientapp_port = clientapp_port
        site, path = write_site_config(k, data)
    except KitError as err:
        fail(str(err), FATAL_EXIT)
    typer.echo(f"site {site.name}: data {site.data_dir}, state {site.state_dir}, privacy cap ε={site.epsilon_cap:g} "
               f"(δ={site.delta:g}); connecting to {k.config.superlink}")
    try:
        code = run_site(k, path, reconnect_seconds=reconnect_seconds)
    except SiteFatal as err:
        fail(str(err), FATAL_EXIT)
    raise typer.Exit(code)


@site_app.command("receive")
def site_receive(
    dst: Annotated[Path, typer.Argument(help="De-identified store to write (as `medfed deid run` DST).")],
    key: Annotated[Path, typer.Option("--key", help="Site secret (as `medfed deid run --key`).")],
    allow_ae: Annotated[list[str], typer.Option(
        "--allow-ae", help="Calling AE titles allowed to send (the PACS's); repeat or comma-separate.")],
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port to listen on.")] = 11112,
    ae_title: Annotated[str, typer.Option("--ae-title", help="This SCP's AE title (the PACS's destination).")]
    = "MEDFED",
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "0.0.0.0",
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="Server certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="Its private key (PEM).")] = None,
    tls_ca: Annotated[Path | None, typer.Option(
        "--tls-ca", help="CA whose client certificates are accepted (PEM); others are refused.")] = None,
    policy: Annotated[Path | None, typer.Option("--policy", help="Site de-identification policy (TOML).")] = None,
    labels: Annotated[Path | None, typer.Option(
        "--labels", help="Labels CSV keyed by AccessionNumber, StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID.")]
    = None,
    quarantine: Annotated[Path | None, typer.Option(help="Where refused files go (default: DST-quarantine).")] = None,
    spool: Annotated[Path | None, typer.Option(help="Private folder for raw files in flight (default: DST-spool).")]
    = None,
    audit: Annotated[Path | None, typer.Option(help="Audit trail folder (default: DST/audit).")] = None,
    audit_key: Annotated[Path | None, typer.Option("--audit-key", help="Key sealing the audit trail.")] = None,
    min_free: Annotated[str, typer.Option(
        "--min-free", help="Answer Out of Resources (0xA700) once less than this is free (e.g. 500M, 2G).")] = "1G",
    study_timeout: Annotated[float, typer.Option(
        "--study-timeout", help="Seconds without a new instance after which a study is recorded complete.")] = 60.0,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=1, help="De-identification worker processes (default: one per core).")] = None,
) -> None:
    """Receive images from PACS by DICOM C-STORE and de-identify them as they arrive (no original kept)."""
    from anonymization.errors import DeidError
    from anonymization.intake import TlsFiles, parse_size, run_receive, split_ae_titles

    tls_parts = (tls_cert, tls_key, tls_ca)
    if any(tls_parts) and not all(tls_parts):
        fail("TLS needs all three of --tls-cert, --tls-key and --tls-ca (or none of them)")
    try:
        counts = run_receive(dst, key, ae_title=ae_title, allowed=split_ae_titles(allow_ae), port=port, host=host,
                             tls=TlsFiles(tls_cert, tls_key, tls_ca) if tls_cert and tls_key and tls_ca else None,
                             policy=policy, labels=labels, quarantine=quarantine, spool=spool, audit=audit,
                             audit_key=audit_key, min_free_bytes=parse_size(min_free), study_timeout=study_timeout,
                             workers=workers)
    except DeidError as err:  # IntakeError, KeyFileError, LabelsError...: the message says what to do
        fail(str(err))
        return
    except OSError as err:
        fail(f"{err.filename or dst}: {err.strerror or err}; check that disk and its permissions, then start again")
        return
    typer.echo(counts.line())


@site_app.command("approve")
def site_approve(
    kit: Annotated[Path, typer.Argument(help="This site's kit folder.")],
    app: Annotated[Path, typer.Option("--app", help="The reviewed app: a .fab file or an app folder.")],
) -> None:
    """Approve an app bundle (FAB) for this site, by the SHA-256 of its bytes, after review."""
    from site_client.approval import ApprovalError, approve

    try:
        entry = approve(kit, app)
    except ApprovalError as err:
        fail(str(err))
        return
    typer.echo(f"approved sha256:{entry.sha256} ({entry.source}) for the site in {kit}")


@site_app.command("approvals")
def site_approvals(kit: Annotated[Path, typer.Argument(help="This site's kit folder.")]) -> None:
    """List the app bundles (FAB SHA-256) this site runs; anything else is refused before it is imported."""
    from medfed.fab import FabError
    from site_client.approval import ApprovalError, approvals

    try:
        items = approvals(kit)
    except (ApprovalError, FabError) as err:
        fail(str(err))
        return
    if not items:
        typer.echo("no app is approved: this site refuses every run (approve one with `medfed site approve`)")
    for a in items:
        when = "installed release" if a.release else f"approved {a.approved_at} by {a.approved_by}"
        typer.echo(f"sha256:{a.sha256}  {when}  {a.source}")


def run_command(
    directory: _DIR,
    rounds: Annotated[int | None, typer.Option("--rounds", min=1, help="Federated rounds (num-server-rounds).")] = None,
    run_config: Annotated[list[str] | None, typer.Option(
        "--run-config", help="Run settings, 'key=value key2=value2' (TOML values; the keys and defaults are in "
        "pyproject.toml, \\[tool.flwr.app.config]).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the last run from its last checkpoint.")] = False,
    run_name: Annotated[str | None, typer.Option("--run-name", help="Name of the run (default: run-DATE; "
                                                    "with --resume: the last run).")] = None,
    timeout: Annotated[float | None, typer.Option(help="Give up waiting after this many seconds.")] = None,
    wait_for_sites: Annotated[float, typer.Option(
        "--wait-for-sites", min=0, help="Seconds to wait for the consortium's sites to connect before the run is "
        "submitted; then it goes on if min-available-nodes are online, else it stops naming the missing sites.")]
    = WAIT_FOR_SITES,
    app: Annotated[Path | None, typer.Option(
        "--app", help="Submit this Flower app folder instead of the installed release (sites must approve it).")]
    = None,
    study: Annotated[Path | None, typer.Option(
        "--study", help="The study to train (`medfed study init`); each site serves it only once its privacy "
        "officer approved its SHA-256. Default: the binary soft-tissue CT study.")] = None,
) -> None:
    """Start a run on the deployment (`flwr run` over TLS), show its progress, print its summary.

    Flower's own output goes to the run's flower.log. Exits 0 when the run completed, 2 when it could not start or failed (the cause is printed).
    """  # noqa: E501 - one paragraph per line: --help wraps it
    from coordinator.launch import plan_run, run
    from coordinator.provision import ProvisionError
    from coordinator.superlink import CoordinatorError
    from medfed.settings import ConfigError

    try:
        plan = plan_run(directory, rounds=rounds, run_config=run_config, resume=resume, run_name=run_name, app=app,
                        study=study)
        if plan.resume_from:
            typer.echo(f"resuming run {plan.run_name} after round {plan.resume_from}")
        metrics = run(directory, plan, app=app, timeout=timeout, echo=typer.echo, wait_for=wait_for_sites)
    except (ConfigError, ProvisionError, CoordinatorError) as err:
        fail(str(err))
        return
    _summary(directory, plan.run_name, plan.out_dir, metrics)


def _summary(directory: Path, name: str, out: Path, metrics: dict) -> None:
    from rich.table import Table

    from coordinator.federation import CHECKPOINTS, METRICS_FILE, MODEL_FILE, PLOT_FILE
    from coordinator.launch import FLOWER_LOG, site_names
    from coordinator.receipts import AGGREGATION_FILE, RECEIVED_FILE

    names = site_names(directory)
    console.print(round_table(metrics["rounds"], f"run {name}: global model per round"))
    spent: dict[str, tuple[float | None, float | None, int]] = {}
    for r in metrics["rounds"]:
        for node, v in r["sites"].items():
            eps, cap, n = spent.get(node, (None, None, 0))
            spent[node] = (v.get("epsilon") if v.get("epsilon") is not None else eps,
                           v.get("epsilon_cap") if v.get("epsilon_cap") is not None else cap,
                           n + (v["status"] == "trained"))
    sites = Table(title="privacy spent per site (record-level DP, as each site reported it)")
    for col in ("site", "ε spent", "ε cap", "rounds trained"):
        sites.add_column(col, justify="right" if col != "site" else "left")
    for node, (eps, cap, n) in sorted(spent.items(), key=lambda kv: names.get(kv[0], kv[0])):
        sites.add_row(names.get(node, f"node {node}"), "n/a" if eps is None else f"{eps:.2f}",
                      "n/a" if cap is None else f"{cap:g}", str(n))
    console.print(sites)
    if (dp := metrics.get("site_dp")) is not None:
        eps = dp.get("epsilon")
        console.print(f"site-level DP ({dp['mode']}, {dp['sampling']} sampling, {dp['neighbouring']}): "
                      f"ε = {'∞' if eps is None else f'{eps:.2f}'} at δ = {dp['delta']:g} after "
                      f"{dp['rounds_released']} rounds")
    console.print(f"model:       {out / MODEL_FILE}\nmetrics:     {out / METRICS_FILE}\n"
                  f"plot:        {out / PLOT_FILE}\n"
                  f"receipts:    {out / RECEIVED_FILE}, {out / AGGREGATION_FILE}, {out / 'anchors.jsonl'}\n"
                  f"checkpoints: {out / CHECKPOINTS}\nFlower log:  {out / FLOWER_LOG}", soft_wrap=True)


def register_deploy_commands(app: typer.Typer) -> None:
    """Add `consortium`, `coordinator`, `site` and `run` to the `medfed` command."""
    app.add_typer(consortium_app, name="consortium")
    app.add_typer(coordinator_app, name="coordinator")
    app.add_typer(site_app, name="site")
    app.command("run")(run_command)
