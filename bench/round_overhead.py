"""What a federated round costs beyond the sites' own training: time and bytes.

For 3 real SuperNodes on loopback (the Deployment Engine, TLS and SuperNode
authentication, exactly as `medfed coordinator start` / `medfed site start` /
`medfed run` run them) and for 10, 50 and 100 simulated sites (Flower's
Simulation Engine, `run_simulation`), it measures per round:

- the round's wall time at the coordinator (metrics.json ``seconds``: from the
  end of the previous round to the checkpoint of this one; evaluation off);
- the local training time at every site (the site's own clock around
  ``train_round``, kept in STATE/timings.jsonl);
- the coordinator overhead: round time minus the critical path of local
  training — the slowest site when every site trains in parallel (deployment),
  max(slowest site, total training / workers) when the simulation runs its
  sites on a few Ray workers;
- bytes each site sends per round: the reply as Flower serializes it (every
  nested object, deflated: coordinator/receipts.py ``wire_bytes``) over the
  model's size (float32 arrays), and for the deployment also the TLS bytes on
  each site's connections (from `ss`), polling, heartbeats and the app
  download included.

Goals (issue 6): overhead < 1 s per round at 10 sites, bytes per round within
1.1x the model size, 100 simulated sites on this machine.

    .venv/bin/python bench/round_overhead.py            # everything (about 10-20 minutes on 2 cores)
    .venv/bin/python bench/round_overhead.py --no-deploy --sim-sites 10
    .venv/bin/python bench/round_overhead.py --no-sim --rounds 4   # the deployment only; last line its overhead
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from medfed import hardening  # noqa: E402

MEDFED = str(Path(sys.executable).parent / "medfed")
SMALL = {"image_size": 32, "batch_size": 8}


@dataclass
class Row:
    setting: str
    sites: int
    workers: int
    rounds: list[float]
    train: list[list[float]]            # per round, each site's local training seconds
    sent: list[int]                     # serialized bytes of each train reply
    model_bytes: int
    tls_per_site_round: float | None = None
    peak_rss_mb: float | None = None
    notes: list[str] = field(default_factory=list)

    def steady(self) -> list[int]:
        """Rounds after the first (the first also pays the app install and the first imports)."""
        return list(range(1, len(self.rounds))) or [0]

    def overhead(self, i: int) -> float:
        tr = self.train[i]
        critical = max(max(tr), sum(tr) / self.workers) if tr else 0.0
        return self.rounds[i] - critical


def model_bytes() -> int:
    from coordinator.federation import initial_state
    from medfed.settings import RunConfig

    state = initial_state(RunConfig().with_overrides(**SMALL))
    return sum(v.numel() * v.element_size() for v in state.values())


def _timings(state_dirs: list[Path], run: str, rounds: int) -> list[list[float]]:
    per_round: list[list[float]] = [[] for _ in range(rounds)]
    for d in state_dirs:
        f = d / "timings.jsonl"
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if rec["run"] == run and 1 <= rec["round"] <= rounds:
                per_round[rec["round"] - 1].append(float(rec["seconds"]))
    return per_round


def _results(out: Path, run: str, state_dirs: list[Path]) -> tuple[list[float], list[list[float]], list[int]]:
    from coordinator.receipts import read_jsonl

    metrics = json.loads((out / "metrics.json").read_text())
    rounds = [float(r["seconds"]) for r in metrics["rounds"]]
    sent = [
        int(r["wire_bytes"]) for r in read_jsonl(out / "received.jsonl") if r["phase"] == "train" and "error" not in r
    ]
    return rounds, _timings(state_dirs, run, len(rounds)), sent


# ---- simulated sites ---------------------------------------------------------------------------


def simulated(n: int, base_sites: list[Any], work: Path, rounds: int) -> Row:
    """``n`` simulated sites (the base sites' data, each with its own state, ledger and audit trail)."""
    from medfed.demo import simulate
    from medfed.settings import RunConfig, SiteConfig

    demo = work / f"sim-{n}"
    state_dirs = []
    for i in range(n):
        base = base_sites[i % len(base_sites)]
        d = demo / "sites" / f"site-{i:04d}"
        d.mkdir(parents=True, exist_ok=True)
        cfg = SiteConfig(name=f"site-{i:04d}", data_dir=base.data_dir, state_dir=d / "state", audit_dir=d / "audit",
                         epsilon_cap=1e6, delta=1e-5)
        (d / "site.toml").write_text(cfg.to_toml())
        state_dirs.append(cfg.state_dir)
    run = f"sim-{n}"
    cfg = RunConfig().with_overrides(
        num_server_rounds=rounds, demo_dir=str(demo), out_dir=str(demo / "coordinator"), min_train_nodes=n,
        min_available_nodes=n, min_evaluate_nodes=1, fraction_evaluate=0.0, run_name=run, round_timeout=3600.0,
        **SMALL)
    t0 = time.monotonic()
    simulate(cfg, n)
    wall = time.monotonic() - t0
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    rounds_s, train, sent = _results(demo / "coordinator", run, state_dirs)
    row = Row(f"simulation ({n} sites)", n, max(1, os.cpu_count() or 1), rounds_s, train, sent, model_bytes(),
              peak_rss_mb=rss / 1024, notes=[f"wall {wall:.0f}s incl. Ray start"])
    return row


# ---- real SuperNodes on loopback -----------------------------------------------------------------


class _Proc:
    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = log
        fh = open(log, "ab")  # noqa: SIM115
        self.p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=hardening.child_env(),
                                  start_new_session=True)
        fh.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.p.wait(timeout=25)
                return
            except subprocess.TimeoutExpired:
                continue


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise RuntimeError(f"timed out waiting for {what}")


class _TlsBytes(threading.Thread):
    """Bytes the SuperNodes sent on their TCP connections to the SuperLink port, from `ss -tnip` (sampled)."""

    def __init__(self, port: int, site_pids: set[int]) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.site_pids = site_pids  # the sites' process trees (the ServerApp reaches the same port too)
        self.seen: dict[str, int] = {}
        self.stop_flag = threading.Event()

    def run(self) -> None:
        pat = re.compile(r"bytes_sent:(\d+)")
        while not self.stop_flag.is_set():
            try:
                out = subprocess.run(["ss", "-tnipH", "state", "established", f"( dport = :{self.port} )"],
                                     capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            local = None
            for line in out.splitlines():
                if not line[:1].isspace():  # a socket: Recv-Q Send-Q Local Peer (no State column when filtered)
                    parts = line.split()
                    # only the SuperNodes' connections (the ServerApp reaches the same port over loopback)
                    pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
                    local = parts[2] if len(parts) > 2 and pids & self.site_pids else None
                    line = " ".join(parts[4:])
                m = pat.search(line)
                if m and local:
                    self.seen[local] = max(self.seen.get(local, 0), int(m.group(1)))
            time.sleep(0.2)

    def total(self) -> int:
        return sum(self.seen.values())


def deployment(base_sites: list[Any], work: Path, rounds: int) -> Row:
    """3 SuperNodes + a SuperLink on loopback, TLS and SuperNode authentication on."""
    from coordinator.provision import init_consortium
    from site_client.kit import generate_site_key

    port = _free_port()
    cons = work / "consortium"
    names = [s.name for s in base_sites]
    kits = {n: work / "sites" / n for n in names}  # each site's own kit: its key is made there
    init_consortium(cons, "bench", ["localhost"], [(n, generate_site_key(kits[n]).public) for n in names],
                    port=port, bind_host="127.0.0.1")
    for n in names:
        shutil.copytree(cons / "kits" / n, kits[n], dirs_exist_ok=True)  # the operator's kit back to the site
        kit = kits[n] / "kit.toml"
        kit.write_text(re.sub(r"(?m)^epsilon-cap = .*$", "epsilon-cap = 1000000.0", kit.read_text()))
    logs = work / "logs"
    logs.mkdir()
    procs = [_Proc([MEDFED, "coordinator", "start", str(cons)], logs / "coordinator.log")]
    try:
        _wait(lambda: "medfed coordinator ready" in procs[0].text(), 180, "the coordinator")
        for s in base_sites:
            procs.append(_Proc([MEDFED, "site", "start", str(kits[s.name]), "--data", str(s.data_dir),
                                "--clientapp-port", str(_free_port()), "--reconnect-seconds", "600"],
                               logs / f"{s.name}.log"))
        from coordinator.superlink import list_nodes

        def online() -> bool:
            try:
                return sum(n["status"] == "online" for n in list_nodes(cons)) == len(names)
            except Exception:  # noqa: BLE001
                return False

        _wait(online, 240, "the sites")
        import psutil

        site_pids = {c.pid for p in procs[1:] for c in [psutil.Process(p.p.pid),
                                                         *psutil.Process(p.p.pid).children(recursive=True)]}
        tls = _TlsBytes(port, site_pids)
        tls.start()
        run = "bench"
        res = subprocess.run([MEDFED, "run", str(cons), "--rounds", str(rounds), "--run-name", run, "--run-config",
                              f"image-size={SMALL['image_size']} batch-size={SMALL['batch_size']} "
                              f"min-available-nodes={len(names)} min-train-nodes={len(names)} "
                              "min-evaluate-nodes=1 fraction-evaluate=0.0 round-timeout=900.0"],
                             capture_output=True, text=True, timeout=3600, env=hardening.child_env())
        tls.stop_flag.set()
        tls.join(timeout=15)
        if res.returncode != 0:
            raise RuntimeError(f"medfed run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        states = [kits[n] / "state" for n in names]
        rounds_s, train, sent = _results(cons / "coordinator" / "runs" / run, run, states)
        tls_total = tls.total()
        return Row("deployment (3 SuperNodes, TLS)", len(names), len(names), rounds_s, train, sent, model_bytes(),
                   tls_per_site_round=tls_total / len(names) / rounds if tls_total else None,
                   notes=["each site's long-lived executor runs every message (site_client.executor)"])
    finally:
        for p in reversed(procs):
            p.stop()


# ---- report ----------------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Round overhead (steady-state rounds: mean over rounds 2..R)")
    for col in ("setting", "round s", "slowest site train s", "overhead s", "overhead/round",
                "bytes sent/site/round", "model bytes", "sent / model", "TLS bytes/site/round", "peak RSS"):
        t.add_column(col, justify="right" if col != "setting" else "left")
    for r in rows:
        idx = r.steady()
        rnd = statistics.mean(r.rounds[i] for i in idx)
        slow = statistics.mean(max(r.train[i]) for i in idx if r.train[i])
        over = statistics.mean(r.overhead(i) for i in idx)
        sent = statistics.mean(r.sent) if r.sent else float("nan")
        t.add_row(r.setting, f"{rnd:.2f}", f"{slow:.2f}", f"{over:.2f}", f"{over / rnd:.0%}", f"{sent:,.0f}",
                  f"{r.model_bytes:,}", f"{sent / r.model_bytes:.3f}x",
                  "-" if r.tls_per_site_round is None else f"{r.tls_per_site_round:,.0f}",
                  "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:,.0f} MB")
    Console(width=200).print(t)
    for r in rows:
        print(f"{r.setting}: rounds {[f'{s:.1f}' for s in r.rounds]} s; {'; '.join(r.notes)}")
    goals = []
    for r in rows:
        if r.sites == 10 and r.setting.startswith("simulation"):
            over = statistics.mean(r.overhead(i) for i in r.steady())
            goals.append(f"overhead at 10 sites {over:.2f}s/round (goal < 1 s): {'met' if over < 1 else 'NOT met'}")
        if r.sent:
            ratio = statistics.mean(r.sent) / r.model_bytes
            goals.append(
                f"{r.setting}: bytes/round {ratio:.3f}x model (goal <= 1.1x): {'met' if ratio <= 1.1 else 'NOT met'}"
            )
        if r.sites == 100:
            goals.append(f"100 simulated sites ran on this machine ({len(r.rounds)} rounds)")
    print("\n".join(goals))


def framing_sweep() -> None:
    """Flower's serialized size of a train reply over the model size: the per-tensor layout (one Array per
    tensor, Flower's default) against medfed's wire format (medfed.wire: one flat array), for this model's
    tensor sizes scaled up. Flower's framing is a few hundred bytes per array (object ids, .npy header)."""
    import numpy as np
    import torch
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from rich.console import Console
    from rich.table import Table

    from coordinator.federation import initial_state
    from coordinator.receipts import wire_bytes
    from medfed.settings import RunConfig
    from medfed.wire import pack

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # to build a Message here
    sizes = [v.numel() for v in initial_state(RunConfig().with_overrides(**SMALL)).values()]
    rng = np.random.default_rng(0)
    t = Table(title=f"Serialized train reply / model size ({len(sizes)} tensors, random float32, as Flower sends it)")
    for col in ("model bytes", "per-tensor reply", "ratio", "packed reply (medfed.wire)", "ratio"):
        t.add_column(col, justify="right")

    def reply(arrays: ArrayRecord) -> int:
        metrics = MetricRecord({"num-examples": 10, "epsilon": 1.0})
        return wire_bytes(Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), dst_node_id=2,
                                  message_type="train"))

    for k in (1, 10, 100, 1000):
        state = {f"a{i}": torch.from_numpy(rng.standard_normal(n * k).astype(np.float32)) for i, n in enumerate(sizes)}
        model = sum(n * k * 4 for n in sizes)
        per_tensor = reply(ArrayRecord({name: Array(v.numpy()) for name, v in state.items()}))
        packed = reply(pack(state))
        t.add_row(
            f"{model:,}", f"{per_tensor:,}", f"{per_tensor / model:.3f}x", f"{packed:,}", f"{packed / model:.3f}x"
        )
    Console(width=200).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per setting (the first is reported apart)")
    ap.add_argument("--sim-sites", default="10,50,100", help="simulated federation sizes, comma-separated")
    ap.add_argument("--no-deploy", action="store_true", help="skip the real SuperNodes")
    ap.add_argument("--no-sim", action="store_true", help="measure only the deployment (3 real SuperNodes)")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--one-simulation", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--row", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_simulation is not None:
        from medfed.settings import SiteConfig

        hardening.apply()
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        base = [SiteConfig.from_toml(p / "site.toml") for p in sorted((args.work / "data" / "sites").iterdir())]
        row = simulated(args.one_simulation, base, args.work, args.rounds)
        args.row.write_text(json.dumps(row.__dict__))
        return
    hardening.apply()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from medfed import logs
    from medfed.demo import prepare_sites

    logs.setup(False)
    work = args.work or Path(tempfile.mkdtemp(prefix="medfed-round-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base = prepare_sites(work / "data", sites=3, patients=24, seed=21, epsilon_caps=[1e6] * 3, delta=1e-5,
                             progress=False)
        rows = []
        if not args.no_deploy:
            rows.append(deployment(base, work / "deploy", args.rounds))
        for n in [] if args.no_sim else [int(x) for x in args.sim_sites.split(",") if x.strip()]:
            # each simulation in its own process: its own Ray instance, its own peak memory
            out = work / f"row-{n}.json"
            subprocess.run([sys.executable, __file__, "--one-simulation", str(n), "--rounds", str(args.rounds),
                            "--work", str(work), "--row", str(out)], check=True, env=hardening.child_env())
            rows.append(Row(**json.loads(out.read_text())))
        print_table(rows)
        if not args.no_sim:
            framing_sweep()
        for r in rows:
            if r.setting.startswith("deployment"):
                print(f"deployment overhead {statistics.mean(r.overhead(i) for i in r.steady()):.2f} s/round "
                      f"at {r.sites} sites")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
