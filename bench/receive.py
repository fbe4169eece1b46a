"""PACS intake speed: instances/s received and de-identified by ``medfed site receive`` vs DCMTK's storescp.

Same machine, same files, same run: ``--files`` synthetic CT instances from
``medfed synth`` (no burned-in text, so every instance is stored by both) are
sent by DCMTK's ``storescu`` over loopback, once to ``storescp`` writing the raw
files, once to ``medfed site receive`` (the real command in its own process:
spool on tmpfs as in the systemd unit, de-identification in worker processes,
atomic rename, the output, its folder and the trail fsynced before each Success
(shared by the instances placed together), audit trail, done-index); storescp
writes without any fsync. DCMTK runs with ``TCP_NODELAY=1`` (else each instance
waits ~40 ms for a delayed ACK). The clock covers storescu's whole run (association to release).
Runs alternate (storescp, medfed, storescp, ...) ``--repeat`` times; each side's
best run counts. With ``--associations N`` the files are split over N storescu
processes sending at once (how many PACS send a study).

    .venv/bin/python bench/receive.py [--work DIR] [--files 300] [--repeat 3] [--associations 1]

Needs dcmtk (storescu, storescp). Prints a table and the ratio (goal: >= 0.5x).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from medfed.hardening import child_env  # noqa: E402

GOAL = 0.5
TIMEOUT = 600.0
# DCMTK leaves Nagle's algorithm on unless told: every instance would then wait ~40 ms for a delayed ACK
# on loopback, which measures the kernel's timers, not the receivers.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
SPOOL = Path("/dev/shm")  # the spool on tmpfs, as the systemd unit has it (RuntimeDirectory): raw files never hit disk


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the receiver exited ({proc.returncode}) before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listened on port {port} within {timeout:.0f} s")


def corpus(work: Path, n: int) -> list[Path]:
    """``n`` synthetic CT files (made once, cached under ``work``)."""
    folder = work / f"corpus-{n}"
    files = sorted(folder.rglob("*.dcm")) if folder.exists() else []
    if len(files) >= n:
        return files[:n]
    from medfed.synth import generate_hospitals

    shutil.rmtree(folder, ignore_errors=True)
    patients = 8
    while True:
        generate_hospitals(work / "synth", sites=1, patients=patients, seed=0, burned_in_fraction=0.0, overwrite=True)
        files = sorted((work / "synth").rglob("*.dcm"))
        if len(files) >= n:
            break
        patients *= 2
    folder.mkdir(parents=True)
    for i, f in enumerate(files[:n]):
        shutil.copyfile(f, folder / f"{i:05d}.dcm")
    shutil.rmtree(work / "synth", ignore_errors=True)
    return sorted(folder.glob("*.dcm"))


def send(port: int, aec: str, files: list[Path], associations: int) -> float:
    """Seconds for ``associations`` storescu processes to send ``files`` (split evenly) to ``port``."""
    chunks = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", "PACS", "-aec", aec, "127.0.0.1", str(port), *map(str, chunk)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=DCMTK_ENV)
             for chunk in chunks]
    for proc in procs:
        _, err = proc.communicate(timeout=TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed ({proc.returncode}): {err[-1000:]}")
    return time.perf_counter() - started


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=60)
    return out or ""


def run_storescp(work: Path, files: list[Path], associations: int) -> float:
    out = work / "storescp-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(["storescp", "-aet", "RAW", "--output-directory", str(out), "--fork" if associations > 1
                             else "--single-process", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            text=True, env=DCMTK_ENV)
    try:
        wait_listening(port, proc)
        seconds = send(port, "RAW", files, associations)
    finally:
        stop(proc)
    stored = sum(1 for p in out.iterdir() if p.is_file())
    if stored != len(files):
        raise RuntimeError(f"storescp stored {stored} of {len(files)} files")
    return seconds


def run_medfed(work: Path, files: list[Path], associations: int) -> float:
    dst = work / "medfed-dst"
    spool = SPOOL / f"medfed-bench-spool-{os.getpid()}" if SPOOL.is_dir() else work / "medfed-dst-spool"
    for folder in (dst, spool, work / "medfed-dst-quarantine"):
        shutil.rmtree(folder, ignore_errors=True)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "medfed.cli", "site", "receive", str(dst), "--key", str(work / "site.key"),
         "--port", str(port), "--host", "127.0.0.1", "--ae-title", "MEDFED", "--allow-ae", "PACS",
         "--min-free", "0", "--study-timeout", "3600", "--spool", str(spool)],
        env=child_env({"PYTHONPATH": str(ROOT), "COLUMNS": "200"}), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        wait_listening(port, proc)
        seconds = send(port, "MEDFED", files, associations)
    finally:
        out = stop(proc)
    shutil.rmtree(spool, ignore_errors=True)
    stored = sum(1 for _ in (dst / "images").rglob("*.dcm"))
    if stored != len(files):
        raise RuntimeError(f"medfed stored {stored} of {len(files)} files:\n{out[-2000:]}")
    return seconds


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    return done.stdout.strip() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="Working folder (default: a temporary one).")
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--associations", type=int, default=1)
    args = parser.parse_args()
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            print(f"error: {tool} is not installed (Debian package dcmtk)", file=sys.stderr)
            return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="medfed-bench-receive-"))
    work.mkdir(parents=True, exist_ok=True)
    files = corpus(work, args.files)
    size = sum(f.stat().st_size for f in files) / len(files)
    times: dict[str, list[float]] = {"storescp (raw files)": [], "medfed site receive": []}
    for _ in range(args.repeat):
        times["storescp (raw files)"].append(run_storescp(work, files, args.associations))
        times["medfed site receive"].append(run_medfed(work, files, args.associations))
    print(f"{len(files)} synthetic CT instances ({size / 1024:.0f} KiB each), storescu over loopback, "
          f"{args.associations} association(s), best of {args.repeat}; commit {git_commit()}, "
          f"{os.cpu_count()} CPU(s)")
    rates = {}
    for name, runs in times.items():
        rates[name] = len(files) / min(runs)
        print(f"  {name:<24} {rates[name]:8.1f} instances/s  (runs: {', '.join(f'{t:.2f}s' for t in runs)})")
    ratio = rates["medfed site receive"] / rates["storescp (raw files)"]
    print(f"  ratio medfed / storescp: {ratio:.2f}x (goal >= {GOAL}x): {'met' if ratio >= GOAL else 'NOT met'}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
