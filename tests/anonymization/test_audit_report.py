"""The privacy officer's report: self-contained HTML, rendered by a real browser (headless Chromium)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli.audit import audit_app as app
from tests.audit_factory import (
    chromium,
    lines_of,
    locate,
    page_fetches,
    painted,
    realistic_trail,
    render,
    signer_file,
    visible_text,
    write_lines,
)

runner = CliRunner()


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


@pytest.mark.integration
def test_report_renders_in_headless_chromium(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    browser = chromium()
    out, pub = _report(tmp_path)
    png = tmp_path / "audit-report.png"
    text = visible_text(render(browser, out, png, tmp_path / "profile", netlog=tmp_path / "net.json"))
    assert page_fetches(tmp_path / "net.json") == set()  # the page fetched nothing
    with capsys.disabled():
        print(f"\naudit report screenshot: {png}")
    for expected in (
        "Audit report", "Trail verified", "anchored to the given public key",
        "Files de-identified and quarantined", "files de-identified 12", "files quarantined 3",
        "Burned In Annotation is YES: text burned into the pixels 2",
        "Actions applied, by kind", "removed (X)", "Policy in force", "retain_device_identity",
        "Privacy budget per round", "DECLINED (over cap)", "3.600 (would reach)",
        "pixel data cleaned 1", "text regions blanked 2",
        "What left the site", "features.0.weight", "16×1×3×3", "matches the round's update",
        "error reply only (code 4001)", "Signing keys and seals",
    ):
        assert expected in text, expected
    # The charts were decoded and painted: the bar colour of the charts fills many pixels.
    assert painted(png, (59, 125, 216)) > 5_000, "the embedded charts did not render"

    # A tampered trail: the browser shows the failure at the top of the page.
    audit = tmp_path / "audit"
    path, i = locate(audit, 5)
    lines = lines_of(path)
    lines[i] = lines[i].replace(b'"deidentified"', b'"deidentifiet"')
    write_lines(path, lines)
    bad = tmp_path / "tampered.html"
    result = runner.invoke(app, ["report", str(audit), "--out", str(bad), "--public-key", str(pub)])
    assert result.exit_code == 0 and "BROKEN" in result.output
    text = visible_text(render(browser, bad, tmp_path / "tampered.png", tmp_path / "profile"))
    assert "Trail FAILED verification" in text and "record #5" in text


@pytest.mark.integration
def test_browser_network_log_sees_a_page_that_fetches(tmp_path: Path) -> None:
    """Control for the check above: a page with an external image and stylesheet is caught."""
    page = tmp_path / "fetching.html"
    page.write_text('<!doctype html><html><body><h1>fetching page</h1>' + "<p>padding</p>" * 400
                    + '<img src="http://example.invalid/chart.png">'
                    '<link rel="stylesheet" href="https://cdn.example.invalid/style.css"></body></html>')
    render(chromium(), page, tmp_path / "fetching.png", tmp_path / "profile", height=900, netlog=tmp_path / "net.json")
    assert page_fetches(tmp_path / "net.json") == {"http://example.invalid/chart.png",
                                                    "https://cdn.example.invalid/style.css"}
