"""Builders of sealed audit trails, and the surgery the tampering tests perform on them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from anonymization.audit import AuditTrail, line_hash, segment_files
from anonymization.audit.keys import AuditSigner, write_private_key


def signer_file(path: Path) -> AuditSigner:
    """A fresh signing key written 0600 at ``path`` (outside any trail folder)."""
    signer = AuditSigner.generate(path)
    write_private_key(path, signer)
    return signer


def sealed_trail(directory: Path, signer: AuditSigner, *, events: int = 60, seal_every: int = 7,
                 segment_records: int = 25) -> AuditTrail:
    """A closed trail of ``events`` records over several segments, sealed periodically and at the end."""
    with AuditTrail(directory, signer=signer, fsync=False, seal_every=seal_every,
                    segment_records=segment_records) as trail:
        for i in range(events):
            trail.append("event", n=i, digest=f"{i:064x}")
    return trail


def realistic_trail(directory: Path, signer: AuditSigner) -> AuditTrail:
    """What a site's trail looks like after de-identification and a few rounds (no identifiers)."""
    with AuditTrail(directory, signer=signer, fsync=False) as trail:
        trail.record_policy("deidentification", {"profile": ["retain_device_identity"], "tool": "medfed 0.1.0"})
        for i in range(12):
            cleaning = ({"pixel_cleaning": {"pixel_cleaning": "done", "regions": 2, "frames": 1, "ocr_rounds": 2,
                                            "transfer_syntax": "1.2.840.10008.1.2.1", "overlays_removed": 0}}
                        if i == 3 else {})
            trail.append("deidentified", input_digest=f"{i:064x}", sop_uid=f"2.25.{1000 + i}",
                         path=f"images/P{i}/2.25.{i}/2.25.{1000 + i}.dcm",
                         actions={"X": 40 + i, "D": 6, "U": 5, "Z": 3, "pseudonym": 2}, output_digest=f"{i + 99:064x}",
                         **cleaning)
        for reason in ("Burned In Annotation is YES: text burned into the pixels",
                       "not a DICOM file (no DICM prefix and no readable data set)",
                       "Burned In Annotation is YES: text burned into the pixels"):
            trail.append("quarantined", input_digest="ab" * 32, reason=reason)
        trail.append(
            "deid_run", files=15, deidentified=12, quarantined=3, skipped=0, profile=["retain_device_identity"]
        )
        trail.record_policy("privacy", {"site": "hospital-r", "epsilon_cap": 3.0, "delta": 1e-5})
        eps = 0.0
        arrays = [{"name": "features.0.weight", "shape": [16, 1, 3, 3], "dtype": "float32", "bytes": 576},
                  {"name": "head.bias", "shape": [1], "dtype": "float32", "bytes": 4}]
        for rnd in (1, 2, 3):
            before, eps = eps, eps + 0.9
            trail.append("round_trained", run_id="4242", server_round=rnd, steps=40, sample_rate=0.0625,
                         noise_multiplier=1.1, max_grad_norm=1.0, epsilon_before=before, epsilon_after=eps,
                         epsilon_cap=3.0, delta=1e-5, declined=False,
                         update={"arrays": arrays, "bytes": 580, "digest": f"{rnd:064x}"})
            trail.append("egress", run_id="4242", server_round=rnd, message_type="train", arrays=arrays,
                         metrics=["epsilon", "num-examples"], bytes=580, digest=f"{rnd:064x}")
        reason = "site hospital-r declines round 4: it would spend epsilon 2.700 -> 3.600, over its cap of 3"
        trail.append("round_declined", run_id="4242", server_round=4, epsilon_before=eps, epsilon_projected=3.6,
                     epsilon_cap=3.0, delta=1e-5, steps=40, sample_rate=0.0625, noise_multiplier=1.1,
                     max_grad_norm=1.0, declined=True, reason=reason)
        trail.append("egress_error", run_id="4242", server_round=4, message_type="train", code=4001, reason=reason)
    return trail


# ---- surgery --------------------------------------------------------------------------------------
def locate(directory: Path, seq: int) -> tuple[Path, int]:
    """(segment file, line index) of record ``seq``."""
    for _n, path in segment_files(directory):
        for i, raw in enumerate(path.read_bytes().splitlines()):
            try:
                if json.loads(raw).get("seq") == seq:
                    return path, i
            except ValueError:
                continue
    raise KeyError(seq)


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def write_lines(path: Path, lines: list[bytes], *, newline: bool = True) -> None:
    path.write_bytes(b"\n".join(lines) + (b"\n" if newline and lines else b""))


def record(directory: Path, seq: int) -> dict[str, Any]:
    path, i = locate(directory, seq)
    return json.loads(lines_of(path)[i])


def rechain(directory: Path) -> None:
    """Recompute every ``prev`` after an edit, as a forger without the key would (seals untouched)."""
    prev = "0" * 64
    for _n, path in segment_files(directory):
        out = []
        for raw in lines_of(path):
            rec = json.loads(raw)
            if rec["prev"] != prev:
                raw = raw.replace(rec["prev"].encode(), prev.encode(), 1)
            out.append(raw)
            prev = line_hash(raw)
        write_lines(path, out)


def forge_append(directory: Path, records: list[dict[str, Any]], signer: AuditSigner | None = None) -> None:
    """Append ``records`` to the active segment with a correct chain, as a forger's own tool would;
    seals among them are signed with ``signer`` (the forger's key, not the site's)."""
    from anonymization.audit import SEAL_DOMAIN, encode

    active = directory / "audit.jsonl"
    last = json.loads(lines_of(active)[-1])
    seq, prev = last["seq"], line_hash(lines_of(active)[-1])
    out = []
    for fields in records:
        seq += 1
        rec = {"seq": seq, "time": "2026-01-01T00:00:00.000+00:00", **fields, "prev": prev}
        rec = {k: rec[k] for k in ("seq", "time", "kind", "prev")} | {k: v for k, v in rec.items()
                                                                     if k not in ("seq", "time", "kind", "prev")}
        raw = encode(rec)
        if rec["kind"] == "seal":
            assert signer is not None
            raw = raw[:-1] + b',"sig":"' + signer.sign(SEAL_DOMAIN + raw).hex().encode() + b'"}'
        out.append(raw)
        prev = line_hash(raw)
    write_lines(active, lines_of(active) + out)


def reseal_without(directory: Path, signer: AuditSigner, drop: set[int] | None = None, *,
                   upto: int | None = None) -> None:
    """The attack of someone with the site account: delete records (``drop``, or every record after
    ``upto``), renumber and re-chain the rest, re-sign every seal with the site's own key."""
    from anonymization.audit import SEAL_DOMAIN, encode

    drop = set(drop or ())
    seq, prev = 0, "0" * 64
    files = segment_files(directory)
    for _n, path in files:
        out = []
        for raw in lines_of(path):
            rec = json.loads(raw)
            if rec["seq"] in drop or (upto is not None and rec["seq"] > upto):
                continue
            seq += 1
            rec["seq"], rec["prev"] = seq, prev
            sig = rec.pop("sig", None)
            raw = encode(rec)
            if sig is not None:
                raw = raw[:-1] + b',"sig":"' + signer.sign(SEAL_DOMAIN + raw).hex().encode() + b'"}'
            out.append(raw)
            prev = line_hash(raw)
        write_lines(path, out)


# ---- a real browser ---------------------------------------------------------------------------
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium() -> str:
    """Debian's headless Chromium: skip loudly where it is missing, fail under CI."""
    import pytest

    found = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    if found is None:
        reason = ("HEADLESS CHROMIUM NOT FOUND: the audit report was NOT rendered in a browser. "
                  "Install Debian's `chromium` (make system-deps) to run this test.")
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def render(browser: str, page: Path, png: Path, profile: Path, *, height: int = 4200,
           netlog: Path | None = None) -> str:
    """Render ``page`` headless: a screenshot to ``png``, the DOM after rendering returned;
    with ``netlog``, Chromium logs every network request it makes there (see :func:`page_fetches`)."""
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--hide-scrollbars", f"--window-size=1200,{height}", f"--user-data-dir={profile}",
        *([f"--log-net-log={netlog}", "--net-log-capture-mode=Default"] if netlog is not None else []),
        f"--screenshot={png}", "--dump-dom", page.resolve().as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert png.exists() and png.stat().st_size > 10_000
    return done.stdout


def page_fetches(netlog: Path) -> set[str]:
    """URLs the rendered page itself asked the network for (Chromium's NetLog).

    A request made for a page opened from disk carries a ``file://`` network isolation key;
    the browser's own background traffic does not, and is left out."""
    log = json.loads(netlog.read_text("utf-8", errors="replace") or "{}")
    urls = set()
    for event in log.get("events", []):
        params = event.get("params") or {}
        url = str(params.get("url", ""))
        if url and not url.startswith("file:") and str(params.get("network_isolation_key", "")).startswith("file://"):
            urls.add(url)
    return urls


def visible_text(dom: str) -> str:
    """The text a reader sees: tags, styles and images stripped, whitespace collapsed."""
    dom = re.sub(r"<(style|script)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    dom = re.sub(r"<img[^>]*>", " ", dom)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def painted(png: Path, rgb: tuple[int, int, int], tolerance: int = 12) -> int:
    """How many pixels of the screenshot have colour ``rgb`` (charts' bars are drawn in it)."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as shot:
        pixels = np.asarray(shot.convert("RGB")).astype(int)
    return int((np.abs(pixels - np.array(rgb)) < tolerance).all(axis=-1).sum())
