"""How long does verifying a site's audit trail take? Builds one of N records and verifies it.

The records look like de-identification's (keyed digests, a pseudonymous UID and
path, action counts), with a training round and its egress record every 1,000
files; the trail is written with the defaults a site runs with (a seal every
1,000 records, a new segment every 100,000), then verified: in process from the
trail's own keys and anchored to the exported public key, and as an auditor runs
it, `medfed audit verify DIR --public-key FILE` (a fresh process, imports included).
The baseline, measured in the same run, is the least any verifier of a hash chain
must do: read every segment, parse every line as JSON and SHA-256 it.

    .venv/bin/python bench/audit_verify.py [--records 100000] [--segment-records 100000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anonymization.audit import AuditTrail, segment_files  # noqa: E402
from anonymization.audit.keys import AuditSigner  # noqa: E402
from anonymization.audit.verify import verify_trail  # noqa: E402


def build(directory: Path, signer: AuditSigner, records: int, segment_records: int) -> int:
    """Write about ``records`` records (the trail adds its seals and segment records)."""
    with AuditTrail(directory, signer=signer, fsync=False, segment_records=segment_records) as trail:
        for i in range(records):
            digest = hashlib.sha256(i.to_bytes(8, "big")).hexdigest()
            if i % 1000 == 999:
                trail.append("round_trained", run_id="bench", server_round=i // 1000, steps=40, sample_rate=0.0625,
                             noise_multiplier=1.1, max_grad_norm=1.0, epsilon_before=0.1, epsilon_after=0.2,
                             epsilon_cap=10.0, delta=1e-5)
            elif i % 1000 == 998:
                trail.append("egress", run_id="bench", server_round=i // 1000, message_type="train",
                             arrays=[{"name": f"layer{k}.weight", "shape": [16, 16, 3, 3], "dtype": "float32",
                                      "bytes": 9216} for k in range(6)],
                             metrics=["epsilon", "num-examples"], bytes=55296, digest=digest)
            else:
                trail.append(
                    "deidentified",
                    input_digest=digest,
                    sop_uid=f"2.25.{int(digest[:30], 16)}",
                    path=f"images/P{digest[:20]}/2.25.{int(digest[30:50], 16)}/2.25.{int(digest[:30], 16)}.dcm",
                    actions={"X": 51, "D": 7, "U": 6, "Z": 4, "K": 12, "C": 2, "pseudonym": 2},
                    output_digest=digest[::-1],
                )
    return len(trail.records(everything=True))


def baseline(directory: Path) -> tuple[int, float]:
    """Read, parse and hash every line: the floor under any chain verification."""
    start = time.perf_counter()
    count = 0
    for _n, path in segment_files(directory):
        for raw in path.read_bytes().split(b"\n"):
            if raw:
                json.loads(raw)
                hashlib.sha256(raw).hexdigest()
                count += 1
    return count, time.perf_counter() - start


def cli_verify(directory: Path, public_key: Path) -> tuple[str, float]:
    """``medfed audit verify`` in a fresh process: its one-line summary and wall time."""
    medfed = Path(sys.executable).with_name("medfed")
    cmd = [str(medfed), "audit", "verify", str(directory), "--public-key", str(public_key)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "400"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"medfed audit verify failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done.stdout.strip(), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--segment-records", type=int, default=100_000)
    args = parser.parse_args()
    signer = AuditSigner.generate()
    with tempfile.TemporaryDirectory(prefix="medfed-audit-bench-") as tmp:
        directory = Path(tmp) / "audit"
        t0 = time.perf_counter()
        total = build(directory, signer, args.records, args.segment_records)
        build_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for _n, p in segment_files(directory))
        segments = len(segment_files(directory))
        print(f"built {total} records ({args.records} appended + seals/keys/segments) in {segments} segment(s), "
              f"{size / 2**20:.1f} MiB, in {build_s:.2f}s ({total / build_s:,.0f} records/s appended)")
        lines, floor = baseline(directory)
        print(f"baseline (read + json.loads + sha256 of every line): {lines} lines in {floor:.2f}s "
              f"= {lines / floor:,.0f} lines/s")
        for label, key in (("trail's own keys", None), ("anchored to the public key", signer.public_raw)):
            result = verify_trail(directory, public_key=key)
            assert result.ok, result.problem
            print(f"verify ({label}): {result.records} records, {result.seals} seals in {result.seconds:.2f}s "
                  f"= {result.records / result.seconds:,.0f} records/s, {result.seconds / floor:.2f}x the baseline")
        pub = Path(tmp) / "site-audit.pub"
        pub.write_bytes(signer.public_pem())
        summary, seconds = cli_verify(directory, pub)
        print(f"medfed audit verify DIR --public-key FILE: {seconds:.2f}s wall (fresh process), "
              f"{seconds / floor:.2f}x the baseline")
        print(f"  {summary[:160]}...")


if __name__ == "__main__":
    main()
