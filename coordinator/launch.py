"""`medfed run DIR`: start a run on the deployment with Flower's own `flwr run`.

The app is this project (its pyproject.toml holds the Flower app); `flwr run`
talks to the SuperLink's Control API over TLS using the connection
`medfed coordinator start` wrote (FLWR_HOME in the coordinator folder), with
runtime dependency installation off. The run's outputs (checkpoints,
metrics.json, model.pt, receipts) go to ``coordinator/runs/RUN_NAME``; the
run name is also what every site keys its privacy ledger on, so ``--resume``
continues the same account from the last checkpoint in a new Flower run.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.checkpoint import latest_checkpoint, load_checkpoint
from coordinator.provision import Layout, load_consortium, release_key_path
from coordinator.superlink import CONNECTION, CoordinatorError, CoordinatorPaths, coordinator_env, flower_bin
from medfed.fab import installed_app_dir
from medfed.settings import ConfigError, RunConfig

log = logging.getLogger(__name__)

LATEST = "LATEST"
#: Keys `medfed run` sets itself; the operator names them with options, not --run-config.
MANAGED_KEYS = ("out-dir", "run-name", "resume", "demo-dir", "study", "study-dir", "release-key")


def app_dir() -> Path:
    """The Flower app to submit: the installed release's folder (pyproject.toml's [tool.flwr.app])."""
    root = installed_app_dir()
    if root is None:
        raise CoordinatorError(f"{Path(__file__).resolve().parent.parent} holds no pyproject.toml: run medfed from "
                               "its source folder (an editable install, or the container image), or pass --app DIR")
    return root


def _app_defaults(app: Path) -> dict[str, Any]:
    try:
        return dict(tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    except (KeyError, tomllib.TOMLDecodeError) as err:
        raise CoordinatorError(f"{app / 'pyproject.toml'} has no valid [tool.flwr.app.config] ({err})") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--run-config` strings ('k=v k2=v2', TOML values) as a dict, as `flwr run` parses them."""
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args([i for i in items if i]))
    except Exception as err:  # noqa: BLE001 - click/TOML errors: say what was wrong
        raise ConfigError(f"--run-config {' '.join(items)!r} is not 'key=value key2=value2' with TOML values "
                          f"(strings in quotes): {err}") from None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v)
    if "'" in s:
        raise ConfigError(f"value {s!r} contains a single quote, which a --run-config string cannot carry")
    return f"'{s}'"


def resumable_run(runs: Path) -> str | None:
    """The run ``--resume`` continues: the last one started (LATEST) if it checkpointed a round, else the most
    recently checkpointed one — a submission that failed before its first round leaves nothing to resume."""
    latest = runs / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        if name and latest_checkpoint(runs / name / "checkpoints") is not None:
            return name
    best: tuple[float, str] | None = None
    for d in runs.iterdir() if runs.is_dir() else ():
        if d.is_dir() and (ckpt := latest_checkpoint(d / "checkpoints")) is not None:
            mtime = ckpt.stat().st_mtime
            if best is None or mtime > best[0]:
                best = (mtime, d.name)
    return best[1] if best else None


@dataclass
class RunPlan:
    """A validated run, ready for `flwr run`."""

    run_name: str
    out_dir: Path
    config: RunConfig
    overrides: dict[str, Any]
    resume_from: int  # checkpointed round the run continues from (0: fresh)

    def run_config_arg(self) -> str:
        return " ".join(f"{k}={_toml_value(v)}" for k, v in self.overrides.items())


def plan_run(directory: Path, *, rounds: int | None = None, run_config: list[str] | None = None,
             resume: bool = False, run_name: str | None = None, app: Path | None = None,
             study: Path | None = None) -> RunPlan:
    """Validate what the operator asked for (before anything is submitted)."""
    directory = directory.resolve()
    load_consortium(directory)
    paths = CoordinatorPaths(Layout(directory))
    app = (app or app_dir()).resolve()
    overrides = parse_overrides(run_config or [])
    for key in MANAGED_KEYS:
        if key in overrides:
            raise ConfigError(f"--run-config sets {key!r}, which medfed run manages; use --run-name / --resume "
                              "(outputs always go to the coordinator folder)")
    if resume and run_name is None:
        run_name = resumable_run(paths.runs)
        if run_name is None:
            raise ConfigError(f"--resume: no earlier run in {paths.runs} has a checkpoint; start one with "
                              f"`medfed run {directory}`")
    if run_name is None:
        run_name = "run-" + dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", run_name):
        raise ConfigError(f"--run-name {run_name!r}: use letters, digits, '.', '_' or '-'")
    out_dir = paths.runs / run_name
    resume_from = 0
    if resume:
        last = latest_checkpoint(out_dir / "checkpoints")
        if last is None:
            raise ConfigError(f"--resume: run {run_name} has no checkpoint in {out_dir / 'checkpoints'}; "
                              "nothing to resume — start it again without --resume")
        ckpt = load_checkpoint(last)
        resume_from = ckpt.round
        # The run goes on with the settings it was started with; --run-config / --rounds change them.
        previous = {k: v for k, v in ckpt.run_config.items() if k not in MANAGED_KEYS}
        overrides = {**previous, **overrides}
        if study is None:  # the run goes on with its study
            overrides.update({k: ckpt.run_config[k] for k in ("study", "study-dir") if ckpt.run_config.get(k)})
    if rounds is not None:
        overrides["num-server-rounds"] = rounds
    overrides.update({"out-dir": str(out_dir), "run-name": run_name, "resume": bool(resume)})
    if study is not None:
        from models.study import load_study

        overrides.update({"study": load_study(study).canonical_json(), "study-dir": str(study.resolve().parent)})
    overrides["release-key"] = str(release_key_path(Layout(directory)))
    cfg = RunConfig.from_flower({**_app_defaults(app), **overrides})
    if resume and resume_from >= cfg.num_server_rounds:
        raise ConfigError(f"--resume: run {run_name} already has {resume_from} of {cfg.num_server_rounds} rounds; "
                          "pass --rounds R with a larger R to train further")
    return RunPlan(run_name, out_dir, cfg, overrides, resume_from)


#: Files that must never ship inside the app (they belong to a consortium, a site, or its audit trail).
_NEVER_SHIP = ("consortium.toml", "kit.toml", "site.toml")
#: The one source folder named audit (the trail's code): its modules ship; any other file in an audit/ is a trail's.
_AUDIT_PACKAGE = "anonymization/audit/"


def _trail_file(name: str) -> bool:
    """A file of an audit trail folder (records, its key, its lock or meta), not one of the audit package's modules."""
    if name.startswith(_AUDIT_PACKAGE) and name.endswith(".py") and "/" not in name.removeprefix(_AUDIT_PACKAGE):
        return False
    return "/audit/" in f"/{name}"


def check_app_contents(app: Path) -> None:
    """Refuse to submit an app whose FAB would carry a consortium, kit, site config or audit records.

    The FAB goes to the SuperLink and every site; a consortium or demo folder provisioned inside the
    checkout (deploy/README.md's compose walk-through does) must not travel with it. Built with
    Flower's own FAB builder, so this sees exactly what `flwr run` would ship.
    """
    import io
    import zipfile

    from medfed.fab import FabError, build_fab

    try:
        names = zipfile.ZipFile(io.BytesIO(build_fab(app))).namelist()
    except FabError as err:
        raise CoordinatorError(str(err)) from None
    bad = [n for n in names if Path(n).name in _NEVER_SHIP or n.endswith(".jsonl") or _trail_file(n)]
    if bad:
        raise CoordinatorError(
            f"the app folder {app} would ship {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} to the SuperLink "
            "and every site: a consortium, kit or site folder lies inside the checkout — move it out of "
            f"{app} (or run from the coordinator image) and start the run again")


def flwr_run_command(plan: RunPlan, app: Path | None = None) -> list[str]:
    return [flower_bin("flwr"), "run", str((app or app_dir()).resolve()), CONNECTION, "--stream",
            "--run-config", plan.run_config_arg()]


#: Flower's own output of a run (`flwr run --stream`), in the run's folder; the terminal shows only our progress.
FLOWER_LOG = "flower.log"
#: The run's own progress lines in `flwr run --stream`'s output (coordinator.server_app's log format).
_PROGRESS = re.compile(r"^\d\d:\d\d:\d\d medfed: (?P<msg>.*)$")
#: The last line of a Python traceback: the error an operator needs first.
_ERROR_LINE = re.compile(
    r"^(?:[A-Za-z_][\w.]*\.)?(?P<type>[A-Z]\w*(?:Error|Exception|Unavailable|Refused)): (?P<msg>.+)$")


def apply_consortium(directory: Path) -> None:
    """Bring the running coordinator in line with consortium.toml before a run: the CRL re-read by nginx, revoked
    sites unregistered, new ones registered — a change the coordinator was not told of still takes effect."""
    from coordinator import superlink

    quiet = logging.getLogger(superlink.__name__)
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # a run's terminal shows the run; what changed is still logged as a warning
    try:
        superlink.reload_proxy(directory)
        superlink.sync_registrations(directory)
    finally:
        quiet.setLevel(level)


def wait_for_sites(directory: Path, minimum: int, timeout: float, echo: Callable[[str], None],
                   poll: float = 1.0) -> list[str]:
    """Wait (at most ``timeout``) until every active site of the consortium is online; the names online.

    Says who is missing whenever that changes. After ``timeout``, goes on without the missing sites if at least
    ``minimum`` (min-available-nodes) are online, else fails naming them: a run is never submitted to wait, silent,
    for sites that are not there.
    """
    from coordinator.superlink import list_nodes

    expected = [s.name for s in load_consortium(directory).active_sites]
    if not expected:
        raise CoordinatorError(f"{directory / 'consortium.toml'} has no active site: enrol one with "
                               f"`medfed consortium add-site {directory} NAME --public-key node.pub`")
    deadline = time.monotonic() + timeout
    said = ""
    while True:
        online = {n["name"] for n in list_nodes(directory) if n["status"] == "online"}
        here = [n for n in expected if n in online]
        missing = [n for n in expected if n not in online]
        if not missing:
            return here
        line = f"waiting for sites: {len(here)} of {len(expected)} connected ({', '.join(missing)} missing)"
        if line != said:
            echo(line)
            said = line
        if time.monotonic() >= deadline:
            if len(here) >= minimum:
                echo(f"going on without {', '.join(missing)} after {timeout:g}s ({len(here)} sites, the run needs "
                     f"{minimum})")
                return here
            raise CoordinatorError(
                f"only {len(here)} of {len(expected)} sites connected within {timeout:g}s and the run needs {minimum} "
                f"(min-available-nodes); missing: {', '.join(missing)}. Start them (`medfed site start KIT --data "
                f"DEID_DIR` at each site; `medfed coordinator nodes {directory}` shows who is online), or wait longer "
                "with --wait-for-sites SECONDS")
        time.sleep(poll)


def site_names(directory: Path) -> dict[str, str]:
    """SuperNode id -> site name, from the registrations `medfed coordinator start` wrote (ids are Flower's)."""
    try:
        regs = json.loads(CoordinatorPaths(Layout(directory)).registrations.read_text())
    except (OSError, ValueError):
        return {}
    return {str(v["node_id"]): name for name, v in regs.items() if v.get("node_id") is not None}


def _cause(log_file: Path) -> str:
    """The error behind a failed `flwr run`, from its log: the last exception line, else the last ERROR line."""
    try:
        lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if m := _ERROR_LINE.match(ln):
            return m.group("msg")
    for ln in reversed(lines):
        if "ERROR" in ln and "Exit Code" not in ln:
            return ln
    return ""


def run(directory: Path, plan: RunPlan, *, app: Path | None = None, timeout: float | None = None,
        echo: Callable[[str], None] | None = None, wait_for: float) -> dict[str, Any]:
    """Submit the run, show its progress (Flower's own output goes to the run's flower.log), return metrics.json.

    Before anything is submitted: the running coordinator is brought in line with consortium.toml and the
    run waits (at most ``wait_for`` seconds) for the sites. Bounded by ``timeout`` in all.
    """
    say = echo or (lambda s: print(s, flush=True))
    directory = directory.resolve()
    paths = CoordinatorPaths(Layout(directory))
    if not (paths.flwr_home / "config.toml").is_file():
        raise CoordinatorError(f"{paths.flwr_home / 'config.toml'} is missing: start the coordinator first "
                               f"(`medfed coordinator start {directory}`)")
    check_app_contents((app or app_dir()).resolve())
    apply_consortium(directory)
    wait_for_sites(directory, plan.config.min_available_nodes, wait_for, say)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    (paths.runs / LATEST).write_text(plan.run_name + "\n")
    if timeout is None:
        timeout = 600.0 + 3 * plan.config.round_timeout * plan.config.num_server_rounds
    cmd = flwr_run_command(plan, app)
    flower_log = plan.out_dir / FLOWER_LOG
    names = {k: f"site {v}" for k, v in site_names(directory).items()}
    say(f"run {plan.run_name}: {plan.config.num_server_rounds} round(s); Flower's log: {flower_log}")
    log.debug("submitting run %s: %s", plan.run_name, " ".join(cmd[1:]))
    deadline = time.monotonic() + timeout
    proc = subprocess.Popen(cmd, env=coordinator_env(directory), cwd=str((app or app_dir()).resolve()),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        with open(flower_log, "a", encoding="utf-8") as out:
            while True:
                if time.monotonic() > deadline:
                    proc.terminate()
                    raise CoordinatorError(f"run {plan.run_name} did not finish within {timeout:.0f}s; it was left "
                                           "running on the SuperLink — stop it with `flwr stop` or restart the "
                                           "coordinator, then `medfed run --resume`")
                if not sel.select(timeout=1.0):
                    if proc.poll() is not None:
                        break
                    continue
                line = proc.stdout.readline()
                if not line:
                    if proc.poll() is not None:
                        break
                    continue
                out.write(line)
                out.flush()
                if m := _PROGRESS.match(_ANSI.sub("", line).strip()):
                    say("  " + _NODE.sub(lambda n: names.get(n.group(1), n.group(0)), m.group("msg")))
        rc = proc.wait(timeout=30)
    finally:
        sel.close()
        if proc.poll() is None:
            proc.kill()
    metrics_path = plan.out_dir / "metrics.json"
    if rc != 0 or not metrics_path.is_file():
        cause = _cause(flower_log)
        raise CoordinatorError(f"run {plan.run_name} failed (`flwr run` exit code {rc})"
                               + (f": {cause}" if cause else "") + f"; Flower's log: {flower_log}, the SuperLink's: "
                               f"{paths.log_file}")
    metrics = json.loads(metrics_path.read_text())
    if "final_model" not in metrics:
        raise CoordinatorError(f"run {plan.run_name} stopped before its last round ({metrics_path} has no final "
                               "model); continue it with `medfed run --resume`")
    return metrics


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NODE = re.compile(r"\bsite node (\d+)")


def main_exit(code: int) -> None:  # pragma: no cover - CLI helper
    sys.exit(code)
