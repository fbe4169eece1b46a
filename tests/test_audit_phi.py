"""Invariant 4 for the audit trail: no identifier in clear, after real de-identification and a real round.

PHI markers are planted in the DICOM headers and in the folder and file names of
the source; every byte of the trail folder (segments, trail.json, lock) and of
the report built from it is searched for them and for the original UIDs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from pydicom.data import get_testdata_file

from anonymization.audit import read_records
from anonymization.audit_keys import SIGNING_KEY_NAME, load_signing_key
from anonymization.audit_report import write_report
from anonymization.audit_verify import verify_trail
from anonymization.batch import run_deid
from coordinator.federation import initial_state
from medfed.settings import RunConfig, SiteConfig
from site_client.client_app import build_app
from tests.dicom_factory import PHI_MARKERS, Patient, all_bytes_under, make_ct, write
from tests.models_factory import make_store

pytestmark = pytest.mark.integration
CFG = RunConfig().with_overrides(image_size=32, batch_size=8, lr=0.05)


@pytest.fixture(autouse=True)
def _task_identity() -> object:
    # Outside a Flower runtime a Message needs the run/task ids Flower normally sets.
    from flwr.supercore.task_identity import TaskIdentity

    names = ("_run_id", "_task_id", "_node_id")
    old = {n: getattr(TaskIdentity, n) for n in names}
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
    yield
    for n, v in old.items():
        setattr(TaskIdentity, n, v)


def test_trail_of_deid_and_a_round_holds_no_identifier(tmp_path: Path) -> None:
    src = tmp_path / "export"
    originals = []
    for rel, ds in (
        ("Phiname0_Zelda PHIPID-837261-0/study0/img0.dcm", make_ct(Patient(0), instance=0)),
        ("Phiname0_Zelda PHIPID-837261-0/study0/img1.dcm", make_ct(Patient(0), instance=1)),
        ("Phiname1_Zelda/a.dcm", make_ct(Patient(1))),
        ("Phiname2_Zelda/burned PHIACC99182.dcm", make_ct(Patient(2), burned_in=True)),
    ):
        write(ds, src / rel)
        originals.append(ds)
    (src / "notes PHIPID-837261-0 Zelda.txt").write_text("Phiname0 Zelda: call back PHITEL5551234")
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "CT_small.dcm")

    key = tmp_path / "keys" / "site.key"
    dst = tmp_path / "deid"
    summary = run_deid(src, dst, key, progress=False)
    assert (summary.deidentified, summary.quarantined) == (4, 2)
    audit = dst / "audit"

    # A training round of the same site, sealing the same trail (found through the trail, same key).
    store = tmp_path / "store"
    make_store(store, n_patients=16, images_per_patient=2, size=64, seed=1)
    site = SiteConfig(name="hospital-t", data_dir=store, state_dir=tmp_path / "state", audit_dir=audit,
                      epsilon_cap=50.0, delta=1e-3)
    toml = tmp_path / "site.toml"
    toml.write_text(site.to_toml())
    ctx = Context(run_id=7, node_id=1, node_config={"site-config": str(toml)}, state=RecordDict(), run_config={})
    msg = Message(content=RecordDict({"arrays": ArrayRecord(initial_state(CFG)),
                                      "config": ConfigRecord({"server-round": 1})}), dst_node_id=1, message_type="train")
    reply = build_app(CFG)(msg, ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert not (tmp_path / "state" / SIGNING_KEY_NAME).exists()  # the site used the trail's key

    records = read_records(audit)
    kinds = [r["kind"] for r in records]
    for kind in ("key_created", "policy", "deidentified", "quarantined", "deid_run", "round_trained", "egress", "seal"):
        assert kind in kinds, kind
    assert kinds.count("key_created") == 1 and kinds[-1] == "seal"
    signer = load_signing_key(key.parent / SIGNING_KEY_NAME)
    result = verify_trail(audit, public_key=signer.public_raw)
    assert result.ok, result.problem

    report = write_report(audit, tmp_path / "report" / "audit.html", public_key=signer.public_raw)
    assert report.ok

    needles = {m.encode() for m in PHI_MARKERS}
    for ds in originals:
        for value in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.AccessionNumber,
                      ds.PatientID, str(ds.PatientName)):
            needles.add(str(value).encode())
    needles |= {b"img0.dcm", b"notes ", b"study0", b"CT_small"}
    blobs = {**all_bytes_under(audit), **all_bytes_under(tmp_path / "report")}
    assert len(blobs) >= 4
    for path, data in blobs.items():
        leaked = sorted(n.decode() for n in needles if n in data)
        assert not leaked, f"{path.name} holds identifiers in clear: {leaked[:5]}"
