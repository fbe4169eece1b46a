"""The model at work: `medfed predict` on PACS-like DICOM, results as DICOM SR and Secondary Capture,
and the operating point calibrated at the site.

The release is signed by a test key; the images are `medfed synth`'s raw CT (full of fake PHI, as PACS
sends them), plus files the study cannot use. The SRs are read back with highdicom and DCMTK's
`dsrdump`, and checked by `dciodvfy`; a missing tool skips on a laptop and fails under CI=true.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from coordinator.federation import initial_state
from medfed.settings import RunConfig
from medfed.signing import Signer as AuditSigner
from models.release import RELEASE_PUBLIC_KEY, model_card, verify_release, write_release
from models.study import DEFAULT_STUDY
from tests.models_factory import make_store

pytestmark = pytest.mark.integration

MEDFED = str(Path(sys.executable).parent / "medfed")
STUDY = DEFAULT_STUDY.model_copy(update={"name": "nodule", "image_size": 32})


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing: `make test` installs it (Debian packages dcmtk, dicom3tools)")
        pytest.skip(f"{name} not installed (Debian dcmtk / dicom3tools); CI runs this test")
    return path


def _release(root: Path, state: dict | None = None) -> tuple[Path, Path]:
    """A signed release of the study (untrained weights unless given) and the kit holding its public key."""
    signer = AuditSigner.generate()
    cfg = RunConfig().with_overrides(study=STUDY.canonical_json())
    card = model_card(study=STUDY, run_name="test", rounds=1, fab_sha256="0" * 64, metrics={}, sites={})
    release = write_release(root / "release", state or initial_state(cfg), STUDY, card, signer)
    kit = root / "kit"
    kit.mkdir()
    (kit / RELEASE_PUBLIC_KEY).write_bytes(signer.public_pem())
    return release, kit


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two raw synthetic CT studies as PACS would export them, plus an MR and a text file."""
    from medfed.synth import generate_hospitals

    root = tmp_path_factory.mktemp("pacs")
    info = generate_hospitals(root / "synth", sites=1, patients=2, seed=2, burned_in_fraction=0.0)[0]
    src = root / "incoming"
    shutil.copytree(info.dicom_dir, src)
    shutil.copy(get_testdata_file("MR_small.dcm"), src / "mr.dcm")
    (src / "notes.txt").write_text("not DICOM")
    return src


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([MEDFED, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_predict_writes_one_row_per_image_and_lists_what_it_cannot_use(pacs: Path, tmp_path: Path) -> None:
    release, kit = _release(tmp_path)
    out = tmp_path / "out"
    done = _run("predict", str(release), str(pacs), "--out", str(out), "--public-key", str(kit), "--no-progress")
    assert done.returncode == 0, done.stdout + done.stderr
    ct = [p for p in pacs.rglob("*") if p.is_file() and p.suffix != ".txt" and p.name != "mr.dcm"]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == len(ct)
    sops = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct}
    assert {r["sop_instance_uid"] for r in rows} == sops
    assert all(0.0 <= float(r["score_present"]) <= 1.0 and r["decision"] in ("absent", "present") for r in rows)
    assert all(r["threshold"] == "study" for r in rows)
    unusable = {r["path"]: r["reason"] for r in csv.DictReader((out / "unusable.csv").open())}
    assert set(unusable) == {"mr.dcm", "notes.txt"}
    assert "modality MR" in unusable["mr.dcm"] and "not readable DICOM" in unusable["notes.txt"]
    assert f"{len(ct)} image(s)" in done.stdout and "2 unusable" in done.stdout


def test_sr_per_study_traces_back_to_the_model_and_passes_dciodvfy_and_dsrdump(pacs: Path, tmp_path: Path) -> None:
    release, kit = _release(tmp_path)
    rel = verify_release(release, _raw(kit))
    out = tmp_path / "out"
    done = _run("predict", str(release), str(pacs), "--out", str(out), "--public-key", str(kit), "--sr",
                "--threshold", "0.5", "--no-progress")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    studies = {r["study_instance_uid"] for r in rows}
    srs = sorted((out / "sr").glob("*.dcm"))
    assert {p.stem for p in srs} == studies
    for path in srs:
        sr = hd.sr.srread(path)
        assert sr.StudyInstanceUID == path.stem and sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
        text = json.dumps(sr.to_json_dict())
        assert rel.device_uid in text and rel.weights_sha256[:20] in text  # the model, exactly
        referenced = {r["sop_instance_uid"] for r in rows if r["study_instance_uid"] == path.stem}
        assert all(uid in text for uid in referenced)
        groups = sr.content.get_image_measurement_groups() if hasattr(sr.content, "get_image_measurement_groups") \
            else None
        assert groups is None or len(groups) == len(referenced)
    dciodvfy = _tool("dciodvfy")
    for path in srs:
        check = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=120)
        errors = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"
    dsrdump = _tool("dsrdump")
    dump = subprocess.run([dsrdump, str(srs[0])], capture_output=True, text=True, timeout=120)
    assert dump.returncode == 0 and "Probability of present" in dump.stdout
    assert "Imaging Measurement Report" in dump.stdout


def test_explain_writes_a_valid_secondary_capture_per_image(pacs: Path, tmp_path: Path) -> None:
    release, kit = _release(tmp_path)
    out = tmp_path / "out"
    done = _run("predict", str(release), str(pacs), "--out", str(out), "--public-key", str(kit), "--explain",
                "--no-progress")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    maps = sorted((out / "explain").glob("*.dcm"))
    assert len(maps) == len(rows)
    sc = pydicom.dcmread(maps[0])
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.PhotometricInterpretation == "RGB"
    assert sc.pixel_array.shape == (32, 32, 3) and sc.pixel_array.std() > 0
    assert "Grad-CAM" in sc.DerivationDescription
    dciodvfy = _tool("dciodvfy")
    check = subprocess.run([dciodvfy, str(maps[0])], capture_output=True, text=True, timeout=120)
    assert not [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]


@pytest.mark.adversarial
def test_predict_refuses_a_tampered_release_and_writes_nothing(pacs: Path, tmp_path: Path) -> None:
    release, kit = _release(tmp_path)
    state = torch.load(release / "model.pt", weights_only=True)
    key = next(iter(state))
    state[key] = state[key] + 1.0  # a swapped model under the genuine card and signature
    torch.save(state, release / "model.pt")
    out = tmp_path / "out"
    done = _run("predict", str(release), str(pacs), "--out", str(out), "--public-key", str(kit))
    assert done.returncode == 1 and "error: refused" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_calibration_reaches_the_target_sensitivity_and_binds_to_the_weights(tmp_path: Path) -> None:
    from models.dataset import StudyDataset
    from models.training import train_local
    from site_client.task import site_network

    store = tmp_path / "store"
    make_store(store, n_patients=24, images_per_patient=2, size=32, seed=5)
    model = site_network(STUDY)
    train_local(model, StudyDataset(store, STUDY, split="train"), epochs=6, batch_size=16, lr=0.02, seed=0,
                optimizer="adam")
    release, kit = _release(tmp_path, {k: v.detach() for k, v in model.state_dict().items()})
    done = _run("model", "calibrate", str(release), str(store), "--target-sensitivity", "0.9",
                "--public-key", str(kit))
    assert done.returncode == 0, done.stdout + done.stderr
    cal = json.loads((tmp_path / "release.calibration.json").read_text())
    assert cal["chosen_on"]["present"][0] >= 0.9  # the target is met where it was chosen
    assert cal["weights_sha256"] == verify_release(release, _raw(kit)).weights_sha256
    assert "sens. (test)" in done.stdout
    raw = tmp_path / "raw"
    raw.mkdir()
    for p in list(store.rglob("*.dcm"))[:3]:
        shutil.copy(p, raw / p.name)
    out = tmp_path / "out"
    auto = _run("predict", str(release), str(raw), "--out", str(out), "--public-key", str(kit), "--threshold",
                "auto", "--no-progress")
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert {r["threshold"] for r in csv.DictReader((out / "predictions.csv").open())} == {"auto"}
    # A calibration of other weights is not used for this release.
    cal["weights_sha256"] = "f" * 64
    (tmp_path / "release.calibration.json").write_text(json.dumps(cal))
    stale = _run("predict", str(release), str(raw), "--out", str(tmp_path / "o2"), "--public-key", str(kit),
                 "--threshold", "auto")
    assert stale.returncode == 2 and "other weights" in stale.stderr


def _raw(kit: Path) -> bytes:
    from models.release import public_key_of

    return public_key_of(kit)


# ---- results back to PACS: `medfed predict --send` ------------------------------------------------
@pytest.mark.deployment
def test_send_stores_the_srs_and_saliency_maps_in_orthanc(pacs: Path, tmp_path: Path, orthanc) -> None:
    release, kit = _release(tmp_path)
    rel = verify_release(release, _raw(kit))
    peer = orthanc({})
    out = tmp_path / "out"
    done = _run("predict", str(release), str(pacs), "--out", str(out), "--public-key", str(kit), "--sr", "--explain",
                "--no-progress", "--send", f"{peer.aet}@127.0.0.1:{peer.dicom}", "--send-ae-title", "MEDFED_SITE")
    assert done.returncode == 0, done.stdout + done.stderr
    ours = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
            for p in [*(out / "sr").glob("*.dcm"), *(out / "explain").glob("*.dcm")]}
    assert len(ours) > 2 and f"sent {len(ours)}, failed 0" in done.stdout
    stored = {}
    for orthanc_id in peer.rest("GET", "/instances"):  # type: ignore[union-attr]
        tags = peer.rest("GET", f"/instances/{orthanc_id}/simplified-tags")
        stored[tags["SOPInstanceUID"]] = orthanc_id  # type: ignore[index]
    assert set(stored) == set(ours)
    for uid, path in ours.items():
        if path.parent.name != "sr":
            continue
        copy = tmp_path / f"orthanc-{uid}.dcm"
        copy.write_bytes(peer.rest("GET", f"/instances/{stored[uid]}/file"))  # type: ignore[arg-type]
        sr = hd.sr.srread(copy)  # Orthanc's copy is a Comprehensive 3D SR that names the model
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34" and sr.SOPInstanceUID == uid
        assert rel.device_uid in json.dumps(sr.to_json_dict())
        study = peer.rest("GET", f"/instances/{stored[uid]}/study")
        assert study["MainDicomTags"]["StudyInstanceUID"] == path.stem  # type: ignore[index]
    sent = list(csv.DictReader((out / "sent.csv").open()))
    assert len(sent) == len(ours) and {r["sent"] for r in sent} == {"yes"}


def test_send_to_a_closed_port_exits_non_zero_naming_what_was_not_sent(pacs: Path, tmp_path: Path) -> None:
    from tests.dicom_peers import free_port

    release, kit = _release(tmp_path)
    out = tmp_path / "out"
    done = _run("predict", str(release), str(pacs), "--out", str(out), "--public-key", str(kit), "--sr",
                "--no-progress", "--send", f"PACS@127.0.0.1:{free_port()}", "--send-tries", "2")
    text = " ".join(done.stdout.split())
    assert done.returncode == 3, done.stdout + done.stderr
    srs = sorted((out / "sr").glob("*.dcm"))
    assert srs, "the results stay in OUT"
    assert f"sent 0, failed {len(srs)} of {len(srs)}" in text
    for path in srs:
        assert f"not sent: sr/{path.name}: cannot connect: [Errno 111] Connection refused (after 2 tries)" in text
    assert f"{len(srs)} file(s) not sent" in done.stderr and "Traceback" not in done.stderr
    assert {r["sent"] for r in csv.DictReader((out / "sent.csv").open())} == {"no"}


@pytest.mark.deployment
def test_send_delivers_what_predict_could_not_and_nothing_twice(pacs: Path, tmp_path: Path, orthanc) -> None:
    """PACS down during predict: `medfed send OUT` later sends only what sent.csv does not list as sent."""
    from tests.dicom_peers import free_port

    release, kit = _release(tmp_path)
    out = tmp_path / "out"
    first = _run("predict", str(release), str(pacs), "--out", str(out), "--public-key", str(kit), "--sr",
                 "--no-progress", "--send", f"PACS@127.0.0.1:{free_port()}", "--send-tries", "1")
    assert first.returncode == 3 and f"medfed send {out}" in " ".join(first.stderr.split())
    report = out / "sent.csv"
    rows = list(csv.DictReader(report.open()))
    assert len(rows) >= 2 and {r["sent"] for r in rows} == {"no"}
    rows[0]["sent"] = "yes"  # as if this one had got through: it must not be sent again
    with report.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    peer = orthanc({})
    target = f"{peer.aet}@127.0.0.1:{peer.dicom}"
    again = _run("send", str(out), "--send", target)
    assert again.returncode == 0, again.stdout + again.stderr
    stored = {peer.rest("GET", f"/instances/{i}/simplified-tags")["SOPInstanceUID"]  # type: ignore[index]
              for i in peer.rest("GET", "/instances")}  # type: ignore[union-attr]
    assert stored == {r["sop_instance_uid"] for r in rows[1:]}
    after = list(csv.DictReader(report.open()))
    assert sorted(r["path"] for r in after) == sorted(r["path"] for r in rows)  # the report still covers every file
    assert {r["sent"] for r in after} == {"yes"}
    assert {r["target"] for r in after if r["path"] != rows[0]["path"]} == {target}
    third = _run("send", str(out), "--send", target)
    assert third.returncode == 0 and "nothing left to send" in third.stdout
    assert len(peer.rest("GET", "/instances")) == len(stored)  # type: ignore[arg-type]


def test_send_says_what_is_wrong_with_its_folder(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medfed.cli import app

    empty = tmp_path / "empty"
    empty.mkdir()
    done = CliRunner().invoke(app, ["send", str(empty), "--send", "PACS@127.0.0.1:104"])
    assert done.exit_code == 2 and "holds no results" in " ".join(done.output.split())
    (empty / "sr").mkdir()
    (empty / "sr" / "a.dcm").write_bytes(b"x")
    (empty / "sent.csv").write_text("who,what\n1,2\n")
    done = CliRunner().invoke(app, ["send", str(empty), "--send", "PACS@127.0.0.1:104"])
    assert done.exit_code == 2 and "is not a send report" in " ".join(done.output.split())
    assert isinstance(done.exception, SystemExit)


@pytest.mark.parametrize(("extra", "message"), [
    (["--sr", "--send", "PACS@pacs.local"], "is not AE@HOST:PORT"),
    (["--send", "PACS@pacs.local:104"], "--send stores the results as DICOM: add --sr"),
    (["--sr", "--send", "PACS@pacs.local:104", "--send-tls-cert", "c.pem"], "TLS needs all three of --send-tls"),
    (["--sr", "--send", "PACS@pacs.local:104", "--send-tls-cert", "c.pem", "--send-tls-key", "k.pem",
      "--send-tls-ca", "ca.pem"], "c.pem does not exist; pass the PEM file"),
    (["--sr", "--send", "PACS@pacs.local:104", "--send-ae-title", "NOT\\AN_AE"], "--send-ae-title"),
])
def test_send_options_are_checked_before_anything_is_scored(pacs: Path, tmp_path: Path, extra: list[str],
                                                             message: str) -> None:
    from typer.testing import CliRunner

    from medfed.cli import app

    release, kit = _release(tmp_path)
    out = tmp_path / "out"
    done = CliRunner().invoke(app, ["predict", str(release), str(pacs), "--out", str(out), "--public-key", str(kit),
                                    *extra])
    assert done.exit_code == 2, done.output
    assert message in " ".join(done.output.split())
    assert isinstance(done.exception, SystemExit), done.exception  # a clear message, no traceback
    assert not out.exists()


# ---- the scoring pipeline: reader processes (or this process), the same scores ---------------------
def test_reader_processes_and_in_process_reading_score_as_the_model_does_on_preprocess(pacs: Path,
                                                                                        tmp_path: Path) -> None:
    """predictions.csv is the network's output on models.preprocess's tensors, whoever reads the files."""
    from models.preprocess import preprocess, read_dicom
    from site_client.inference import predict_folder, probabilities

    release, kit = _release(tmp_path)
    rel = verify_release(release, _raw(kit))
    threads = torch.get_num_threads()
    tables = {}
    for workers in (0, 2):
        summary = predict_folder(rel, pacs, tmp_path / f"out{workers}", thresholds=(0.5,), threshold_label="t",
                                 batch_size=1, workers=workers, progress=False)
        assert torch.get_num_threads() == threads
        rows = list(csv.DictReader((tmp_path / f"out{workers}" / "predictions.csv").open()))
        tables[workers] = rows
        assert (tmp_path / f"out{workers}" / "unusable.csv").read_text().count("\n") == 3  # header, mr, notes
        timing = summary.timing
        assert timing is not None and timing.images == len(rows) and timing.model_s > 0
        assert timing.read == len(rows) + 2 and timing.read_cpu_s > 0  # the readers' CPU comes back with them
    from models.registry import build_network

    model = build_network(rel.study).eval()  # the plain way: fresh weights, then the release's copied in
    model.load_state_dict(rel.state_dict)
    for rows in tables.values():
        assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)  # the scan's order
        for r in rows:
            ds = read_dicom(pacs / r["path"])
            assert (r["sop_instance_uid"], r["study_instance_uid"]) == (ds.SOPInstanceUID, ds.StudyInstanceUID)
            x = torch.from_numpy(preprocess(ds, rel.study).arrays[0])[None]
            with torch.inference_mode():
                expected = float(probabilities(model(x), rel.study)[0, 0])
            assert abs(float(r["score_present"]) - expected) <= 2e-6, r["path"]
    strip = [{k: v for k, v in r.items() if k != "score_present"} for r in tables[0]]
    assert strip == [{k: v for k, v in r.items() if k != "score_present"} for r in tables[2]]


def test_load_model_takes_every_weight_from_the_release_and_none_is_left_unloaded(tmp_path: Path) -> None:
    """Built on the meta device, the network must end with every tensor real and equal to the release's."""
    from site_client.inference import load_model

    release, kit = _release(tmp_path)
    rel = verify_release(release, _raw(kit))
    model = load_model(rel, "cpu")
    state = model.state_dict()
    assert set(state) == set(rel.state_dict)
    assert all(torch.equal(state[k], v) and state[k].dtype == v.dtype for k, v in rel.state_dict.items())
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert not model.training and all(p.requires_grad for p in model.parameters())
    x = torch.zeros(1, rel.study.in_channels, rel.study.image_size, rel.study.image_size)
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "image_dfl.dcm", "SC_rgb.dcm"])
def test_the_header_a_reader_hands_over_is_the_files_header_without_its_pixels(name: str) -> None:
    """The SR and saliency maps are built from what the reader passed on: every attribute but the pixels,
    whether that travels as the file's leading bytes (explicit or implicit VR) or as the header (deflated)."""
    from models.preprocess import read_dicom_bytes
    from site_client.inference import SourceHeader, _header_of

    path = Path(get_testdata_file(name))
    ds, data = read_dicom_bytes(path)
    raw = _header_of(data, ds)
    assert isinstance(raw, bytes) == ("dfl" not in name)
    header = SourceHeader("", "", "", raw).dataset
    expected = pydicom.dcmread(path, stop_before_pixels=True)
    assert "PixelData" not in header
    assert [e.tag for e in header] == [e.tag for e in expected]
    assert all(header[e.tag].value == e.value for e in expected if e.VR != "SQ")
    assert header.file_meta.TransferSyntaxUID == expected.file_meta.TransferSyntaxUID


@pytest.mark.adversarial
def test_a_file_that_kills_its_reader_is_listed_and_the_rest_are_scored(pacs: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder crashing on a hostile file (here: the reader process exiting on one file, as a segfault
    would) must cost that file only, not the run, and leave no reader process behind."""
    import multiprocessing

    import site_client.inference as inference

    release, kit = _release(tmp_path)
    rel = verify_release(release, _raw(kit))
    files = inference.source_files(pacs)
    victim = next(p for p in files if p.suffix == ".dcm" and p.name != "mr.dcm")
    real = inference._read_file

    def crashing(path: Path, index: int, study: object) -> object:
        if path == victim:
            os._exit(139)  # the reader process dies mid-file (forked readers inherit this patch)
        return real(path, index, study)

    monkeypatch.setattr(inference, "_read_file", crashing)
    summary = inference.predict_folder(rel, pacs, tmp_path / "out", thresholds=(0.5,), threshold_label="t",
                                       batch_size=4, workers=2, progress=False)
    dead = [(p, r) for p, r in summary.unusable if r == inference.READER_DIED]
    assert dead == [(str(victim.relative_to(pacs)), inference.READER_DIED)]
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert {r["path"] for r in rows} == {str(p.relative_to(pacs)) for p in files
                                        if p.suffix == ".dcm" and p not in (victim, pacs / "mr.dcm")}
    assert not multiprocessing.active_children()


def test_readers_end_once_the_last_turn_is_read(pacs: Path) -> None:
    """The last batches score with no idle reader beside them (idle readers cost a long network a few %)."""
    import multiprocessing

    from models.registry import build_network
    from site_client.inference import files_per_turn, score_batches, source_files

    files = source_files(pacs) * 13
    assert len(files) > 2 * files_per_turn(STUDY, 2)  # three turns or more
    model = build_network(STUDY).eval()
    alive = [bool(multiprocessing.active_children()) for _ in score_batches(
        lambda: model, files, STUDY, device="cpu", batch_size=2, workers=2)]
    assert alive[0] and not alive[-1]


def test_readers_live_for_the_scan_and_end_with_it(pacs: Path) -> None:
    """Forked once (not each turn), the readers end with the scan however it ends (an error, Ctrl-C)."""
    import multiprocessing

    from site_client.inference import _Readers, source_files

    files = source_files(pacs) * 10
    with _Readers(files, STUDY, 2) as readers:
        pending = readers.submit(0, 20)
        first = {p.pid for p in multiprocessing.active_children()}
        assert len(first) == 2
        reads = readers.collect(0, 20, pending)
        assert [r.index for r in reads] == list(range(20))
        assert readers.collect(20, 30, readers.submit(20, 30))[0].index == 20
        assert {p.pid for p in multiprocessing.active_children()} == first  # the same two, not forked again
        readers.submit(30, 40)  # started, never collected: the scan stops here
    assert not multiprocessing.active_children()
