"""A real site's trail: `medfed deid run` (with Clean Pixel Data) and real training rounds.

One module-scoped trail is built the way a site builds it: the `medfed deid run`
command over a source full of planted PHI (in headers, folder and file names and
burned into the pixels), then a round trained through the site's ClientApp and a
round it declines at a lowered cap. The tests check that each record carries what
issue 4 lists, against the files and replies themselves; that no identifier is
anywhere in the trail folder or the report (docs/design.md invariant 4); that a copy holding no
site secret verifies with the exported public key; and that the report renders
in headless Chromium.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from anonymization import pixels
from anonymization.audit import read_records
from anonymization.audit.keys import SIGNING_KEY_NAME, load_signing_key
from anonymization.audit.report import ACTION_MEANINGS
from anonymization.keys import load_or_create_secret
from coordinator.federation import initial_state
from medfed.cli import app as medfed
from medfed.protocol import SITE_DECLINED
from medfed.settings import RunConfig, SiteConfig
from medfed.wire import MODEL_ARRAY, pack
from site_client.client_app import build_app
from site_client.task import ledger_for, train_round
from tests.anonymization.test_deid_pixels import MRN, NAME, burned_ct
from tests.audit_factory import chromium, lines_of, locate, page_fetches, painted, render, visible_text, write_lines
from tests.dicom_factory import PHI_MARKERS, Patient, all_bytes_under, make_ct, write
from tests.models_factory import make_store

pytestmark = pytest.mark.integration
# A fixed noise multiplier (no calibration), so each round's spend is known in advance.
CFG = RunConfig().with_overrides(
    image_size=32,
    batch_size=8,
    lr=0.05,
    optimizer="sgd",
    local_epochs=1,
    noise_multiplier=1.0,
    calibrate_noise=False,
    num_server_rounds=3,
)
runner = CliRunner()


@dataclass
class SiteTrail:
    root: Path
    src: Path
    dst: Path
    audit: Path
    secret: bytes
    audit_key: Path
    originals: dict[str, pydicom.Dataset]  # relative source path -> data set
    replies: list[Message] = field(default_factory=list)
    site: SiteConfig | None = None

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.audit)


@pytest.fixture(scope="module")
def site_trail(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SiteTrail]:
    from flwr.supercore.task_identity import TaskIdentity

    root = tmp_path_factory.mktemp("site")
    src = root / "export"
    originals: dict[str, pydicom.Dataset] = {}
    for rel, ds in (
        ("Phiname0_Zelda PHIPID-837261-0/study0/img0.dcm", make_ct(Patient(0), instance=0)),
        ("Phiname0_Zelda PHIPID-837261-0/study0/img1.dcm", make_ct(Patient(0), instance=1)),
        ("Phiname1_Zelda/a.dcm", make_ct(Patient(1))),
        (f"{NAME} {MRN}/burned PHIACC99182.dcm", burned_ct()),  # name and MRN burned into the pixels
    ):
        write(ds, src / rel)
        originals[rel] = ds
    (src / "notes PHIPID-837261-0 Zelda.txt").write_text("Phiname0 Zelda: call back PHITEL5551234")
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "CT_small.dcm")
    originals["CT_small.dcm"] = pydicom.dcmread(src / "CT_small.dcm")

    key, dst = root / "keys" / "site.key", root / "deid"
    args = ["deid", "run", str(src), str(dst), "--key", str(key), "--no-progress"]
    if pixels.tesseract_available():
        args.append("--clean-pixels")
    result = runner.invoke(medfed, args)
    assert result.exit_code == 0, result.output
    trail = SiteTrail(root=root, src=src, dst=dst, audit=dst / "audit", secret=load_or_create_secret(key),
                      audit_key=key.parent / SIGNING_KEY_NAME, originals=originals)

    # Training rounds of the same site, sealing the same trail with the same key (found through it).
    store = root / "store"
    make_store(store, n_patients=16, images_per_patient=2, size=64, seed=1)
    names = ("_run_id", "_task_id", "_node_id")
    old = {n: getattr(TaskIdentity, n) for n in names}
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
    try:
        for server_round, cap in ((1, 50.0), (2, 0.01)):  # the cap lowered: a policy change, then a decline
            site = SiteConfig(name="hospital-t", data_dir=store, state_dir=root / "state", audit_dir=trail.audit,
                              epsilon_cap=cap, delta=1e-3)
            toml = root / "site.toml"
            toml.write_text(site.to_toml())
            ctx = Context(run_id=7, node_id=1, node_config={"site-config": str(toml)}, state=RecordDict(),
                          run_config={})
            msg = Message(content=RecordDict({"arrays": pack(initial_state(CFG)),
                                              "config": ConfigRecord({"server-round": server_round})}),
                          dst_node_id=1, message_type="train")
            trail.replies.append(build_app(CFG)(msg, ctx))
            trail.site = site
    finally:
        for n, v in old.items():
            setattr(TaskIdentity, n, v)
    assert not (root / "state" / SIGNING_KEY_NAME).exists()  # the site used the trail's key
    yield trail


def _by_kind(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == kind]


def test_deidentified_and_quarantined_records_match_the_files(site_trail: SiteTrail) -> None:
    records = site_trail.records()
    keyed = {hmac.new(site_trail.secret, (site_trail.src / rel).read_bytes(), hashlib.sha256).hexdigest(): rel
             for rel in [p.relative_to(site_trail.src).as_posix() for p in site_trail.src.rglob("*") if p.is_file()]}
    plain = {hashlib.sha256(p.read_bytes()).hexdigest() for p in site_trail.src.rglob("*") if p.is_file()}
    done = _by_kind(records, "deidentified")
    ocr = pixels.tesseract_available()  # without it, the burned-in image is quarantined instead of cleaned
    assert len(done) == (5 if ocr else 4)
    for r in done:
        rel = keyed[r["input_digest"]]  # the keyed digest (HMAC with the site secret) of one input
        assert r["input_digest"] not in plain
        output = site_trail.dst / r["path"]
        assert r["output_digest"] == hashlib.sha256(output.read_bytes()).hexdigest()
        ds = pydicom.dcmread(output)
        assert r["sop_uid"] == ds.SOPInstanceUID != site_trail.originals[rel].SOPInstanceUID
        assert r["actions"] and all(isinstance(v, int) and v > 0 for v in r["actions"].values())
        assert {"X", "U"} <= set(r["actions"]) <= set(ACTION_MEANINGS)  # by action code; the report explains each
        if "burned" in rel:
            assert r["pixel_cleaning"]["pixel_cleaning"] == "done" and r["pixel_cleaning"]["regions"] >= 1
        else:
            assert "pixel_cleaning" not in r
    quarantined = _by_kind(records, "quarantined")
    reasons = {keyed[r["input_digest"]]: r["reason"] for r in quarantined}
    assert reasons["notes PHIPID-837261-0 Zelda.txt"].startswith("not a DICOM file")
    assert all(r["reason"] for r in quarantined) and len(quarantined) == (1 if ocr else 2)
    run = _by_kind(records, "deid_run")[0]
    assert (run["files"], run["deidentified"], run["quarantined"]) == (6, len(done), len(quarantined))


def test_policy_key_and_seal_records(site_trail: SiteTrail) -> None:
    everything = site_trail.records()
    policies = _by_kind(everything, "policy")
    for p in policies:  # the digest is of the settings recorded with it
        canonical = json.dumps(p["settings"], sort_keys=True, separators=(",", ":"))
        assert p["digest"] == hashlib.sha256(canonical.encode()).hexdigest()
    deid = [p for p in policies if p["scope"] == "deidentification"]
    assert len(deid) == 1 and deid[0]["settings"]["clean_pixel_data"] is pixels.tesseract_available()
    privacy = [p for p in policies if p["scope"] == "privacy"]
    assert [p["settings"]["epsilon_cap"] for p in privacy] == [50.0, 0.01]  # the change is recorded
    assert privacy[1]["previous_digest"] == privacy[0]["digest"]
    created = _by_kind(everything, "key_created")
    assert len(created) == 1 and created[0]["key_id"] == load_signing_key(site_trail.audit_key).key_id
    # Every command run ends with its own seal: the deid run, each round, each reply's egress record.
    for i, r in enumerate(everything):
        if r["kind"] in ("deid_run", "round_trained", "round_declined", "egress", "egress_error"):
            assert everything[i + 1]["kind"] == "seal" and everything[i + 1]["reason"] == "end of run", r["kind"]


def test_round_records_say_what_was_spent_and_what_left(site_trail: SiteTrail) -> None:
    records = site_trail.records()
    trained, reply = _by_kind(records, "round_trained")[0], site_trail.replies[0]
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content["metrics"]
    assert (trained["run_id"], trained["server_round"], trained["declined"]) == ("7", 1, False)
    assert trained["steps"] == metrics["steps"] > 0 and trained["sample_rate"] == metrics["sample-rate"]
    assert (trained["noise_multiplier"], trained["max_grad_norm"]) == (CFG.noise_multiplier, CFG.max_grad_norm)
    assert trained["epsilon_before"] == 0.0 < trained["epsilon_after"] == metrics["epsilon"] <= trained["epsilon_cap"]
    assert site_trail.site is not None
    assert ledger_for(site_trail.site).epsilon("7", 1e-3) == pytest.approx(trained["epsilon_after"])

    # What left: the reply's arrays, described and hashed independently here.
    arrays = reply.content["arrays"]
    digest = hashlib.sha256()
    for name, arr in arrays.items():
        digest.update(name.encode())
        digest.update(arr.data)
    sent = [{"name": k, "shape": list(a.shape), "dtype": a.dtype, "bytes": len(a.data)} for k, a in arrays.items()]
    update = trained["update"]
    assert update["arrays"] == sent and update["bytes"] == sum(a["bytes"] for a in sent) > 0
    assert update["digest"] == digest.hexdigest()
    egress = [r for r in _by_kind(records, "egress") if r["server_round"] == 1]
    assert len(egress) == 1 and egress[0]["digest"] == update["digest"] and egress[0]["arrays"] == sent
    assert set(egress[0]["metrics"]) == set(metrics.keys())

    declined, reply = _by_kind(records, "round_declined")[0], site_trail.replies[1]
    assert reply.has_error() and reply.error.code == SITE_DECLINED
    assert (declined["server_round"], declined["declined"], declined["epsilon_cap"]) == (2, True, 0.01)
    assert declined["epsilon_before"] == pytest.approx(trained["epsilon_after"])
    assert declined["epsilon_projected"] > declined["epsilon_cap"] and declined["reason"] == reply.error.reason
    for name in ("steps", "sample_rate", "noise_multiplier", "max_grad_norm", "delta"):
        assert declined[name] == trained[name], name
    assert not [r for r in _by_kind(records, "egress") if r["server_round"] == 2]  # no arrays left
    (left,) = [r for r in _by_kind(records, "egress_error") if r["server_round"] == 2]  # only the decline did
    assert (left["code"], left["reason"]) == (SITE_DECLINED, reply.error.reason)


def test_train_round_alone_records_the_round_and_its_update(site_trail: SiteTrail, tmp_path: Path) -> None:
    """site_client.task.train_round without Flower: one record with everything issue 4 lists."""
    assert site_trail.site is not None
    site = site_trail.site.model_copy(update={"state_dir": tmp_path / "state", "audit_dir": tmp_path / "audit",
                                              "epsilon_cap": 50.0})
    reply = train_round(site, CFG, "direct-run", 3, initial_state(CFG))
    assert reply.state_dict is not None and reply.declined is None
    (record,) = _by_kind(read_records(tmp_path / "audit"), "round_trained")
    for name in ("run_id", "server_round", "steps", "sample_rate", "noise_multiplier", "max_grad_norm",
                 "epsilon_before", "epsilon_after", "epsilon_cap", "delta", "declined", "update"):
        assert name in record, name
    assert (record["run_id"], record["server_round"], record["declined"]) == ("direct-run", 3, False)
    assert record["epsilon_after"] == reply.metrics["epsilon"] and record["steps"] == reply.metrics["steps"]
    wire = pack(reply.state_dict)  # what the ClientApp puts in its reply
    digest = hashlib.sha256()
    for name, arr in wire.items():
        digest.update(name.encode())
        digest.update(arr.data)
    assert [a["name"] for a in record["update"]["arrays"]] == [MODEL_ARRAY]  # one flat array (medfed.wire)
    assert [a["shape"] for a in record["update"]["arrays"]] == [[sum(t.numel() for t in reply.state_dict.values())]]
    assert {a["dtype"] for a in record["update"]["arrays"]} == {"float32"}
    assert record["update"]["digest"] == digest.hexdigest()
    assert read_records(tmp_path / "audit")[-1]["kind"] == "seal"


def _export_key(site_trail: SiteTrail, out: Path) -> Path:
    result = runner.invoke(medfed, ["audit", "export-key", str(site_trail.audit), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_a_copy_without_site_secrets_verifies_with_the_exported_key(site_trail: SiteTrail, tmp_path: Path) -> None:
    pub = _export_key(site_trail, tmp_path / "site-audit.pub")
    copy = tmp_path / "auditor" / "audit"
    shutil.copytree(site_trail.audit, copy)
    for path in copy.rglob("*"):
        assert b"PRIVATE KEY" not in path.read_bytes()  # the trail folder holds no secret
    result = runner.invoke(medfed, ["audit", "verify", str(copy), "--public-key", str(pub)])
    assert result.exit_code == 0, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("OK: ")
    assert f"anchored to the given public key {load_signing_key(site_trail.audit_key).key_id}" in result.output

    # The copy, tampered: one deidentified record's action counts edited.
    seq = _by_kind(read_records(copy), "deidentified")[1]["seq"]
    path, i = locate(copy, seq)
    lines = lines_of(path)
    lines[i] = lines[i].replace(b'"X":', b'"X":1', 1)
    write_lines(path, lines)
    result = runner.invoke(medfed, ["audit", "verify", str(copy), "--public-key", str(pub)])
    assert result.exit_code == 1 and f"BROKEN: record #{seq} (audit.jsonl line {i + 1}) was altered" in result.output


def test_trail_and_report_hold_no_identifier(site_trail: SiteTrail, tmp_path: Path) -> None:
    pub = _export_key(site_trail, tmp_path / "site-audit.pub")
    report = tmp_path / "report" / "audit.html"
    result = runner.invoke(medfed, ["audit", "report", str(site_trail.audit), "--out", str(report),
                                    "--public-key", str(pub)])
    assert result.exit_code == 0 and "OK:" in result.output, result.output

    needles = {m.encode() for m in PHI_MARKERS} | {NAME.encode(), MRN.encode()}
    for ds in site_trail.originals.values():
        for tag in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber", "PatientID",
                    "PatientName"):
            value = str(ds.get(tag, "") or "")
            if len(value) >= 4:
                needles.add(value.encode())
    needles |= {b"img0.dcm", b"notes ", b"study0", b"CT_small", str(site_trail.src).encode()}
    blobs = {**all_bytes_under(site_trail.audit), **all_bytes_under(report.parent)}
    assert len(blobs) >= 4
    for path, data in blobs.items():
        leaked = sorted(n.decode() for n in needles if n in data)
        assert not leaked, f"{path.name} holds identifiers in clear: {leaked[:5]}"


def test_report_of_the_real_trail_renders_in_headless_chromium(
    site_trail: SiteTrail, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    browser = chromium()
    pub = _export_key(site_trail, tmp_path / "site-audit.pub")
    report = tmp_path / "audit-report.html"
    result = runner.invoke(medfed, ["audit", "report", str(site_trail.audit), "--out", str(report),
                                    "--public-key", str(pub)])
    assert result.exit_code == 0, result.output
    png = tmp_path / "audit-report-real.png"
    text = visible_text(render(browser, report, png, tmp_path / "profile", netlog=tmp_path / "net.json"))
    with capsys.disabled():
        print(f"\naudit report screenshot (real site trail): {png}")
    assert page_fetches(tmp_path / "net.json") == set()

    records = site_trail.records()
    done, quarantined = _by_kind(records, "deidentified"), _by_kind(records, "quarantined")
    trained = _by_kind(records, "round_trained")[0]
    first_array = trained["update"]["arrays"][0]
    expected = [
        "Trail verified", "anchored to the given public key",
        f"files de-identified {len(done)}", f"files quarantined {len(quarantined)}",
        "not a DICOM file (no DICM prefix and no readable data set) 1",
        "Actions applied, by kind", "removed (X)", "UID replaced by a keyed pseudonym (U)",
        "Policy in force", "deidentification", "clean_pixel_data", "epsilon_cap",
        "Privacy budget per round", f"{trained['epsilon_after']:.3f}", "DECLINED (over cap)",
        "What left the site", first_array["name"], "×".join(map(str, first_array["shape"])) or "scalar",
        "matches the round's update", f"error reply only (code {SITE_DECLINED})", "Signing keys and seals",
    ]
    if pixels.tesseract_available():
        expected.append("pixel data cleaned 1")
    for item in expected:
        assert item in text, item
    assert painted(png, (59, 125, 216)) > 5_000, "the embedded charts did not render"
