"""The PACS intake (``medfed site receive``): real DICOM peers send, the engine de-identifies as they arrive.

DCMTK's storescu (plain and TLS) and Debian's Orthanc are started by the tests
themselves on loopback; pynetdicom plays the hostile or broken sender. After
every test the spool is empty and no raw patient identifier is found anywhere
in DST (only the quarantine may hold one).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from typer.testing import CliRunner

from anonymization.audit import read_records
from anonymization.intake import (
    KIND_REFUSED,
    KIND_SPOOL_CLEARED,
    KIND_STUDY_COMPLETE,
    MAX_PDU_BYTES,
    STATUS_CANNOT_DEIDENTIFY,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    Intake,
    ReceiveServer,
    TlsFiles,
    received_file,
)
from anonymization.manifest import read_manifest
from anonymization.quarantine import QUARANTINE_LOG
from anonymization.worker import IMAGES_DIR
from tests.dicom_factory import Patient, make_ct, write
from tests.dicom_peers import STORESCU, WAIT, Pki, free_port, need, wait_until

# Distinctive raw identifiers of the factory's patients: none may reach DST.
RAW_MARKERS = (b"Phiname", b"Zelda", b"ZELDA", b"PHIPID-837261", b"PHIACC99182")


def make_study(folder: Path, n: int, *, patient: int = 0, study: int = 0, size: int = 32) -> list[Path]:
    """``n`` CT instances of one study, full of the factory's planted identifiers."""
    paths = []
    for i in range(n):
        ds = make_ct(Patient(patient), study=study, instance=i)
        if size != 32:
            ds.Rows = ds.Columns = size
            ds.PixelData = np.random.default_rng(i).integers(0, 2000, (size, size), dtype=np.int16).tobytes()
        paths.append(write(ds, folder / f"p{patient}s{study}i{i:03d}.dcm"))
    return paths


def outputs(dst: Path) -> list[Path]:
    return sorted((dst / IMAGES_DIR).rglob("*.dcm")) if (dst / IMAGES_DIR).exists() else []


def audit_kinds(dst: Path, kind: str) -> list[dict]:
    return [r for r in read_records(dst / "audit") if r.get("kind") == kind]


def assert_clean(root: Path) -> None:
    """The invariants of every intake test: spool empty, no temporary output, no raw identifier in DST."""
    dst, spool = root / "dst", root / "dst-spool"
    assert not spool.exists() or list(spool.iterdir()) == [], "the spool must be empty"
    for path in (p for p in dst.rglob("*") if p.is_file()) if dst.exists() else []:
        assert not path.name.endswith(".tmp"), f"temporary output left behind: {path}"
        data = path.read_bytes()
        for marker in RAW_MARKERS:
            assert marker not in data, f"raw identifier {marker!r} found in {path.relative_to(root)}"


@dataclass
class Receiver:
    root: Path
    intake: Intake
    server: ReceiveServer
    port: int

    @property
    def dst(self) -> Path:
        return self.root / "dst"

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def start_receiver(tmp_path: Path) -> Iterator[Callable[..., Receiver]]:
    """Start the intake + SCP in this process on a free loopback port; stopped and checked afterwards."""
    started: list[Receiver] = []

    def start(*, tls: TlsFiles | None = None, allowed: Sequence[str] = ("STORESCU", "ORTHANC"),
              **options: object) -> Receiver:
        options.setdefault("min_free_bytes", 0)
        options.setdefault("study_timeout", 60.0)
        intake = Intake(tmp_path / "dst", tmp_path / "keys" / "site.key", **options).open()  # type: ignore[arg-type]
        server = ReceiveServer(intake, ae_title="MEDFED", allowed=list(allowed), port=0, host="127.0.0.1", tls=tls)
        receiver = Receiver(tmp_path, intake, server, server.start())
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()
    assert_clean(tmp_path)


def send(port: int, files: Sequence[Path | Dataset], *, calling: str = "STORESCU") -> list[int]:
    """C-STORE with pynetdicom: the status of each instance."""
    from pydicom import dcmread
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title=calling)
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDFED")
    assert assoc.is_established, "association refused"
    try:
        statuses = []
        for item in files:
            ds = item if isinstance(item, Dataset) else dcmread(item)
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if "Status" in status else -1)
        return statuses
    finally:
        assoc.release()


def storescu(port: int, files: Sequence[Path], *, calling: str = "STORESCU",
             tls: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    tool = need(STORESCU, "storescu")
    return subprocess.run([tool, "-aet", calling, "-aec", "MEDFED", *tls, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=WAIT, check=False)


# ---- storescu, plain ---------------------------------------------------------------------------
@pytest.mark.deployment
def test_storescu_study_is_deidentified_as_it_arrives(tmp_path: Path, start_receiver) -> None:
    files = make_study(tmp_path / "src", 5, patient=1) + make_study(tmp_path / "src", 3, patient=2)
    rx = start_receiver(study_timeout=0.3)

    done = storescu(rx.port, files)

    assert done.returncode == 0, done.stderr
    assert len(outputs(rx.dst)) == 8
    wait_until(lambda: len(audit_kinds(rx.dst, KIND_STUDY_COMPLETE)) == 2, "both studies recorded complete")
    complete = audit_kinds(rx.dst, KIND_STUDY_COMPLETE)
    assert sorted(r["instances"] for r in complete) == [3, 5]
    assert all(r["late_instances"] == 0 for r in complete)
    rows = read_manifest(rx.dst / "manifest.csv")  # rewritten when a study completes
    assert len(rows) == 8 and all((rx.dst / r["path"]).is_file() for r in rows)
    deidentified = audit_kinds(rx.dst, "deidentified")
    assert len(deidentified) == 8 and {r["via"] for r in deidentified} == {"dicom"}
    assert {r["calling_ae"] for r in deidentified} == {"STORESCU"}
    rx.stop()
    stopped = audit_kinds(rx.dst, "intake_stopped")[-1]
    assert (stopped["received"], stopped["deidentified"], stopped["quarantined"]) == (8, 8, 0)


@pytest.mark.parametrize(("syntax", "uid_suffix"), [("1.2.840.10008.1.2.1", "1"), ("1.2.840.10008.1.2", "12")])
def test_the_spool_file_has_the_bytes_pynetdicom_would_write(syntax: str, uid_suffix: str) -> None:
    """The hand-written file meta equals pynetdicom's ``encoded_dataset()`` (odd and even UID lengths)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pynetdicom import evt
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.presentation import build_context

    ds = make_ct(Patient(0), study=0, instance=1)
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{uid_suffix}"
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, syntax == "1.2.840.10008.1.2"
    write_dataset(buffer, ds)
    request = C_STORE()
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    request.DataSet = io.BytesIO(buffer.getvalue())
    context = build_context(ds.SOPClassUID, syntax)
    context.context_id = 1
    event = evt.Event(None, evt.EVT_C_STORE, {"request": request, "context": context.as_tuple})  # type: ignore[arg-type]

    assert received_file(event) == event.encoded_dataset(include_meta=True)


def test_senders_are_asked_for_large_but_bounded_pdus_and_no_log_formatting(start_receiver) -> None:
    """storescu then sends its largest PDUs (128 KiB); pynetdicom's standard log handlers are not bound."""
    from pynetdicom import AE, StoragePresentationContexts, _handlers, evt

    rx = start_receiver()
    ae = AE(ae_title="STORESCU")
    ae.requested_contexts = StoragePresentationContexts[:2]
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="MEDFED")
    try:
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == MAX_PDU_BYTES
        assert 128 * 1024 <= MAX_PDU_BYTES <= 16 * 1024 * 1024
        (ours,) = rx.server._server.active_associations
        bound = [handler for handler, _args in ours.get_handlers(evt.EVT_DIMSE_RECV)]
        assert not any(handler.__module__ == _handlers.__name__ for handler in bound), bound
    finally:
        assoc.release()


@pytest.mark.deployment
def test_echoscu_checks_the_connection(start_receiver) -> None:
    rx = start_receiver()
    tool = str(Path(need(STORESCU, "storescu")).with_name("echoscu"))
    done = subprocess.run([tool, "-aet", "STORESCU", "-aec", "MEDFED", "127.0.0.1", str(rx.port)],
                          capture_output=True, text=True, timeout=WAIT, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.adversarial
def test_unknown_calling_ae_is_refused_at_association(tmp_path: Path, start_receiver) -> None:
    files = make_study(tmp_path / "src", 2)
    rx = start_receiver()

    done = storescu(rx.port, files, calling="INTRUDER")

    assert done.returncode != 0
    assert "Calling AE Title Not Recognized" in done.stderr
    assert outputs(rx.dst) == []
    assert audit_kinds(rx.dst, "deidentified") == []


# ---- storescu over TLS -------------------------------------------------------------------------
def _tls(key: Path, cert: Path, ca: Path) -> list[str]:
    return ["+tls", str(key), str(cert), "+cf", str(ca)]


@pytest.mark.deployment
def test_storescu_over_tls_with_a_certificate_from_the_ca(tmp_path: Path, start_receiver, pki: Pki) -> None:
    files = make_study(tmp_path / "src", 4)
    rx = start_receiver(tls=pki.server)

    done = storescu(rx.port, files, tls=_tls(pki.client_key, pki.client_cert, pki.server.ca))

    assert done.returncode == 0, done.stderr
    assert len(outputs(rx.dst)) == 4
    assert audit_kinds(rx.dst, "intake_started")[-1]["tls"] is True


@pytest.mark.adversarial
def test_tls_clients_without_a_certificate_from_the_ca_are_refused(tmp_path: Path, start_receiver, pki: Pki) -> None:
    files = make_study(tmp_path / "src", 2)
    rx = start_receiver(tls=pki.server)

    rogue = storescu(rx.port, files, tls=_tls(pki.rogue_key, pki.rogue_cert, pki.server.ca))
    anonymous = storescu(rx.port, files, tls=["+tla", "+cf", str(pki.server.ca)])
    plain = storescu(rx.port, files)  # no TLS at all against the TLS port

    for done in (rogue, anonymous, plain):
        assert done.returncode != 0
    assert outputs(rx.dst) == []
    assert audit_kinds(rx.dst, "deidentified") == []


# ---- resend, late instance, quarantine ---------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_the_same_instance_sent_twice_gives_one_output(tmp_path: Path, start_receiver, workers: int) -> None:
    files = make_study(tmp_path / "src", 3)
    rx = start_receiver(workers=workers)

    first = send(rx.port, files)
    again = send(rx.port, files)

    assert first == again == [STATUS_SUCCESS] * 3
    assert len(outputs(rx.dst)) == 3
    skipped = audit_kinds(rx.dst, "skipped")
    assert len(skipped) == 3 and all("received before" in r["reason"] for r in skipped)
    rx.stop()
    assert len(read_manifest(rx.dst / "manifest.csv")) == 3


def test_after_a_restart_a_resend_is_recognised_by_the_done_index(tmp_path: Path, start_receiver) -> None:
    files = make_study(tmp_path / "src", 2)
    first = start_receiver()
    assert send(first.port, files) == [STATUS_SUCCESS] * 2
    first.stop()

    second = start_receiver()
    assert send(second.port, files) == [STATUS_SUCCESS] * 2

    assert len(outputs(second.dst)) == 2
    assert [r["reason"] for r in audit_kinds(second.dst, "skipped")] == ["already de-identified (done-index)"] * 2


def test_associations_at_once_are_deidentified_in_parallel_and_recorded_once(tmp_path: Path, start_receiver) -> None:
    """Four senders at once, two worker processes: every instance stored once, recorded once, in the manifest."""
    import threading

    studies = [make_study(tmp_path / "src", 5, patient=10 + i) for i in range(4)]
    rx = start_receiver(workers=2)
    statuses: dict[int, list[int]] = {}
    threads = [threading.Thread(target=lambda i=i: statuses.__setitem__(i, send(rx.port, studies[i])))
               for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT)

    assert [statuses.get(i) for i in range(4)] == [[STATUS_SUCCESS] * 5] * 4
    assert len(outputs(rx.dst)) == 20
    assert len({r["input_digest"] for r in audit_kinds(rx.dst, "deidentified")}) == 20
    rx.stop()
    assert len(read_manifest(rx.dst / "manifest.csv")) == 20


def test_instances_placed_during_a_flush_share_the_next_one(tmp_path: Path, start_receiver, monkeypatch) -> None:
    """Group commit: while one flush waits on the disk, the instances placed meanwhile wait for one more, together."""
    import threading

    import anonymization.intake as intake_module

    files = make_study(tmp_path / "src", 4)
    rx = start_receiver(workers=2)
    gate, entered = threading.Event(), threading.Event()
    real_fsync = intake_module._fsync

    def slow_fsync(path: Path | str) -> None:
        entered.set()
        assert gate.wait(WAIT)
        real_fsync(path)

    monkeypatch.setattr(intake_module, "_fsync", slow_fsync)
    statuses: dict[int, list[int]] = {}
    first = threading.Thread(target=lambda: statuses.__setitem__(0, send(rx.port, files[:1])))
    first.start()
    assert entered.wait(WAIT)  # the first instance's flush has begun and is held
    rest = [threading.Thread(target=lambda i=i: statuses.__setitem__(i, send(rx.port, files[i:i + 1])))
            for i in range(1, 4)]
    for thread in rest:
        thread.start()
    commits = rx.intake._commits
    assert commits is not None
    wait_until(lambda: len(commits._queue) == 3, "three instances placed, waiting for the next flush")
    assert outputs(rx.dst) and statuses == {}  # placed, but nobody answered before the flush
    gate.set()
    for thread in (first, *rest):
        thread.join(timeout=WAIT)

    assert [statuses.get(i) for i in range(4)] == [[STATUS_SUCCESS]] * 4
    assert commits.flushes == 2


def test_a_late_instance_is_added_and_recorded_as_late(tmp_path: Path, start_receiver) -> None:
    files = make_study(tmp_path / "src", 3)
    rx = start_receiver(study_timeout=0.3)

    assert send(rx.port, files[:2]) == [STATUS_SUCCESS] * 2
    wait_until(lambda: len(audit_kinds(rx.dst, KIND_STUDY_COMPLETE)) == 1, "the study recorded complete")
    assert send(rx.port, files[2:]) == [STATUS_SUCCESS]
    wait_until(lambda: len(audit_kinds(rx.dst, KIND_STUDY_COMPLETE)) == 2, "the study completed again")

    late = [r for r in audit_kinds(rx.dst, "deidentified") if r["late"]]
    assert len(late) == 1
    first, second = audit_kinds(rx.dst, KIND_STUDY_COMPLETE)
    assert first["study"] == second["study"] == late[0]["study"]
    assert (first["instances"], first["late_instances"]) == (2, 0)
    assert (second["instances"], second["late_instances"]) == (1, 1)
    assert len(outputs(rx.dst)) == 3


@pytest.mark.adversarial
def test_an_instance_that_cannot_be_deidentified_is_quarantined_with_a_failure_status(
    tmp_path: Path, start_receiver
) -> None:
    burned = write(make_ct(Patient(3), burned_in=True), tmp_path / "src" / "burned.dcm")
    clean = make_study(tmp_path / "src", 1, patient=4)
    rx = start_receiver()

    statuses = send(rx.port, [burned, *clean])

    assert statuses == [STATUS_CANNOT_DEIDENTIFY, STATUS_SUCCESS]
    assert 0xC000 <= statuses[0] <= 0xCFFF
    assert len(outputs(rx.dst)) == 1
    quarantine = tmp_path / "dst-quarantine"
    (record,) = [json.loads(line) for line in (quarantine / QUARANTINE_LOG).read_text().splitlines()]
    assert "burned" in record["reason"].lower() and record["source"].startswith("dicom-STORESCU/")
    copy = quarantine / record["source"]
    assert b"Phiname3" in copy.read_bytes()  # the raw file is kept there, and only there
    assert len(audit_kinds(rx.dst, "quarantined")) == 1


def test_a_conflicting_resend_under_the_same_sop_uid_is_quarantined(tmp_path: Path, start_receiver) -> None:
    (original,) = make_study(tmp_path / "src", 1)
    rx = start_receiver()
    from pydicom import dcmread

    changed = dcmread(original)
    changed.PixelData = np.zeros((32, 32), dtype=np.int16).tobytes()

    assert send(rx.port, [original, changed]) == [STATUS_SUCCESS, STATUS_CANNOT_DEIDENTIFY]
    assert len(outputs(rx.dst)) == 1


# ---- out of resources ----------------------------------------------------------------------------
def test_past_the_watermark_answers_out_of_resources_and_keeps_nothing(tmp_path: Path, start_receiver) -> None:
    files = make_study(tmp_path / "src", 2)
    rx = start_receiver(min_free_bytes=1 << 62)

    assert send(rx.port, files) == [STATUS_OUT_OF_RESOURCES] * 2

    assert outputs(rx.dst) == []
    assert not (tmp_path / "dst-quarantine").exists()
    refused = audit_kinds(rx.dst, KIND_REFUSED)
    assert len(refused) == 2 and all("watermark" in r["reason"] for r in refused)


def _mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        message = f"cannot mount a {size} tmpfs (needs root): {done.stderr.strip()}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " - under CI this test must run")
        pytest.skip(message)


@pytest.mark.parametrize("full", ["store", "spool"])
def test_a_full_disk_answers_out_of_resources_and_keeps_nothing(tmp_path: Path, full: str) -> None:
    """A real 1 MiB filesystem holds the store (or the spool) and is filled up while the intake runs."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "1m")
    try:
        dst = disk / "dst" if full == "store" else tmp_path / "dst"
        spool = disk / "spool" if full == "spool" else tmp_path / "dst-spool"
        intake = Intake(dst, tmp_path / "keys" / "site.key", spool=spool, quarantine=tmp_path / "dst-quarantine",
                        audit=tmp_path / "audit", min_free_bytes=0).open()
        server = ReceiveServer(intake, ae_title="MEDFED", allowed=["STORESCU"], port=0, host="127.0.0.1")
        port = server.start()
        try:
            with pytest.raises(OSError), open(disk / "ballast", "wb", buffering=0) as fh:  # fill it up
                while True:
                    fh.write(b"\0" * 4096)
            big = make_study(tmp_path / "src", 1, size=256)  # 128 KiB of pixels: cannot fit
            assert send(port, big) == [STATUS_OUT_OF_RESOURCES]
        finally:
            server.stop()
        assert outputs(dst) == []
        assert [p for p in dst.rglob("*.tmp")] == []
        assert list(spool.iterdir()) == []
        assert not (tmp_path / "dst-quarantine").exists()
        refused = [r for r in read_records(tmp_path / "audit") if r.get("kind") == KIND_REFUSED]
        assert len(refused) == 1 and refused[0]["status"] == STATUS_OUT_OF_RESOURCES
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)


# ---- a broken association; the spool at start -------------------------------------------------------
@pytest.mark.adversarial
def test_an_association_aborted_mid_instance_leaves_nothing_partial(tmp_path: Path, start_receiver) -> None:
    """The sender aborts after half of an instance's data: nothing of it is kept, the rest is intact."""
    from pydicom import dcmread
    from pynetdicom import AE, StoragePresentationContexts
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    files = make_study(tmp_path / "src", 3, size=256)
    rx = start_receiver()
    ae = AE(ae_title="STORESCU")
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="MEDFED", max_pdu=16382)
    assert assoc.is_established
    assert [int(assoc.send_c_store(dcmread(f)).Status) for f in files[:2]] == [STATUS_SUCCESS] * 2

    ds = dcmread(files[2])
    context = next(c for c in assoc.accepted_contexts if c.abstract_syntax == ds.SOPClassUID)
    request = C_STORE()
    request.MessageID, request.AffectedSOPClassUID = 99, ds.SOPClassUID
    request.AffectedSOPInstanceUID, request.Priority = ds.SOPInstanceUID, 2
    syntax = context.transfer_syntax[0]
    request.DataSet = io.BytesIO(encode(ds, syntax.is_implicit_VR, syntax.is_little_endian))

    message = C_STORE_RQ()
    message.primitive_to_message(request)
    fragments = list(message.encode_msg(context.context_id, 16382))
    assert len(fragments) > 4
    for fragment in fragments[: len(fragments) // 2]:  # the command and half of the data set
        assoc.dul.send_pdu(fragment)
    assoc.abort()

    wait_until(lambda: not any(a.is_alive() for a in rx.server._server.active_associations),
               "the aborted association to end")
    assert len(outputs(rx.dst)) == 2
    assert send(rx.port, files[2:]) == [STATUS_SUCCESS]  # the intake carries on
    assert len(outputs(rx.dst)) == 3


def _listening(proc: subprocess.Popen, port: int) -> bool:
    assert proc.poll() is None, f"the receiver exited ({proc.returncode})"
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_success_means_durable_even_if_the_receiver_is_killed_right_after(tmp_path: Path) -> None:
    """SIGKILL the real ``medfed site receive`` (and its workers, as systemd kills the unit's group) the moment
    a Success arrives: the instance is in the store, and after a restart it is in the manifest and a resend is
    recognised."""
    from pydicom import dcmread
    from pynetdicom import AE, StoragePresentationContexts

    files = make_study(tmp_path / "src", 3, patient=11)
    dst, key, port = tmp_path / "dst", tmp_path / "keys" / "site.key", free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "medfed.cli", "site", "receive", str(dst), "--key", str(key), "--port", str(port),
         "--host", "127.0.0.1", "--ae-title", "MEDFED", "--allow-ae", "STORESCU", "--min-free", "0",
         "--study-timeout", "3600"], env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)

    def kill() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    try:
        wait_until(lambda: _listening(proc, port), "medfed site receive to listen")
        ae = AE(ae_title="STORESCU")
        ae.requested_contexts = StoragePresentationContexts
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDFED")
        assert assoc.is_established
        assert [int(assoc.send_c_store(dcmread(f)).Status) for f in files[:2]] == [STATUS_SUCCESS] * 2
        kill()  # the moment the second Success arrived
        assoc.abort()
    finally:
        kill()
        proc.wait(timeout=WAIT)

    stored = outputs(dst)
    assert len(stored) == 2
    assert sorted(str(dcmread(p).InstanceNumber) for p in stored) == ["1", "2"]  # whole files, not torn
    intake = Intake(dst, key, min_free_bytes=0).open()  # the restart
    server = ReceiveServer(intake, ae_title="MEDFED", allowed=["STORESCU"], port=0, host="127.0.0.1")
    port = server.start()
    try:
        assert send(port, files) == [STATUS_SUCCESS] * 3
    finally:
        server.stop()
    assert len(outputs(dst)) == 3
    assert [r["reason"] for r in audit_kinds(dst, "skipped")] == ["already de-identified (done-index)"] * 2
    assert sorted(r["path"] for r in read_manifest(dst / "manifest.csv")) == [
        p.relative_to(dst).as_posix() for p in outputs(dst)]
    assert_clean(tmp_path)


def test_done_index_lines_lost_in_a_crash_are_rebuilt_from_the_trail(tmp_path: Path, start_receiver) -> None:
    """The journal is appended without a flush of its own: a power cut may lose its last lines. The next
    start rebuilds them from the durable trail and outputs: the manifest lists every output, a resend is known."""
    from anonymization.batch import DONE_DIR

    files = make_study(tmp_path / "src", 2)
    first = start_receiver()
    assert send(first.port, files) == [STATUS_SUCCESS] * 2
    first.stop()
    (journal,) = (first.dst / DONE_DIR).glob("*.txt")
    journal.write_text(journal.read_text().splitlines()[0][:20])  # one line lost, the other torn
    (first.dst / "manifest.csv").unlink()

    second = start_receiver()
    (recovered,) = audit_kinds(second.dst, "intake_recovered")
    assert recovered["instances"] == 2
    assert send(second.port, files) == [STATUS_SUCCESS] * 2
    assert [r["reason"] for r in audit_kinds(second.dst, "skipped")] == ["already de-identified (done-index)"] * 2
    second.stop()
    rows = read_manifest(second.dst / "manifest.csv")
    assert sorted(r["path"] for r in rows) == [p.relative_to(second.dst).as_posix() for p in outputs(second.dst)]
    assert all(r["series_uid"] and r["accession"] for r in rows)


def test_the_spool_is_cleared_at_start(tmp_path: Path, start_receiver) -> None:
    spool = tmp_path / "dst-spool"
    spool.mkdir()
    (spool / "left-by-a-crash.part").write_bytes(b"Phiname^Zelda raw bytes")
    rx = start_receiver()
    assert list(spool.iterdir()) == []
    (cleared,) = audit_kinds(rx.dst, KIND_SPOOL_CLEARED)
    assert cleared["files"] == 1


def test_the_spool_and_quarantine_may_not_lie_inside_the_store(tmp_path: Path) -> None:
    from anonymization.intake import IntakeError

    with pytest.raises(IntakeError, match="spool .* lies inside the destination"):
        Intake(tmp_path / "dst", tmp_path / "k.key", spool=tmp_path / "dst" / "spool")
    with pytest.raises(IntakeError, match="quarantine .* lies inside the destination"):
        Intake(tmp_path / "dst", tmp_path / "k.key", quarantine=tmp_path / "dst" / "q")


# ---- the command itself, as systemd runs it -------------------------------------------------------
def _env(tmp_path: Path) -> dict[str, str]:
    from medfed.hardening import child_env

    return child_env({"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "HOME": str(tmp_path),
                      "COLUMNS": "200"})


@pytest.mark.deployment
def test_medfed_site_receive_command_with_storescu_and_sigterm(tmp_path: Path) -> None:
    files = make_study(tmp_path / "src", 3, patient=5)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "medfed.cli", "site", "receive", str(tmp_path / "dst"), "--key",
         str(tmp_path / "keys" / "site.key"), "--port", str(port), "--host", "127.0.0.1", "--ae-title", "MEDFED",
         "--allow-ae", "STORESCU,OTHER", "--min-free", "0", "--study-timeout", "0.5"],
        env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def listening() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, "medfed site receive to listen")
        done = storescu(port, files)
        assert done.returncode == 0, done.stderr
        wait_until(lambda: len(audit_kinds(tmp_path / "dst", KIND_STUDY_COMPLETE)) == 1, "the study complete")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, out
    assert "received 3: de-identified 3" in out
    assert len(outputs(tmp_path / "dst")) == 3
    assert_clean(tmp_path)


def test_medfed_site_receive_refuses_half_a_tls_configuration(tmp_path: Path) -> None:
    from medfed.cli import app

    result = CliRunner().invoke(app, ["site", "receive", str(tmp_path / "dst"), "--key", str(tmp_path / "k.key"),
                                      "--allow-ae", "PACS", "--tls-cert", str(tmp_path / "c.pem")])
    assert result.exit_code == 2
    assert "TLS needs all three of --tls-cert, --tls-key and --tls-ca" in result.output
    assert not (tmp_path / "dst").exists()


# ---- Orthanc (the `orthanc` fixture is in conftest.py) ---------------------------------------------
@pytest.mark.deployment
def test_orthanc_pushes_a_study_to_medfed(tmp_path: Path, start_receiver, orthanc) -> None:
    files = make_study(tmp_path / "src", 6, patient=6)
    rx = start_receiver(study_timeout=0.5)
    peer = orthanc({"medfed": ["MEDFED", "127.0.0.1", rx.port]})
    for f in files:
        peer.rest("POST", "/instances", f.read_bytes())
    (study,) = peer.rest("GET", "/studies")  # type: ignore[misc]

    job = peer.rest("POST", "/modalities/medfed/store", {"Resources": [study], "Synchronous": True})

    assert isinstance(job, dict) and job.get("FailedInstancesCount", 0) == 0, job
    assert len(outputs(rx.dst)) == 6
    wait_until(lambda: len(audit_kinds(rx.dst, KIND_STUDY_COMPLETE)) == 1, "the study recorded complete")
    assert {r["calling_ae"] for r in audit_kinds(rx.dst, "deidentified")} == {"ORTHANC"}


@pytest.mark.deployment
def test_orthanc_receives_what_medfed_sends(tmp_path: Path, start_receiver, orthanc) -> None:
    """The other direction (results back to PACS): Orthanc as a C-STORE SCP for medfed's own files."""
    rx = start_receiver()
    assert send(rx.port, make_study(tmp_path / "src", 2, patient=7)) == [STATUS_SUCCESS] * 2
    peer = orthanc({})

    assert send(peer.dicom, outputs(rx.dst), calling="MEDFED") == [STATUS_SUCCESS] * 2  # type: ignore[arg-type]

    assert len(peer.rest("GET", "/instances")) == 2  # type: ignore[arg-type]


# ---- labels that arrive later ----------------------------------------------------------------------
def test_deid_labels_attaches_labels_to_a_received_store(tmp_path: Path, start_receiver) -> None:
    from medfed.cli import app

    rx = start_receiver()
    assert send(rx.port, make_study(tmp_path / "src", 2, patient=8, study=0)
                + make_study(tmp_path / "src", 1, patient=9, study=1)) == [STATUS_SUCCESS] * 3
    rx.stop()
    labels = tmp_path / "labels.csv"
    labels.write_text(f"AccessionNumber,label\n{Patient(8).accession(0)},1\n{Patient(9).accession(1)},0\n"
                      "PHIACC99182NOPE,1\n")

    result = CliRunner().invoke(app, ["deid", "labels", str(rx.dst), "--key", str(tmp_path / "keys" / "site.key"),
                                      "--labels", str(labels)])

    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "labels matched 2, did not match 1" in text and "3 image(s) labelled" in text
    assert "PHIACC99182NOPE" not in text  # the unknown key is shown as its pseudonym only
    from anonymization.keys import load_or_create_secret
    from anonymization.pseudonyms import Pseudonymizer

    unknown = Pseudonymizer(load_or_create_secret(tmp_path / "keys" / "site.key")).accession("PHIACC99182NOPE")
    assert unknown in text
    rows = read_manifest(rx.dst / "manifest.csv")
    assert sorted(r["label"] for r in rows) == ["0", "1", "1"]
    (record,) = audit_kinds(rx.dst, "labels_attached")
    assert (record["matched"], record["unmatched"], record["unknown"]) == (2, 1, [unknown])


def test_deid_labels_refuses_another_sites_key(tmp_path: Path, start_receiver) -> None:
    from medfed.cli import app

    rx = start_receiver()
    assert send(rx.port, make_study(tmp_path / "src", 1)) == [STATUS_SUCCESS]
    rx.stop()
    other = tmp_path / "other.key"
    other.write_text("ab" * 32)
    other.chmod(0o600)
    labels = tmp_path / "labels.csv"
    labels.write_text("AccessionNumber,label\nX,1\n")
    before = (rx.dst / "manifest.csv").read_bytes()

    result = CliRunner().invoke(app, ["deid", "labels", str(rx.dst), "--key", str(other), "--labels", str(labels)])

    assert result.exit_code == 2
    assert "different site key" in " ".join(result.output.split())
    assert (rx.dst / "manifest.csv").read_bytes() == before



# ---- the systemd unit -------------------------------------------------------------------------------
def test_the_receive_unit_has_the_site_units_hardening() -> None:
    systemd = Path(__file__).resolve().parents[2] / "deploy" / "systemd"

    def settings(name: str) -> set[str]:
        keys = ("NoNewPrivileges", "PrivateTmp", "Protect", "RestrictAddressFamilies", "ReadWritePaths", "UMask",
                "User", "Group", "Environment", "KillMode", "Restart=", "RestartSec")
        return {line for line in (systemd / name).read_text().splitlines() if line.startswith(keys)}

    site, receive = settings("medfed-site.service"), settings("medfed-receive.service")
    assert site <= receive, f"missing from medfed-receive.service: {sorted(site - receive)}"
    text = (systemd / "medfed-receive.service").read_text()
    assert "RuntimeDirectory=medfed-receive" in text and "--spool /run/medfed-receive/spool" in text
