"""The operator and site IT as new users: relative paths, clear refusals, bounded waits, a run that says who is missing.

The coordinator here is real (`medfed coordinator start`: Flower's SuperLink and nginx on loopback, no site
connected), started once for the module; every command runs as a user types it, from the folder that holds
the consortium, with relative paths.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import typer.main
from typer.testing import CliRunner

from coordinator.provision import init_consortium, revoke_site
from medfed import hardening
from medfed.cli import app
from site_client.kit import KitError, SiteFatal, check_clientapp_port, generate_site_key, load_kit
from site_client.supernode import FATAL_EXIT, FATAL_FILE_ENV, refusal_reason

MEDFED = str(Path(sys.executable).parent / "medfed")
ROOT = Path(__file__).resolve().parents[2]
SITES = ("hospital-a", "hospital-b")
runner = CliRunner()


def _walk(cmd: click.Command, path: str = "medfed") -> Iterator[tuple[str, click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _walk(sub, f"{path} {name}")


# ---- the command line itself ----------------------------------------------------------------------


def test_every_parameter_of_every_command_has_help() -> None:
    missing = [f"{path}: {p.name}" for path, cmd in _walk(typer.main.get_command(app)) for p in cmd.params
               if p.name != "help" and not (getattr(p, "help", None) or "").strip()]
    assert not missing, missing


def test_every_command_takes_paths_relative_to_the_current_folder() -> None:
    from medfed.cli import every_command

    assert all(getattr(c.callback, "paths_from_cwd", False) for c in every_command(app))


def test_version_and_help_render_in_80_columns() -> None:
    from medfed import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"medfed {__version__}"
    res = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert "[tool.flwr.app.config]" in text and "(see )" not in text  # rich markup ate the brackets before
    assert "Consortium folder" in text  # an argument's help is shown
    assert max(len(line) for line in res.output.splitlines()) <= 80


def test_deid_reports_labels_that_match_nothing(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    assert runner.invoke(app, ["synth", str(raw), "--sites", "2", "--patients", "4"]).exit_code == 0
    bad = tmp_path / "labels.csv"
    bad.write_text("AccessionNumber,label\nNOT-AN-ACCESSION,1\n")
    res = runner.invoke(app, ["deid", "run", str(raw / "hospital-a" / "dicom"), str(tmp_path / "deid"), "--key",
                              str(tmp_path / "k"), "--labels", str(bad), "--no-progress"])
    out = " ".join(res.output.split())
    assert res.exit_code == 1 and "labels: 0 of" in out and "no image matched a row of" in out
    res = runner.invoke(app, ["deid", "run", str(raw / "hospital-a" / "dicom"), str(tmp_path / "good"), "--key",
                              str(tmp_path / "k"), "--labels", str(raw / "hospital-a" / "labels.csv"),
                              "--no-progress"])
    out = " ".join(res.output.split())
    assert res.exit_code == 0 and "(0 unlabelled)" in out


# ---- site IT: refusals that no restart cures -------------------------------------------------------


def test_the_site_unit_does_not_restart_a_fatal_exit() -> None:
    unit = (ROOT / "deploy" / "systemd" / "medfed-site.service").read_text()
    prevent = [ln for ln in unit.splitlines() if ln.startswith("RestartPreventExitStatus=")]
    assert prevent and str(FATAL_EXIT) in prevent[0].split("=", 1)[1].split()


def test_a_refusal_no_retry_cures_is_named_and_ends_the_supernode_with_the_fatal_code(tmp_path: Path) -> None:
    import httpx

    req = httpx.Request("POST", "https://coord:9093/v1/fleet/activate-node")
    revoked = httpx.HTTPStatusError("401", request=req, response=httpx.Response(401, request=req))
    assert "refused this site (HTTP 401)" in (refusal_reason(revoked, "coord:9093", "ca.pem") or "")
    other_ca = httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    assert "does not verify" in (refusal_reason(other_ca, "coord:9093", "KIT/ca.pem") or "")
    for passing in (httpx.HTTPStatusError("503", request=req, response=httpx.Response(503, request=req)),
                    httpx.ConnectError("[Errno 111] Connection refused")):
        assert refusal_reason(passing, "coord:9093", "ca.pem") is None  # a coordinator restarting: retry
    reason = tmp_path / "fatal.txt"
    res = subprocess.run([sys.executable, "-c", "from site_client.supernode import fatal; fatal('the cause')"],
                         env={**hardening.child_env(), FATAL_FILE_ENV: str(reason), "PYTHONPATH": str(ROOT)},
                         timeout=60)
    assert res.returncode == FATAL_EXIT and reason.read_text().strip() == "the cause"


def test_each_kit_gets_its_own_clientapp_port_and_a_taken_one_is_refused(tmp_path: Path) -> None:
    cons, kits = _consortium(tmp_path, ("a", "b", "c"))
    ports = [load_kit(kits[s]).config.clientapp_port for s in ("a", "b", "c")]
    assert len(set(ports)) == 3 and 9093 not in ports
    kit = load_kit(kits["a"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()  # a live SuperNode's ClientApp port
        kit.config.clientapp_port = busy.getsockname()[1]
        with pytest.raises(SiteFatal, match="is in use"):
            check_clientapp_port(kit, grace=1.0)
    check_clientapp_port(kit, grace=0.0)  # let go: free again at once (SO_REUSEADDR, as the SuperNode binds)


def test_site_start_refuses_a_store_with_no_label_once_with_the_fatal_code(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cons, kits = _consortium(tmp_path, ("a",))
    (tmp_path / "deid").mkdir()
    (tmp_path / "deid" / "manifest.csv").write_text("patient,label\np1,\np2,\n")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["site", "start", "sites/a", "--data", "deid"])  # --data: from here, not the kit
    out = " ".join(res.output.split())
    assert res.exit_code == FATAL_EXIT and "none has a label" in out and str(tmp_path / "deid") in out
    with pytest.raises(KitError):
        from site_client.kit import write_site_config

        write_site_config(load_kit(kits["a"]), tmp_path / "deid")


# ---- the coordinator ---------------------------------------------------------------------------------


def _consortium(root: Path, sites: tuple[str, ...], port: int = 9093) -> tuple[Path, dict[str, Path]]:
    kits = {s: root / "sites" / s for s in sites}
    for s in sites:
        generate_site_key(kits[s])
    cons = root / "consortium"
    init_consortium(cons, "optest", ["localhost"], [(s, kits[s] / "auth" / "node.pub") for s in sites], port=port,
                    bind_host="127.0.0.1")
    for s in sites:
        shutil.copytree(cons / "kits" / s, kits[s], dirs_exist_ok=True)
    return cons, kits


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _medfed(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MEDFED, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**hardening.child_env(), "PYTHONPATH": str(ROOT), "COLUMNS": "200"})


def _fleet_status(port: int, ca: Path, cert: Path, key: Path) -> int | str:
    """HTTP status of a Fleet API request with this client certificate, or the TLS error's name."""  # noqa: D401
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
    try:
        conn.request("POST", "/v1/fleet/get-run", body=b"")  # no protobuf: the SuperLink, if reached, answers 415
        return conn.getresponse().status
    except (ssl.SSLError, ConnectionError) as err:
        return type(err).__name__
    finally:
        conn.close()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, dict[str, Path], int]]:
    root = tmp_path_factory.mktemp("operator")
    port = _free_port()
    cons, kits = _consortium(root, SITES, port)
    log = open(root / "coordinator.log", "wb")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen([MEDFED, "coordinator", "start", "consortium"], cwd=root, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**hardening.child_env(), "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 90
    while b"medfed coordinator ready" not in (root / "coordinator.log").read_bytes():
        assert proc.poll() is None and time.monotonic() < deadline, (root / "coordinator.log").read_text()
        time.sleep(0.3)
    yield root, cons, kits, port
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    log.close()


@pytest.mark.deployment
def test_run_with_no_site_connected_says_who_is_missing_and_stops(running: tuple[Path, Path, dict, int]) -> None:
    root, cons, _, _ = running
    t0 = time.monotonic()
    res = _medfed(root, "run", "consortium", "--rounds", "1", "--wait-for-sites", "3")
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "waiting for sites: 0 of 2 connected (hospital-a, hospital-b missing)" in out
    assert "missing: hospital-a, hospital-b" in out and "Traceback" not in out
    assert time.monotonic() - t0 < 60
    assert len(out.strip().splitlines()) <= 4  # ours only: no Flower output on the terminal


@pytest.mark.deployment
def test_nodes_and_revoke_take_relative_paths_and_the_revocation_reaches_the_running_coordinator(
        running: tuple[Path, Path, dict, int]) -> None:
    root, cons, kits, port = running
    res = _medfed(root, "coordinator", "nodes", "consortium")
    assert res.returncode == 0 and "hospital-b" in res.stdout and "Using SuperLink" not in res.stdout, res.stderr
    ca, b = cons / "coordinator" / "tls" / "ca.pem", kits["hospital-b"] / "auth"
    before = _fleet_status(port, ca, b / "tls.pem", b / "tls.key")
    assert before == 415, before  # hospital-b's certificate reaches the Fleet API (the SuperLink answers) ...
    res = _medfed(root, "consortium", "revoke-site", "consortium", "hospital-b")
    assert res.returncode == 0 and "refused by the running coordinator" in res.stdout, res.stdout + res.stderr
    assert _fleet_status(port, ca, b / "tls.pem", b / "tls.key") in (401, "SSLError")  # ... and not after (CRL)
    nodes = _medfed(root, "coordinator", "nodes", "consortium").stdout
    assert any(ln.startswith("hospital-b") and ln.endswith("unregistered") for ln in nodes.splitlines()), nodes


@pytest.mark.deployment
def test_a_revocation_the_coordinator_was_not_told_of_applies_before_the_next_run(
        tmp_path: Path, running: tuple[Path, Path, dict, int]) -> None:
    root, cons, kits, _ = running
    site = "hospital-a"
    revoke_site(cons, site)  # consortium.toml changed behind the coordinator's back (it was not told)
    res = _medfed(root, "run", "consortium", "--rounds", "1", "--wait-for-sites", "1")
    assert res.returncode == 2
    nodes = _medfed(root, "coordinator", "nodes", "consortium").stdout
    assert any(ln.startswith(site) and ln.endswith("unregistered") for ln in nodes.splitlines()), nodes


def test_commands_against_a_coordinator_that_is_not_there_fail_clearly(tmp_path: Path) -> None:
    cons, _ = _consortium(tmp_path, ("a",))
    state = cons / "coordinator" / "state"
    state.mkdir(parents=True, exist_ok=True)
    (state / "superlink.port").write_text(str(_free_port()))  # left behind by a coordinator that was killed
    res = _medfed(tmp_path, "coordinator", "nodes", "consortium")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "does not answer on its Control API" in res.stderr and str(cons) in res.stderr


def test_coordinator_start_ends_at_once_when_its_superlink_dies_or_sigterm_arrives(tmp_path: Path) -> None:
    """A SuperLink that dies while starting ends `coordinator start` with its cause; SIGTERM is obeyed at once."""
    cons, _ = _consortium(tmp_path, ("a",), _free_port())
    script = ("import sys; from pathlib import Path; import coordinator.superlink as s; "
              "s.superlink_command = lambda *a, **k: [sys.executable, '-c', sys.argv[1]]; "
              "sys.exit(s.start_coordinator(Path('consortium')))")
    dies = "import sys; print('ERROR: [Errno 98] Address already in use', flush=True); sys.exit(1)"
    env = {**hardening.child_env(), "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", script, dies], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env=env)
    assert res.returncode != 0 and time.monotonic() - t0 < 20
    assert "exited with code 1 while starting" in res.stderr and "Address already in use" in res.stderr
    hangs = "import time; time.sleep(300)"  # never answers TLS
    proc = subprocess.Popen([sys.executable, "-c", script, hangs], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pid_file = cons / "coordinator" / "state" / "superlink.pid"
    deadline = time.monotonic() + 30
    while not pid_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - t0 < 15


def test_resume_skips_a_submission_that_failed_before_its_first_round(tmp_path: Path) -> None:
    import torch

    from coordinator.checkpoint import save_checkpoint
    from coordinator.history import RunHistory
    from coordinator.launch import LATEST, resumable_run

    runs = tmp_path / "runs"
    save_checkpoint(runs / "run-good" / "checkpoints", 2, {"w": torch.zeros(1)}, RunHistory(), {})
    (runs / "run-failed").mkdir(parents=True)  # submitted, refused before round 1: no checkpoint
    (runs / LATEST).write_text("run-failed\n")
    assert resumable_run(runs) == "run-good"
    (runs / LATEST).write_text("run-good\n")
    assert resumable_run(runs) == "run-good"
    assert resumable_run(tmp_path / "none") is None
