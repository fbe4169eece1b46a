"""The privacy officer's report: one self-contained HTML page built from the audit trail.

Everything it shows comes from the trail (which holds no identifiers), charts are
embedded PNGs (matplotlib, base64) and a Content-Security-Policy forbids the page
any fetch, so it can be mailed, archived or opened offline. Verification runs
first and its verdict heads the page: a report on a broken trail says so.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from anonymization.audit.records import (
    KIND_KEY_CREATED,
    KIND_KEY_ROTATED,
    KIND_POLICY,
    KIND_SEAL,
    read_records,
    utc_now,
)
from anonymization.audit.verify import VerifyResult, verify_trail
from medfed.files import write_text

#: What each action count means (PS3.15 Table E.1-1 action codes and the engine's own kinds).
ACTION_MEANINGS = {
    "X": "removed (X)",
    "Z": "emptied: replaced by a zero-length value (Z)",
    "D": "replaced by a dummy value (D)",
    "U": "UID replaced by a keyed pseudonym (U)",
    "U*": "kept, UIDs inside replaced (U*)",
    "K": "kept (K)",
    "C": "cleaned: identifying content removed or shifted (C)",
    "pseudonym": "patient ID / accession number replaced by a keyed pseudonym",
    "private": "private attributes removed",
    "overlay": "overlay planes removed",
    "shifted": "date or time shifted by the patient's keyed offset",
    "vr_pn": "unlisted person name handled by its VR",
    "vr_date": "unlisted date shifted by its VR",
    "vr_uid": "unlisted UID replaced by its VR",
    "vr_text": "unlisted free text handled by its VR",
}

_FILE_KINDS = ("deidentified", "quarantined", "skipped")
_ROUND_KINDS = ("round_trained", "round_declined", "round_refused", "round_failed")
_ROUND_STATUS = {"round_trained": "trained", "round_declined": "DECLINED (over cap)", "round_refused": "REFUSED",
                 "round_failed": "FAILED"}
_EGRESS_KINDS = ("egress", "egress_blocked", "egress_error")

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1100px;
     padding:24px;color:#1d2330}
h1{margin-bottom:4px} h2{border-bottom:2px solid #d9dee8;padding-bottom:4px;margin-top:36px}
.meta{color:#5b6475;margin-top:0}
.status{padding:14px 18px;border-radius:8px;margin:18px 0;font-size:15px}
.status.ok{background:#e5f6ea;border:1px solid #5cb176}.status.bad{background:#fde8e8;border:1px solid #d9534f}
.status strong{font-size:20px;display:block;margin-bottom:4px}
.cards{display:flex;gap:14px;flex-wrap:wrap;margin:12px 0}
.card{background:#f3f5f9;border-radius:8px;padding:10px 16px;min-width:140px}
.card b{display:block;font-size:24px}
table{border-collapse:collapse;margin:10px 0;font-size:13px;width:100%}
th,td{border:1px solid #d9dee8;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f9} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.declined td{background:#fff4e5} tr.blocked td{background:#fde8e8}
code{font-size:12px;word-break:break-all} img{max-width:100%;border:1px solid #eef0f4}
.muted{color:#5b6475} details summary{cursor:pointer;color:#2a5db0}
"""


# ---- small helpers ------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _time(value: Any) -> _dt.datetime | None:
    try:
        return _dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None


def _short_time(value: Any) -> str:
    t = _time(value)
    return t.strftime("%Y-%m-%d %H:%M:%S UTC") if t else _e(value)


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return _e(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.3g}"
    return _e(value)


def _bytes(n: Any) -> str:
    try:
        size = float(n)
    except (TypeError, ValueError):
        return _e(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, row_classes: Sequence[str] = ()) -> str:
    """An HTML table; cells are already escaped/marked up."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if i < len(row_classes) and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    if not body:
        return '<p class="muted">none recorded</p>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _png(fig: Any, alt: str) -> str:
    """Embed a matplotlib figure as an inline PNG."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _pyplot() -> Any:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- sections -------------------------------------------------------------------------------------
def _verification(result: VerifyResult) -> str:
    if result.ok:
        title = "Trail verified"
        cls = "ok"
    else:
        title = {"broken": "Trail FAILED verification", "incomplete": "Trail INCOMPLETE: its end is not sealed"}.get(
            result.status, "No audit trail found"
        )
        cls = "bad"
    notes = "".join(f"<br><span class='muted'>{_e(n)}</span>" for n in result.notes)
    return (
        f'<section id="verification"><h2>Verification</h2><div class="status {cls}"><strong>{_e(title)}</strong>'
        f"{_e(result.summary())}{notes}</div>"
        '<p class="muted">Every record holds the SHA-256 of the one before it; seals are Ed25519 signatures over '
        "that chain, and every finished run ends with a seal. A trail cut back to the end of an earlier run "
        "still verifies: compare the last seal below with the last one you saw.</p></section>"
    )


def _bucket(times: list[_dt.datetime]) -> tuple[str, str]:
    """strftime patterns (key, label) giving a sensible number of bars for the time span."""
    span = (max(times) - min(times)).total_seconds() if times else 0
    if span >= 2 * 86400:
        return "%Y-%m-%d", "day"
    if span >= 2 * 3600:
        return "%Y-%m-%d %H:00", "hour"
    return "%Y-%m-%d %H:%M", "minute"


def _files(records: list[dict[str, Any]]) -> str:
    """The files section: counts, files per time bucket, quarantine reasons, and each de-identification run."""
    files = [r for r in records if r.get("kind") in _FILE_KINDS]
    return (
        '<section id="files"><h2>Files de-identified and quarantined</h2>'
        f'<div class="cards">{_file_cards(files)}</div>{_files_chart(files)}'
        "<h3>Quarantine reasons</h3>"
        + _table(("reason", "files", "first", "last"), _quarantine_rows(files))
        + "<h3>De-identification runs</h3>"
        + _table(("finished", "files", "de-identified", "quarantined", "skipped", "profile options"),
                 _deid_run_rows(records))
        + "</section>"
    )


def _file_cards(files: list[dict[str, Any]]) -> str:
    """The headline counts: files de-identified, quarantined, skipped, pixel-cleaned, text regions blanked."""
    counts = Counter(r["kind"] for r in files)
    pixel_cleaned = sum(1 for r in files if r.get("kind") == "deidentified" and _pixels_cleaned(r))
    regions = sum(_regions_blanked(r) for r in files if r.get("kind") == "deidentified")
    return "".join(
        f'<div class="card">{_e(label)}<b>{n}</b></div>'
        for label, n in (
            ("files de-identified", counts["deidentified"]),
            ("files quarantined", counts["quarantined"]),
            ("skipped (duplicate or done)", counts["skipped"]),
            ("pixel data cleaned", pixel_cleaned),
            ("text regions blanked", regions),
        )
    )


def _files_chart(files: list[dict[str, Any]]) -> str:
    """Stacked bars of files de-identified and quarantined per day, hour or minute; "" when none is dated."""
    dated = [(t, r["kind"]) for r in files if (t := _time(r.get("time"))) is not None]
    if not dated:
        return ""
    pattern, unit = _bucket([t for t, _k in dated])
    per: dict[str, Counter[str]] = defaultdict(Counter)
    for t, kind in dated:
        per[t.strftime(pattern)][kind] += 1
    keys = sorted(per)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.2))
    x = range(len(keys))
    de = [per[k]["deidentified"] for k in keys]
    qu = [per[k]["quarantined"] for k in keys]
    ax.bar(x, de, color="#3b7dd8", label="de-identified")
    ax.bar(x, qu, bottom=de, color="#e8872b", label="quarantined")
    ax.set_xticks(list(x), keys, rotation=30 if len(keys) > 4 else 0, ha="right" if len(keys) > 4 else "center")
    ax.set_ylabel("files")
    ax.set_title(f"Files per {unit} (UTC)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _png(fig, f"files de-identified and quarantined per {unit}")


def _quarantine_rows(files: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """One row per quarantine reason, commonest first: how many files, the first and last time."""
    reasons: dict[str, list[str]] = defaultdict(list)
    for r in files:
        if r.get("kind") == "quarantined":
            reasons[str(r.get("reason", "?"))].append(str(r.get("time", "")))
    return [
        (_e(reason), f'<span class="num">{len(ts)}</span>', _short_time(min(ts)), _short_time(max(ts)))
        for reason, ts in sorted(reasons.items(), key=lambda kv: -len(kv[1]))
    ]


def _deid_run_rows(records: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """One row per finished de-identification run: its counts and the profile options it used."""
    runs = [r for r in records if r.get("kind") == "deid_run"]
    return [
        (_short_time(r.get("time")), _num(r.get("files")), _num(r.get("deidentified")), _num(r.get("quarantined")),
         _num(r.get("skipped")), _e(", ".join(map(str, r.get("profile") or [])) or "basic"))
        for r in runs
    ]


def _pixels_cleaned(record: dict[str, Any]) -> bool:
    """Whether Clean Pixel Data ran on the file (the engine records what it did, even 0 regions)."""
    value = record.get("pixel_cleaning")
    if isinstance(value, dict):
        return value.get("pixel_cleaning") == "done"
    return bool(value)


def _regions_blanked(record: dict[str, Any]) -> int:
    value = record.get("pixel_cleaning")
    regions = value.get("regions") if isinstance(value, dict) else 0
    return int(regions) if isinstance(regions, int) and not isinstance(regions, bool) else 0


def _actions(records: list[dict[str, Any]]) -> str:
    totals: Counter[str] = Counter()
    for r in records:
        if r.get("kind") == "deidentified" and isinstance(r.get("actions"), dict):
            for k, v in r["actions"].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    totals[str(k)] += int(v)
    if not totals:
        return '<section id="actions"><h2>Actions applied, by kind</h2><p class="muted">none recorded</p></section>'
    ordered = totals.most_common()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(ordered) + 1.2))
    ax.barh([k for k, _v in ordered][::-1], [v for _k, v in ordered][::-1], color="#3b7dd8")
    ax.set_xlabel("times applied (all files)")
    ax.set_title("De-identification actions by kind")
    ax.grid(axis="x", alpha=0.3)
    rows = [
        (f"<code>{_e(k)}</code>", _e(ACTION_MEANINGS.get(k, "")), f'<span class="num">{v}</span>') for k, v in ordered
    ]
    return (
        '<section id="actions"><h2>Actions applied, by kind</h2>'
        + _png(fig, "de-identification actions by kind")
        + _table(("action", "meaning", "count"), rows)
        + "</section>"
    )


def _setting(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "(none)"
    return str(value)


def _policy(records: list[dict[str, Any]]) -> str:
    policies = [r for r in records if r.get("kind") == KIND_POLICY]
    current: dict[str, dict[str, Any]] = {}
    for r in policies:
        current[str(r.get("scope"))] = r
    blocks = []
    for scope, r in sorted(current.items()):
        settings = r.get("settings") if isinstance(r.get("settings"), dict) else {}
        rows = [(_e(k), _e(_setting(v))) for k, v in settings.items()]
        blocks.append(
            f"<h3>{_e(scope)}</h3><p>in force since {_short_time(r.get('time'))} (record #{_e(r.get('seq'))}), "
            f"digest <code>{_e(r.get('digest'))}</code></p>" + _table(("setting", "value"), rows)
        )
    history = [
        (
            _short_time(r.get("time")),
            _e(r.get("scope")),
            f"<code>{_e(str(r.get('previous_digest') or '-')[:16])}</code>",
            f"<code>{_e(str(r.get('digest'))[:16])}</code>",
        )
        for r in policies
    ]
    body = "".join(blocks) or '<p class="muted">no policy recorded</p>'
    return (
        '<section id="policy"><h2>Policy in force</h2>' + body
        + "<h3>Changes</h3>" + _table(("when", "scope", "previous digest", "new digest"), history)
        + "</section>"
    )


def _privacy(records: list[dict[str, Any]]) -> str:
    """The privacy section: ε spent per round against the cap (chart), and a row per round trained or declined."""
    rounds = [r for r in records if r.get("kind") in _ROUND_KINDS]
    trained = [r for r in rounds if r.get("kind") in ("round_trained", "round_declined")]
    chart = _privacy_chart(trained) if trained else ""
    rows = [_round_row(r) for r in rounds]
    classes = ["declined" if r.get("kind") != "round_trained" else "" for r in rounds]
    return (
        '<section id="privacy"><h2>Privacy budget per round</h2>' + chart
        + _table(
            ("run", "round", "time", "status", "steps", "sample rate", "noise σ", "clip norm", "ε before", "ε after",
             "ε cap", "δ", "update released", "reason"),
            rows, row_classes=classes,
        )
        + "</section>"
    )


def _privacy_chart(trained: list[dict[str, Any]]) -> str:
    """ε spent per round, one line per run, declined rounds marked at the ε they would have reached, caps dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in trained:
        by_run[str(r.get("run_id"))].append(r)
    caps: set[float] = set()
    for run, items in by_run.items():
        _plot_run_epsilon(ax, run, items)
        caps.update(float(r.get("epsilon_cap")) for r in items if isinstance(r.get("epsilon_cap"), (int, float)))
    for cap in sorted(caps):
        ax.axhline(cap, color="#d9534f", linestyle="--", linewidth=1.2)
        ax.annotate(f"cap ε = {cap:g}", xy=(0, cap), xytext=(4, 4), textcoords="offset points", color="#d9534f")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("ε (cumulative, this run)")
    ax.set_title("Privacy budget spent per round against the cap")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig, "privacy budget epsilon spent per round against the cap")


def _plot_run_epsilon(ax: Any, run: str, items: list[dict[str, Any]]) -> None:
    """One run's line: ε before its first trained round, then after each; declined rounds as crosses."""
    done = [r for r in items if r["kind"] == "round_trained"]
    xs = [0] + [int(r.get("server_round", 0)) for r in done]
    ys = [float(done[0].get("epsilon_before", 0.0)) if done else 0.0] + [
        float(r.get("epsilon_after", 0.0)) for r in done
    ]
    ax.plot(xs, ys, marker="o", label=f"run {run}: ε spent")
    declined = [r for r in items if r["kind"] == "round_declined"]
    if declined:
        ax.scatter([int(r.get("server_round", 0)) for r in declined],
                   [float(r.get("epsilon_projected", 0.0)) for r in declined],
                   marker="x", s=80, color="#d9534f", zorder=5, label=f"run {run}: declined (would reach)")


def _round_row(r: dict[str, Any]) -> tuple[str, ...]:
    """One round's table row: its DP parameters, ε before and after (or would reach, if declined), the update."""
    kind = r.get("kind")
    status = _ROUND_STATUS[str(kind)]
    eps_after = r.get("epsilon_after") if kind == "round_trained" else r.get("epsilon_projected")
    return (
        _e(r.get("run_id")), _num(r.get("server_round")), _short_time(r.get("time")), _e(status),
        _num(r.get("steps")), _num(r.get("sample_rate"), 4), _num(r.get("noise_multiplier")),
        _num(r.get("max_grad_norm")), _num(r.get("epsilon_before")),
        (_num(eps_after) + (" (would reach)" if kind == "round_declined" else "")) if eps_after is not None else "",
        _num(r.get("epsilon_cap"), 2), _num(r.get("delta"), 7) if r.get("delta") is not None else "",
        _update_cell(r.get("update")), _e(r.get("reason", "")),
    )


def _update_cell(update: Any) -> str:
    """The update a trained round released: size and digest (what the egress record must match)."""
    if not isinstance(update, dict):
        return ""
    arrays = update.get("arrays") if isinstance(update.get("arrays"), list) else []
    return (f"{len(arrays)} arrays, {_bytes(update.get('bytes'))}<br>"
            f"<code>{_e(str(update.get('digest', ''))[:16])}</code>")


def _egress(records: list[dict[str, Any]]) -> str:
    out = [r for r in records if r.get("kind") in _EGRESS_KINDS]
    released = {
        (str(r.get("run_id")), r.get("server_round")): str(r["update"].get("digest", ""))
        for r in records if r.get("kind") == "round_trained" and isinstance(r.get("update"), dict)
    }
    rows, classes = [], []
    total = 0
    for r in out:
        if r.get("kind") == "egress_blocked":
            rows.append((_e(r.get("run_id")), _num(r.get("server_round")), _short_time(r.get("time")),
                         _e(r.get("message_type")), "BLOCKED: nothing left", "", "", "", _e(r.get("reason"))))
            classes.append("blocked")
            continue
        if r.get("kind") == "egress_error":
            rows.append((_e(r.get("run_id")), _num(r.get("server_round")), _short_time(r.get("time")),
                         _e(r.get("message_type")), f"error reply only (code {_e(r.get('code'))})", _bytes(0),
                         "", "", _e(r.get("reason"))))
            classes.append("declined")
            continue
        arrays = r.get("arrays") if isinstance(r.get("arrays"), list) else []
        total += int(r.get("bytes") or 0)
        detail = ""
        if arrays:
            arows = [(f"<code>{_e(a.get('name'))}</code>", _e("×".join(map(str, a.get("shape") or [])) or "scalar"),
                      _e(a.get("dtype")), _bytes(a.get("bytes"))) for a in arrays if isinstance(a, dict)]
            table = _table(("name", "shape", "dtype", "bytes"), arows)
            detail = f"<details><summary>{len(arrays)} arrays</summary>{table}</details>"
        digest = str(r.get("digest", ""))
        match, row_class = "", ""
        if arrays:
            expected = released.get((str(r.get("run_id")), r.get("server_round")))
            if expected is None:
                match = '<span class="muted">no round record</span>'
            elif expected == digest:
                match = "matches the round's update"
            else:
                match, row_class = "<b>DIFFERS from the round's update</b>", "blocked"
        classes.append(row_class)
        rows.append((
            _e(r.get("run_id")), _num(r.get("server_round")), _short_time(r.get("time")), _e(r.get("message_type")),
            (detail or "no arrays"), _bytes(r.get("bytes")), f"<code>{_e(digest[:16])}</code>", match,
            _e(", ".join(map(str, r.get("metrics") or []))),
        ))
    return (
        '<section id="egress"><h2>What left the site</h2>'
        f"<p>{len(out)} replies checked against the egress allow-list; {_bytes(total)} of model arrays sent in all. "
        "Only model arrays and the listed scalar metrics can leave; the digest is the SHA-256 of the arrays sent, "
        "checked against the update the round recorded before releasing it.</p>"
        + _table(("run", "round", "time", "message", "arrays", "bytes", "digest", "digest check",
                  "scalar metrics / reason"), rows, row_classes=classes)
        + "</section>"
    )


def _keys(records: list[dict[str, Any]]) -> str:
    events = [
        (_short_time(r.get("time")), _e("created" if r.get("kind") == KIND_KEY_CREATED else "rotated"),
         f"<code>{_e(r.get('key_id'))}</code>", f"<code>{_e(r.get('previous_key_id', ''))}</code>")
        for r in records if r.get("kind") in (KIND_KEY_CREATED, KIND_KEY_ROTATED)
    ]
    seals = [r for r in records if r.get("kind") == KIND_SEAL]
    reasons = Counter(str(r.get("reason")) for r in seals)
    last = seals[-1] if seals else None
    seal_text = (
        f"{len(seals)} seals ({', '.join(f'{v} {k}' for k, v in reasons.most_common())}); "
        f"the last, #{_e(last.get('seq'))}, "
        f"at {_short_time(last.get('time'))} with key <code>{_e(last.get('key_id'))}</code>."
        if last
        else "no seals"
    )
    return (
        '<section id="keys"><h2>Signing keys and seals</h2>'
        + _table(("when", "event", "key", "previous key"), events)
        + f"<p>{seal_text}</p></section>"
    )


# ---- the page -------------------------------------------------------------------------------------
def build_report(directory: Path, *, public_key: bytes | None = None) -> tuple[str, VerifyResult]:
    """The report's HTML and the verification it is headed by."""
    directory = Path(directory)
    result = verify_trail(directory, public_key=public_key)
    records = read_records(directory)
    times = [t for r in records if (t := _time(r.get("time"))) is not None]
    span = f"from {min(times):%Y-%m-%d %H:%M} to {max(times):%Y-%m-%d %H:%M} UTC" if times else "no records"
    body = "".join((
        _verification(result), _files(records), _actions(records), _policy(records), _privacy(records),
        _egress(records), _keys(records),
    ))
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' "
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        f"<title>Audit report: {_e(directory.name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>Audit report</h1><p class='meta'>trail folder <code>{_e(directory.resolve())}</code>; "
        f"{len(records)} records {span}; generated {_short_time(utc_now())} by medfed</p>"
        f"{body}</body></html>\n"
    )
    return page, result


def write_report(directory: Path, out: Path, *, public_key: bytes | None = None) -> VerifyResult:
    """Write the report to ``out`` (atomically) and return the verification result it shows."""
    page, result = build_report(directory, public_key=public_key)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, page)
    return result
