"""Results back to PACS (site_client.send): C-STORE with bounded retries, TLS both ways, a report per file.

The peers are real: DCMTK's ``storescp`` with TLS (started here on loopback) and pynetdicom SCPs
that answer what a busy or broken PACS answers. Orthanc receiving `medfed predict --send`'s SRs is
in test_predict.py, where the release and the images are.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from cryptography.hazmat.primitives import serialization
from pydicom.data import get_testdata_file

from anonymization.intake import TlsFiles
from coordinator.provision import CertificateAuthority, private_pem
from site_client.send import SendError, Target, client_tls, parse_target, send_files, write_report
from tests.dicom_factory import Patient, make_ct, write
from tests.dicom_peers import STORESCP, WAIT, Pki, free_port, listening, need, stop, wait_until


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    """A Comprehensive SR (pydicom's test file) and two CT images: two SOP classes in one association."""
    folder = tmp_path / "out"
    folder.mkdir()
    sr = Path(shutil.copy(get_testdata_file("test-SR.dcm"), folder / "report.dcm"))
    return [sr, *(write(make_ct(Patient(1), instance=i), folder / f"ct{i}.dcm") for i in range(2))]


def uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


# ---- a pynetdicom SCP that answers as a given PACS would ------------------------------------------
@pytest.fixture
def scp() -> Iterator[Callable[..., tuple[int, list[str]]]]:
    """Start a Storage SCP (AE title PACS) whose answer to each C-STORE is ``answer(dataset)``.

    ``only`` limits the SOP classes it accepts (default: every storage SOP class).
    """
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    servers = []

    def start(answer: Callable[[pydicom.Dataset], int], only: tuple[str, ...] = ()) -> tuple[int, list[str]]:
        received: list[str] = []

        def handle(event: object) -> int:
            ds = event.dataset  # type: ignore[attr-defined]
            received.append(str(ds.SOPInstanceUID))
            return answer(ds)

        ae = AE(ae_title="PACS")
        for cx in AllStoragePresentationContexts:
            if not only or cx.abstract_syntax in only:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.require_called_aet = True
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
        servers.append(server)
        return int(server.server_address[1]), received

    yield start
    for server in servers:
        server.shutdown()


def test_every_file_is_stored_and_reported_sent(files: list[Path], scp, tmp_path: Path) -> None:
    port, received = scp(lambda ds: 0x0000)

    report = send_files(files, Target("PACS", "127.0.0.1", port), tries=3, timeout=10)

    assert report.ok and len(report.sent) == 3 and not report.failed
    assert set(received) == uids(files)
    assert "sent 3, failed 0 of 3" in report.line()
    write_report(report, tmp_path / "sent.csv", tmp_path / "out")
    rows = (tmp_path / "sent.csv").read_text().splitlines()
    assert rows[0].startswith("path,sop_instance_uid,sent,status") and all(",yes,0x0000," in r for r in rows[1:])


def test_out_of_resources_is_retried_and_reported_with_its_status(files: list[Path], scp) -> None:
    port, received = scp(lambda ds: 0xA700)

    report = send_files(files, Target("PACS", "127.0.0.1", port), tries=3, timeout=10, backoff=0.05)

    assert not report.ok and len(report.failed) == 3
    assert len(received) == 9  # each file tried 3 times, then given up
    for outcome in report.failed:
        assert (outcome.status, outcome.tries) == (0xA700, 3)
        assert outcome.describe() == "status 0xA700 Refused: Out of Resources (after 3 tries)"
    assert all(p.is_file() for p in files)  # nothing lost


def test_a_pacs_that_is_busy_once_gets_the_file_on_the_next_try(files: list[Path], scp) -> None:
    seen: set[str] = set()

    def busy_the_first_time(ds: pydicom.Dataset) -> int:
        first = str(ds.SOPInstanceUID) not in seen
        seen.add(str(ds.SOPInstanceUID))
        return 0xA702 if first and ds.Modality == "CT" else 0x0000

    port, received = scp(busy_the_first_time)
    report = send_files(files, Target("PACS", "127.0.0.1", port), tries=3, timeout=10, backoff=0.05)

    assert report.ok
    assert [o.tries for o in report.outcomes] == [1, 2, 2]  # the SR went at once; the CTs on the second try
    assert len(received) == 5  # the SR is not sent twice


def test_a_failure_that_cannot_pass_is_not_retried(files: list[Path], scp) -> None:
    port, received = scp(lambda ds: 0xC123 if ds.Modality == "CT" else 0xB000)

    report = send_files(files, Target("PACS", "127.0.0.1", port), tries=3, timeout=10, backoff=0.05)

    assert len(received) == 3  # tried once each
    assert [o.sent for o in report.outcomes] == [True, False, False]
    assert report.outcomes[0].reason == "stored with a warning: Coercion of Data Elements"
    assert {o.describe() for o in report.failed} == {"status 0xC123 Cannot Understand"}


def test_a_permanent_rejection_is_not_retried(files: list[Path], scp) -> None:
    port, received = scp(lambda ds: 0x0000)

    report = send_files(files, Target("NOTPACS", "127.0.0.1", port), tries=3, timeout=10, backoff=5)

    assert report.seconds < 4 and received == []  # no backoff spent on what cannot change
    assert {o.tries for o in report.outcomes} == {1}
    assert "rejected the association" in report.failed[0].reason
    assert "Called AE title not recognised" in report.failed[0].reason


def test_a_pacs_that_takes_no_sr_is_named_and_not_retried(files: list[Path], scp) -> None:
    from pydicom.uid import CTImageStorage

    port, received = scp(lambda ds: 0x0000, only=(CTImageStorage,))
    report = send_files(files, Target("PACS", "127.0.0.1", port), tries=3, timeout=10, backoff=5)

    assert [o.sent for o in report.outcomes] == [False, True, True] and len(received) == 2
    (sr,) = report.failed
    assert sr.reason == "the PACS accepts no presentation context for SOP class Comprehensive SR Storage"
    assert sr.tries == 1 and report.seconds < 4

    port, received = scp(lambda ds: 0x0000, only=(CTImageStorage,))
    report = send_files(files[:1], Target("PACS", "127.0.0.1", port), tries=3, timeout=10, backoff=5)
    assert report.failed[0].reason.startswith("no accepted presentation contexts") and report.seconds < 4
    assert received == []


def test_a_closed_port_fails_after_the_bounded_tries(files: list[Path]) -> None:
    t0 = time.monotonic()
    report = send_files(files, Target("PACS", "127.0.0.1", free_port()), tries=3, timeout=5, backoff=0.2)

    assert time.monotonic() - t0 < 3  # 0.2 + 0.4 s of backoff, no hanging
    assert [o.tries for o in report.outcomes] == [3, 3, 3]
    assert all("cannot connect" in o.reason and "Connection refused" in o.reason for o in report.failed)
    assert all(p.is_file() for p in files)


def test_the_total_time_is_bounded_whatever_the_tries(files: list[Path]) -> None:
    report = send_files(files, Target("PACS", "127.0.0.1", free_port()), tries=10, timeout=5, backoff=0.5,
                        budget=2.0)

    assert report.seconds < 2.5
    assert {o.tries for o in report.outcomes} == {3}  # 0.5 s, 1 s; the next 2 s pause would pass the budget


def test_a_pacs_that_never_answers_times_out(files: list[Path]) -> None:
    import socket

    with socket.socket() as silent:  # accepts TCP (the kernel's backlog) but never speaks DICOM
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        report = send_files(files, Target("PACS", "127.0.0.1", silent.getsockname()[1]), tries=1, timeout=1)

    assert report.seconds < 5 and not report.sent
    assert "timeout" in report.failed[0].reason.lower()


def test_an_unreadable_file_is_reported_and_the_rest_still_go(files: list[Path], scp, tmp_path: Path) -> None:
    bad = tmp_path / "out" / "broken.dcm"
    bad.write_bytes(b"not DICOM at all")
    port, received = scp(lambda ds: 0x0000)

    report = send_files([bad, *files], Target("PACS", "127.0.0.1", port), timeout=10)

    assert len(report.sent) == 3 and len(received) == 3
    (failed,) = report.failed
    assert failed.path == bad and "not readable DICOM" in failed.reason and failed.tries == 0


@pytest.mark.parametrize(("text", "expected"), [
    ("PACS@pacs.hospital.local:104", Target("PACS", "pacs.hospital.local", 104)),
    ("ORTHANC@127.0.0.1:4242", Target("ORTHANC", "127.0.0.1", 4242)),
    ("PACS@[::1]:11112", Target("PACS", "::1", 11112)),
])
def test_parse_target(text: str, expected: Target) -> None:
    assert parse_target(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("text", ["pacs.local:104", "PACS@pacs.local", "PACS@pacs.local:0", "PACS@host:70000",
                                  "A_TITLE_LONGER_THAN_16@h:104", "@h:104", "PA\\CS@h:104", "PACS@::1:104"])
def test_parse_target_refuses_what_is_not_ae_host_port(text: str) -> None:
    with pytest.raises(SendError, match="--send"):
        parse_target(text)


def test_half_or_missing_tls_files_are_named(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(SendError, match="--send-tls-ca .* does not exist"):
        client_tls(TlsFiles(pki.client_cert, pki.client_key, tmp_path / "missing.pem"))
    with pytest.raises(SendError, match="--send-tls-cert .* / --send-tls-key .* are not a matching"):
        client_tls(TlsFiles(pki.client_cert, pki.rogue_key, pki.server.ca))


# ---- TLS, with DCMTK's storescp as the PACS ----------------------------------------------------------
def _storescp(folder: Path, key: Path, cert: Path, ca: Path) -> tuple[int, Path, subprocess.Popen]:
    """storescp (AE PACS) over TLS, requiring a client certificate from ``ca``; stores into ``folder``/in."""
    tool = need(STORESCP, "storescp")
    port, received = free_port(), folder / "in"
    received.mkdir(parents=True)
    log = open(folder / "storescp.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([tool, "-aet", "PACS", "+tls", str(key), str(cert), "+cf", str(ca), "--require-peer-cert",
                             "-od", str(received), str(port)], stdout=log, stderr=subprocess.STDOUT)
    wait_until(listening(port, proc), "storescp to listen")
    return port, received, proc


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    procs: list[subprocess.Popen] = []
    yield procs
    stop(procs)


@pytest.mark.deployment
def test_tls_send_to_storescp_with_our_client_certificate(files: list[Path], tmp_path: Path, pki: Pki,
                                                          processes: list[subprocess.Popen]) -> None:
    port, received, proc = _storescp(tmp_path / "pacs", pki.server.key, pki.server.cert, pki.server.ca)
    processes.append(proc)

    report = send_files(files, Target("PACS", "127.0.0.1", port), pki.client, tries=1, timeout=10)

    assert report.ok and report.tls, [o.describe() for o in report.failed]
    wait_until(lambda: len(list(received.iterdir())) == 3, "storescp to write the three files", timeout=WAIT)
    assert uids(sorted(received.iterdir())) == uids(files)


@pytest.mark.adversarial
@pytest.mark.deployment
@pytest.mark.parametrize("impostor", ["another CA", "another host"])
def test_tls_send_refuses_a_pacs_the_site_ca_did_not_certify_for_that_host(
        impostor: str, files: list[Path], tmp_path: Path, pki: Pki, processes: list[subprocess.Popen]) -> None:
    """A listener with a certificate from another CA, or from the site's CA for another host, gets nothing."""
    issuer = CertificateAuthority.create("Rogue") if impostor == "another CA" else None
    folder = tmp_path / "impostor"
    folder.mkdir()
    if issuer is None:  # the genuine CA, but a certificate for another machine: must not pass as 127.0.0.1
        ca = CertificateAuthority.create("Hospital")
        key, cert = ca.issue_server(["pacs2.hospital.local"], days=1)
        trust = folder / "ca.pem"
        trust.write_bytes(ca.cert_pem)
        sender = TlsFiles(pki.client_cert, pki.client_key, trust)
        client_ca = pki.server.ca
    else:
        key, cert = issuer.issue_server(["127.0.0.1"], days=1)
        sender, client_ca = pki.client, pki.server.ca
    (folder / "s.key").write_bytes(private_pem(key))
    (folder / "s.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    port, received, proc = _storescp(folder, folder / "s.key", folder / "s.pem", client_ca)
    processes.append(proc)

    report = send_files(files, Target("PACS", "127.0.0.1", port), sender, tries=2, timeout=10, backoff=0.05)

    assert not report.sent and list(received.iterdir()) == []
    reason = report.failed[0].reason
    assert "CERTIFICATE_VERIFY_FAILED" in reason
    assert {o.tries for o in report.outcomes} == {1}  # an untrusted PACS stays untrusted: no retry
    assert ("mismatch" in reason) == (impostor == "another host"), reason


@pytest.mark.adversarial
def test_plain_send_to_a_tls_port_fails_cleanly(files: list[Path], tmp_path: Path, pki: Pki,
                                                processes: list[subprocess.Popen]) -> None:
    port, received, proc = _storescp(tmp_path / "pacs", pki.server.key, pki.server.cert, pki.server.ca)
    processes.append(proc)
    report = send_files(files, Target("PACS", "127.0.0.1", port), tries=1, timeout=3)
    assert not report.sent and list(received.iterdir()) == []
    assert report.failed[0].reason, report.failed[0].reason


def test_the_cli_send_options_default_to_the_senders_own_defaults() -> None:
    """`medfed predict --send` and `medfed send` spell the defaults out (a light module); they must be these."""
    import inspect

    from medfed.cli.model import predict, send_results
    from site_client.send import DEFAULT_CALLING_AE, DEFAULT_TIMEOUT, DEFAULT_TRIES

    for command in (predict, send_results):
        params = inspect.signature(command).parameters
        assert params["send_ae_title"].default == DEFAULT_CALLING_AE
        assert params["send_tries"].default == DEFAULT_TRIES
        assert params["send_timeout"].default == DEFAULT_TIMEOUT
