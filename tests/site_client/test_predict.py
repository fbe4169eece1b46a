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


# ---- the scoring pipeline: a reader thread (CPU) or worker processes, the same scores ---------------
def test_reader_thread_and_worker_processes_score_as_the_model_does_on_preprocess(pacs: Path, tmp_path: Path) -> None:
    """predictions.csv is the network's output on models.preprocess's tensors, whoever reads the files and
    whatever thread count the tuning tries on the way (batches of one: the tuner runs)."""
    from models.preprocess import preprocess, read_dicom
    from site_client.inference import predict_folder, probabilities

    release, kit = _release(tmp_path)
    rel = verify_release(release, _raw(kit))
    threads = torch.get_num_threads()
    tables = {}
    for workers in (0, 2):
        summary = predict_folder(rel, pacs, tmp_path / f"out{workers}", thresholds=(0.5,), threshold_label="t",
                                 batch_size=1, workers=workers, progress=False)
        assert torch.get_num_threads() == threads  # the tuner gives the threads back
        rows = list(csv.DictReader((tmp_path / f"out{workers}" / "predictions.csv").open()))
        tables[workers] = rows
        assert (tmp_path / f"out{workers}" / "unusable.csv").read_text().count("\n") == 3  # header, mr, notes
        timing = summary.timing
        assert timing is not None and timing.images == len(rows) and timing.model_s > 0
        assert (timing.read_cpu_s > 0) == (workers == 0)
    from models.registry import build_network

    model = build_network(rel.study).eval()  # the plain way: fresh weights, then the release's copied in
    model.load_state_dict(rel.state_dict)
    for rows in tables.values():
        assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)  # the scan's order
        for r in rows:
            x = torch.from_numpy(preprocess(read_dicom(pacs / r["path"]), rel.study).arrays[0])[None]
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


class _Items:
    """A dataset of ``n`` items that raises at ``fail`` (if given) and counts what was read."""

    def __init__(self, n: int, fail: int | None = None) -> None:
        self.n, self.fail, self.read = n, fail, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i == self.fail:
            raise RuntimeError("disk gone")
        self.read += 1
        return i


def test_reader_thread_stops_when_scoring_stops_and_passes_on_its_error() -> None:
    import threading

    from site_client.inference import Timing, _read_in_thread

    interval = sys.getswitchinterval()
    items = _Items(10_000)
    reader = _read_in_thread(items, 4, Timing())  # type: ignore[arg-type]
    assert [next(reader) for _ in range(3)] == [0, 1, 2]
    assert sys.getswitchinterval() < interval  # the network gets the GIL back quickly between operations
    reader.close()  # the caller stops (an error in the network, Ctrl-C): the thread ends, reads no more
    assert not any(t.name == "medfed-predict-reader" for t in threading.enumerate())
    assert items.read < 20
    assert sys.getswitchinterval() == interval
    failing = _read_in_thread(_Items(10, fail=3), 4, Timing())  # type: ignore[arg-type]
    got = []
    with pytest.raises(RuntimeError, match="disk gone"):
        for i in failing:
            got.append(i)
    assert got == [0, 1, 2] and sys.getswitchinterval() == interval


def test_thread_tuner_tries_a_core_for_the_reader_only_when_reading_costs_and_keeps_the_faster() -> None:
    from site_client.inference import _ThreadTuner

    def run(read_per_image: float, faster: int, cores: float = 4.0) -> list[int]:
        tuner, tried = _ThreadTuner(4, enabled=True, trial=2), []
        for _ in range(8):
            n = tuner.threads()
            tried.append(n)
            seconds = 0.032 if n == faster else 0.064  # 1 or 2 ms per image
            tuner.record(n, 32, seconds, seconds * cores, read_per_image)
        return tried

    assert run(0.0001, faster=3) == [4] * 8  # reading is cheap, the cores are ours: all cores, no trial
    assert run(0.0001, faster=3, cores=2.5) == [4, 3, 3, 3, 3, 3, 3, 3]  # a crowded machine: fewer may pay
    assert run(0.0001, faster=4, cores=2.5) == [4, 3, 3, 4, 4, 4, 4, 4]
    assert run(0.001, faster=3) == [4, 4, 4, 3, 3, 3, 3, 3]
    assert run(0.001, faster=4) == [4, 4, 4, 3, 3, 4, 4, 4]
    off = _ThreadTuner(4, enabled=False)
    for _ in range(4):
        assert off.threads() == 4
        off.record(4, 32, 1.0, 4.0, 1.0)
