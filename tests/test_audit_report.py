"""The privacy officer's report: self-contained HTML, rendered by a real browser (headless Chromium)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli_audit import audit_app as app
from tests.audit_factory import lines_of, locate, realistic_trail, signer_file, write_lines

runner = CliRunner()
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def _report(tmp_path: Path) -> tuple[Path, Path]:
    signer = signer_file(tmp_path / "keys" / "audit-signing.key")
    realistic_trail(tmp_path / "audit", signer)
    pub = tmp_path / "site.pub"
    pub.write_bytes(signer.public_pem())
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(tmp_path / "audit"), "--out", str(out), "--public-key", str(pub)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: OK:" in result.output
    return out, pub


def test_report_is_self_contained(tmp_path: Path) -> None:
    out, _pub = _report(tmp_path)
    page = out.read_text("utf-8")
    assert page.count('src="data:image/png;base64,') == 3  # files, actions, privacy budget
    # No fetch of any kind: no remote URL, no external stylesheet/script, and a CSP that forbids them.
    assert not re.search(r"(?:src|href)\s*=\s*['\"](?!data:)", page)
    assert "<script" not in page and "<link" not in page and "url(" not in page
    assert "default-src 'none'" in page
    for text in ("Trail verified", "Burned In Annotation is YES", "DECLINED (over cap)", "features.0.weight",
                 "removed (X)", "retain_device_identity", "epsilon_cap"):
        assert text in page


def _chromium() -> str:
    found = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    if found is None:
        reason = ("HEADLESS CHROMIUM NOT FOUND: the audit report was NOT rendered in a browser. "
                  "Install Debian's `chromium` (make system-deps) to run this test.")
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def _render(chromium: str, page: Path, png: Path, profile: Path) -> str:
    """Render ``page`` headless: a full-height screenshot to ``png``, the rendered DOM returned."""
    cmd = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--hide-scrollbars", "--window-size=1200,4200", f"--user-data-dir={profile}",
        f"--screenshot={png}", "--dump-dom", page.resolve().as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert png.exists() and png.stat().st_size > 10_000
    return done.stdout


def _visible_text(dom: str) -> str:
    dom = re.sub(r"<(style|script)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    dom = re.sub(r"<img[^>]*>", " ", dom)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.mark.integration
def test_report_renders_in_headless_chromium(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chromium = _chromium()
    out, pub = _report(tmp_path)
    png = tmp_path / "audit-report.png"
    text = _visible_text(_render(chromium, out, png, tmp_path / "profile"))
    with capsys.disabled():
        print(f"\naudit report screenshot: {png}")
    for expected in (
        "Audit report", "Trail verified", "anchored to the given public key",
        "Files de-identified and quarantined", "files de-identified 12", "files quarantined 3",
        "Burned In Annotation is YES: text burned into the pixels 2",
        "Actions applied, by kind", "removed (X)", "Policy in force", "retain_device_identity",
        "Privacy budget per round", "DECLINED (over cap)", "3.600 (would reach)",
        "What left the site", "features.0.weight", "16×1×3×3", "Signing keys and seals",
    ):
        assert expected in text, expected
    # The charts were decoded and painted: the bar colour of the charts fills many pixels.
    import numpy as np
    from PIL import Image

    with Image.open(png) as shot:
        rgb = np.asarray(shot.convert("RGB")).astype(int)
    blue = int((np.abs(rgb - np.array([59, 125, 216])) < 12).all(axis=-1).sum())
    assert blue > 5_000, "the embedded charts did not render"

    # A tampered trail: the browser shows the failure at the top of the page.
    audit = tmp_path / "audit"
    path, i = locate(audit, 5)
    lines = lines_of(path)
    lines[i] = lines[i].replace(b'"deidentified"', b'"deidentifiet"')
    write_lines(path, lines)
    bad = tmp_path / "tampered.html"
    result = runner.invoke(app, ["report", str(audit), "--out", str(bad), "--public-key", str(pub)])
    assert result.exit_code == 0 and "BROKEN" in result.output
    text = _visible_text(_render(chromium, bad, tmp_path / "tampered.png", tmp_path / "profile"))
    assert "Trail FAILED verification" in text and "record #5" in text
