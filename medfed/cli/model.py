"""`medfed model ...`: sign a run's model as the consortium's release, and verify one before use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from medfed.cli.output import console, fail, figure

if TYPE_CHECKING:
    from anonymization.intake import TlsFiles
    from site_client.send import Target

_TlsParts = tuple[Path | None, Path | None, Path | None]
model_app = typer.Typer(help="The consortium's signed model releases: release, verify, calibrate.",
                        no_args_is_help=True)

# The --send options, shared by `predict` and `send`. Their defaults are site_client.send's (which this light
# module does not import; tests/site_client/test_send.py checks they agree).
_SEND_AE_DEFAULT, _SEND_TRIES_DEFAULT, _SEND_TIMEOUT_DEFAULT = "MEDFED", 3, 30.0
_SEND_HELP = "Store the SRs and saliency maps in PACS by C-STORE: AE@HOST:PORT."
_SEND_AE = Annotated[str, typer.Option("--send-ae-title", help="Our calling AE title for --send.")]
_SEND_CERT = Annotated[Path | None, typer.Option("--send-tls-cert", help="Our client certificate (PEM).")]
_SEND_KEY = Annotated[Path | None, typer.Option("--send-tls-key", help="Its private key (PEM).")]
_SEND_CA = Annotated[Path | None, typer.Option(
    "--send-tls-ca", help="CA that issued the PACS's certificate (PEM); no other is trusted.")]
_SEND_TRIES = Annotated[int, typer.Option("--send-tries", min=1, max=10, help="Tries per file.")]
_SEND_TIMEOUT = Annotated[float, typer.Option(
    "--send-timeout", min=0.1, help="Seconds to wait for each step of the PACS's answers.")]
_RELEASE = Annotated[Path, typer.Argument(help="A release folder (model.pt, study.json, card.json, signature).")]
_PUBLIC = Annotated[Path, typer.Option(
    "--public-key",
    help="The consortium's release public key: release-signing.pub, or the site kit folder holding it.")]



@model_app.command("release")
def release(
    run_dir: Annotated[Path, typer.Argument(help="The run's output folder (its out-dir: metrics.json, model.pt).")],
    key: Annotated[Path, typer.Option("--key", help="The consortium's release key (release-signing.key).")],
    server_round: Annotated[int | None, typer.Option(
        "--round", min=1, help="Release the checkpoint of this round instead of the final model.")] = None,
    out: Annotated[Path | None, typer.Option(help="Release folder to write (default: RUN_DIR/release).")] = None,
) -> None:
    """Sign a run's model, its study and its model card as a release the sites can verify."""
    from coordinator.release import release_run
    from medfed.settings import ConfigError
    from medfed.signing import KeyFileError, load_signing_key
    from models.release import RELEASE_KEY_WHAT, ReleaseError

    try:
        path = release_run(run_dir, load_signing_key(key, what=RELEASE_KEY_WHAT), server_round=server_round, out=out)
    except (ReleaseError, KeyFileError, ConfigError) as err:
        fail(str(err))
    console.print(f"release written and signed: {path}")


@model_app.command("verify")
def verify(release_dir: _RELEASE, public_key: _PUBLIC) -> None:
    """Check a release's signature and every file's hash; print its model card. Exit 1 if it must not be used."""
    from models.release import ReleaseError, public_key_of, verify_release

    try:
        rel = verify_release(release_dir, public_key_of(public_key))
    except ReleaseError as err:
        console.print(f"[bold red]refused:[/] {err}")
        raise typer.Exit(1) from None
    print_card(rel.card, rel.key_id)


def print_card(card: dict, key_id: str) -> None:
    """The model card as a person reads it."""
    console.print(f"[bold green]verified[/]: signed by release key {key_id}")
    table = Table(title=f"model card: {card.get('name')}", show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value")
    for field in ("network", "task", "modality", "image_size", "run", "rounds", "medfed_version", "date",
                  "fab_sha256", "weights_sha256", "device_uid", "study_sha256"):
        table.add_row(field, str(card.get(field)))
    table.add_row("classes", ", ".join(card.get("classes", [])))
    table.add_row("preprocessing", json.dumps(card.get("preprocessing", {}), separators=(",", ":")))
    console.print(table)
    sites = Table(title="sites (their own DP releases)")
    for col in ("site", "ε", "ε cap", "δ", "AUC"):
        sites.add_column(col, justify="right" if col != "site" else "left")
    for name, s in card.get("sites", {}).items():
        m = s.get("metrics", {})
        auc = m.get("macro", m).get("auc")
        sites.add_row(name, figure(s.get("epsilon")), figure(s.get("epsilon_cap")), f"{s.get('delta')}", figure(auc))
    console.print(sites)
    pooled = card.get("metrics", {})
    macro = pooled.get("macro", pooled)
    if macro:
        console.print("pooled (macro): " + ", ".join(f"{k} {figure(v)}" for k, v in macro.items()
                                                     if isinstance(v, int | float)))
    for name, row in pooled.get("per-class", {}).items():
        console.print(f"  {name}: " + ", ".join(f"{k} {figure(v)}" for k, v in row.items()
                                                 if isinstance(v, int | float)))



def _verified(release_dir: Path, public_key: Path):  # noqa: ANN202 - models.release.Release, imported lazily
    from models.release import ReleaseError, public_key_of, verify_release

    try:
        return verify_release(release_dir, public_key_of(public_key))
    except ReleaseError as err:
        fail(f"refused: {err}", code=1)


@model_app.command("calibrate")
def calibrate(
    release_dir: _RELEASE,
    deid_dir: Annotated[Path, typer.Argument(help="This site's labelled de-identified store.")],
    target_sensitivity: Annotated[float, typer.Option(
        "--target-sensitivity", min=0.0, max=1.0, help="Sensitivity the operating point must reach, e.g. 0.9.")],
    public_key: _PUBLIC,
) -> None:
    """Choose the operating point on this site's own labelled store (nothing leaves); predict --threshold auto."""
    from medfed.settings import ConfigError
    from models.dataset import DatasetError
    from site_client.calibration import CalibrationError, calibrate, save

    rel = _verified(release_dir, public_key)
    try:
        cal = calibrate(rel, deid_dir, target_sensitivity)
    except (CalibrationError, DatasetError, ConfigError) as err:
        fail(str(err))
    path = save(rel, cal)
    table = Table(title=f"operating point at sensitivity ≥ {target_sensitivity:g} (chosen on the train split)")
    for col in ("class", "threshold", "sens. (train)", "spec. (train)", "sens. (test)", "spec. (test)"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for (name, (s1, p1)), t in zip(cal.chosen_on.items(), cal.thresholds, strict=True):
        s2, p2 = cal.test[name]
        table.add_row(name, f"{t:.4f}", figure(s1), figure(p1), figure(s2), figure(p2))
    console.print(table)
    console.print(f"{cal.images['train']} train and {cal.images['test']} test images; written to {path}")


def predict(
    release_dir: _RELEASE,
    src: Annotated[Path, typer.Argument(help="Folder of DICOM files as they come from PACS.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for predictions.csv, unusable.csv, sr/, explain/.")],
    public_key: _PUBLIC,
    sr: Annotated[bool, typer.Option("--sr", help="Write one DICOM Comprehensive 3D SR per study.")] = False,
    threshold: Annotated[str, typer.Option(
        "--threshold", help="Decision threshold: a number in (0, 1), 'auto' (this site's calibration) or "
        "'study' (the study's own).")] = "study",
    explain: Annotated[bool, typer.Option("--explain", help="Grad-CAM saliency per image as Secondary Capture.")]
    = False,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    send: Annotated[str | None, typer.Option("--send", help=_SEND_HELP)] = None,
    send_ae_title: _SEND_AE = _SEND_AE_DEFAULT,
    send_tls_cert: _SEND_CERT = None,
    send_tls_key: _SEND_KEY = None,
    send_tls_ca: _SEND_CA = None,
    send_tries: _SEND_TRIES = _SEND_TRIES_DEFAULT,
    send_timeout: _SEND_TIMEOUT = _SEND_TIMEOUT_DEFAULT,
) -> None:
    """Score new studies with a verified release, at the site; results go only to the PACS --send names."""
    from medfed.settings import ConfigError
    from site_client.calibration import CalibrationError, load_thresholds
    from site_client.inference import PredictError, predict_folder

    if device not in ("cpu", "cuda"):
        fail(f"--device {device!r}: use cpu or cuda")
    tls = (send_tls_cert, send_tls_key, send_tls_ca)
    target = _send_target(send, send_ae_title, sr or explain, tls) if send else None
    rel = _verified(release_dir, public_key)
    study = rel.study
    columns = 1 if study.task == "binary" else len(study.classes)
    try:
        if threshold == "auto":
            thresholds = load_thresholds(rel)
        elif threshold == "study":
            thresholds = (study.metrics.threshold,) * columns
        else:
            value = float(threshold)
            if not 0.0 < value < 1.0:
                raise ValueError
            thresholds = (value,) * columns
    except CalibrationError as err:
        fail(str(err))
    except ValueError:
        fail(f"--threshold {threshold!r}: give a number between 0 and 1, 'auto' or 'study'")
    label = threshold if threshold in ("auto", "study") else "fixed"
    try:
        summary = predict_folder(rel, src, out, thresholds=thresholds, threshold_label=label, sr=sr, explain=explain,
                                 device=device, batch_size=batch_size, progress=not no_progress)
    except (PredictError, ConfigError) as err:
        fail(str(err))
    console.print(summary.line())
    for path, reason in summary.unusable[:20]:
        console.print(f"  unusable: {path}: {reason}")
    if len(summary.unusable) > 20:
        console.print(f"  … and {len(summary.unusable) - 20} more in {out / 'unusable.csv'}")
    console.print(f"predictions: {out / 'predictions.csv'}")
    if summary.srs:
        console.print(f"SR:          {len(summary.srs)} report(s) in {out / 'sr'}")
    if summary.saliency:
        console.print(f"saliency:    {len(summary.saliency)} image(s) in {out / 'explain'}")
    if target is not None:
        _send_results(summary.srs + summary.saliency, out, target, _tls_files(tls), send_ae_title, send_tries,
                      send_timeout)


def _tls_files(parts: _TlsParts) -> TlsFiles | None:
    from anonymization.intake import TlsFiles

    cert, key, ca = parts
    return TlsFiles(cert, key, ca) if cert and key and ca else None


def _send_target(text: str, calling_ae: str, writes_dicom: bool, tls: _TlsParts) -> Target:
    """Check --send and its TLS files before the images are scored, so a typo costs no inference run."""
    from site_client.send import SendError, check_calling_ae, client_tls, parse_target

    if not writes_dicom:
        fail("--send stores the results as DICOM: add --sr (and/or --explain)")
    if any(tls) and not all(tls):
        fail("TLS needs all three of --send-tls-cert, --send-tls-key and --send-tls-ca (or none of them)")
    try:
        target = parse_target(text)
        check_calling_ae(calling_ae)
        files = _tls_files(tls)
        if files is not None:
            client_tls(files)
    except SendError as err:
        fail(str(err))
    return target


def send_results(
    out: Annotated[Path, typer.Argument(help="The --out folder of `medfed predict` (its sr/ and explain/).")],
    send: Annotated[str, typer.Option("--send", help=_SEND_HELP)],
    all_files: Annotated[bool, typer.Option(
        "--all", help="Send every result again, not only those sent.csv does not list as sent.")] = False,
    send_ae_title: _SEND_AE = _SEND_AE_DEFAULT,
    send_tls_cert: _SEND_CERT = None,
    send_tls_key: _SEND_KEY = None,
    send_tls_ca: _SEND_CA = None,
    send_tries: _SEND_TRIES = _SEND_TRIES_DEFAULT,
    send_timeout: _SEND_TIMEOUT = _SEND_TIMEOUT_DEFAULT,
) -> None:
    """Send a predict run's results to PACS again, scoring nothing: by default only what was not sent."""
    from site_client.inference import EXPLAIN_DIR, SR_DIR
    from site_client.send import SEND_REPORT, SendError, read_report, unsent

    tls = (send_tls_cert, send_tls_key, send_tls_ca)
    target = _send_target(send, send_ae_title, True, tls)
    if not out.is_dir():
        fail(f"{out} is not a folder: give the --out folder of `medfed predict`")
    results = sorted([*(out / SR_DIR).glob("*.dcm"), *(out / EXPLAIN_DIR).glob("*.dcm")])
    if not results:
        fail(f"{out} holds no results ({SR_DIR}/ or {EXPLAIN_DIR}/): run `medfed predict` with --sr or --explain")
    try:
        earlier = [] if all_files else read_report(out / SEND_REPORT)
    except SendError as err:
        fail(str(err))
    paths = unsent(results, earlier, out)
    if not paths:
        console.print(f"send: nothing left to send: {out / SEND_REPORT} lists all {len(results)} result(s) as sent "
                      "(--all sends them again)")
        return
    _send_results(paths, out, target, _tls_files(tls), send_ae_title, send_tries, send_timeout, earlier)


def _send_results(paths: list[Path], out: Path, target: Target, tls: TlsFiles | None, calling_ae: str, tries: int,
                  timeout: float, earlier: list[dict[str, str]] | None = None) -> None:
    """C-STORE the results; a file not sent stays in OUT, is named, and the exit status says so."""
    from site_client.send import SEND_FAILED_EXIT, SEND_REPORT, SendError, send_files, write_report

    if not paths:
        console.print(f"send: nothing to send to {target} (no image was usable)")
        return
    try:
        report = send_files(paths, target, tls, calling_ae, tries, timeout)
    except SendError as err:
        fail(str(err))
    write_report(report, out / SEND_REPORT, out, earlier or ())
    console.print(f"send: {report.line()}")
    for o in report.failed[:20]:
        console.print(f"  not sent: {o.path.relative_to(out)}: {o.describe()}")
    if len(report.failed) > 20:
        console.print(f"  … and {len(report.failed) - 20} more in {out / SEND_REPORT}")
    if not report.ok:
        fail(f"{len(report.failed)} file(s) not sent to {target}; they stay in {out} "
             f"(listed in {out / SEND_REPORT}): fix the cause above, then `medfed send {out} --send {target}` "
             "sends what is left", SEND_FAILED_EXIT)
