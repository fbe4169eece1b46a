"""Results back to PACS: `medfed predict --send AE@HOST:PORT` stores the SRs (and saliency maps) by C-STORE.

The files are the hospital's own results in its own identifiers, so they go only to the PACS the
site names, over TLS where configured (our certificate, and the PACS's checked against the site's
CA and the host name dialled). A PACS that is down or busy is tried again a bounded number of times
with backoff inside a bounded total time; every file gets its own outcome (sent, or the status or
reason it was not), and nothing is deleted: the files stay in OUT to be sent again.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from anonymization.intake import IntakeError, TlsFiles, check_ae_title, tls_context

log = logging.getLogger(__name__)

DEFAULT_CALLING_AE = "MEDFED"
DEFAULT_TRIES = 3
DEFAULT_TIMEOUT = 30.0  # seconds for each network step: connect, association, one C-STORE's answer
DEFAULT_BACKOFF = 1.0  # seconds before the second try, doubled before each further one
DEFAULT_BUDGET = 300.0  # no try and no file is begun after this many seconds
SEND_REPORT = "sent.csv"  # one row per file: where it went and what the PACS answered
SEND_FAILED_EXIT = 3  # `medfed predict` exit status when some result was not sent (the files stay in OUT)
_MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 9.3.2.2)
_WARNINGS = (0x0107, 0x0116, 0xB000, 0xB006, 0xB007)  # stored, with a remark


def _transient(status: int) -> bool:
    """Statuses that may clear on their own (Out of Resources, Resource Limitation): worth another try."""
    return 0xA700 <= status <= 0xA7FF or status == 0x0213


class SendError(Exception):
    """The send cannot start as asked (target, AE title, TLS files); the message says what to fix."""


@dataclass(frozen=True)
class Target:
    """The PACS: its AE title, host and port (``AE@HOST:PORT``)."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def parse_target(text: str) -> Target:
    """``"PACS@pacs.hospital.local:104"`` (an IPv6 host in brackets) -> :class:`Target`."""
    ae, at, address = str(text).rpartition("@")
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]\s]+):(\d{1,5})", address) if at else None
    if not ae or match is None or not 0 < int(match.group(2)) < 65536:
        raise SendError(f"--send {text!r} is not AE@HOST:PORT; write the PACS's AE title, host and DICOM port, "
                        "e.g. --send PACS@pacs.hospital.local:104")
    try:
        check_ae_title(ae, "--send")
    except IntakeError as err:
        raise SendError(str(err)) from None
    return Target(ae, match.group(1).strip("[]"), int(match.group(2)))


def check_calling_ae(title: str) -> str:
    """Our calling AE title (the PACS may accept only the titles it knows)."""
    try:
        return check_ae_title(title, "--send-ae-title")
    except IntakeError as err:
        raise SendError(str(err)) from None


def client_tls(files: TlsFiles) -> Any:
    """The client-side TLS context: our certificate and key; the PACS's certificate must come from ``files.ca``."""
    try:
        return tls_context(files, client=True, option="--send-tls")
    except IntakeError as err:
        raise SendError(str(err)) from None


@dataclass
class FileOutcome:
    """One file's fate: sent or not, the last status the PACS answered (if any), why, after how many tries."""

    path: Path
    sop_instance_uid: str = ""
    sent: bool = False
    status: int | None = None
    reason: str = ""
    tries: int = 0
    final: bool = False  # no further try can change it

    def describe(self) -> str:
        status = f"status 0x{self.status:04X} " if self.status is not None else ""
        return f"{status}{self.reason}".strip() + (f" (after {self.tries} tries)" if self.tries > 1 else "")


@dataclass
class SendReport:
    """What a send came to, file by file."""

    target: Target
    outcomes: list[FileOutcome] = field(default_factory=list)
    tls: bool = False
    seconds: float = 0.0

    @property
    def sent(self) -> list[FileOutcome]:
        return [o for o in self.outcomes if o.sent]

    @property
    def failed(self) -> list[FileOutcome]:
        return [o for o in self.outcomes if not o.sent]

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        return (f"sent {len(self.sent)}, failed {len(self.failed)} of {len(self.outcomes)} file(s) to {self.target}"
                f" ({'TLS' if self.tls else 'no TLS'}, {self.seconds:.1f} s)")


REPORT_COLUMNS = ("path", "sop_instance_uid", "sent", "status", "reason", "tries", "target")


def read_report(path: Path) -> list[dict[str, str]]:
    """The rows of an earlier ``sent.csv`` (none if there is none); a file not in our format is an error."""
    import csv

    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != REPORT_COLUMNS:
            raise SendError(f"{path} is not a send report (columns {', '.join(REPORT_COLUMNS)}): "
                            "move it away, or pass --all to send every result again")
        return list(reader)


def unsent(paths: Sequence[Path], earlier: Sequence[dict[str, str]], root: Path) -> list[Path]:
    """The files of ``paths`` that no row of an earlier report says were sent."""
    done = {r["path"] for r in earlier if r["sent"] == "yes"}
    return [p for p in paths if str(p.relative_to(root)) not in done]


def write_report(report: SendReport, path: Path, root: Path, earlier: Sequence[dict[str, str]] = ()) -> None:
    """``sent.csv``: one row per file (its path under ``root``), so what was not sent is plain to see.

    Rows of an ``earlier`` report for files this send did not touch are kept, so after a re-send the
    report still covers every result.
    """
    import csv
    import io

    from medfed.files import write_file

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(REPORT_COLUMNS)
    rows = {}
    for o in report.outcomes:
        rel = o.path.relative_to(root) if o.path.is_relative_to(root) else o.path
        rows[str(rel)] = [str(rel), o.sop_instance_uid, "yes" if o.sent else "no",
                          "" if o.status is None else f"0x{o.status:04X}", o.reason, o.tries, str(report.target)]
    for r in earlier:
        rows.setdefault(r["path"], [r[c] for c in REPORT_COLUMNS])
    w.writerows(rows[k] for k in sorted(rows))
    write_file(path, buf.getvalue().encode())


@dataclass
class _Item:
    """A file to send: read again at its turn, so a large send never holds every image in memory."""

    outcome: FileOutcome
    sop_class: str
    syntax: str


def send_files(
    paths: Sequence[Path],
    target: Target,
    tls: TlsFiles | None = None,
    calling_ae: str = DEFAULT_CALLING_AE,
    tries: int = DEFAULT_TRIES,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    backoff: float = DEFAULT_BACKOFF,
    budget: float = DEFAULT_BUDGET,
    sleep: Callable[[float], None] = time.sleep,
) -> SendReport:
    """C-STORE every file to ``target``; retry what failed for a reason that may pass, at most ``tries`` times.

    One association per try carries every file still unsent. A refused or broken association, no
    answer within ``timeout``, and Out of Resources are tried again after ``backoff`` (doubling);
    any other failure status is final. Nothing new begins after ``budget`` seconds. Files are only
    read, never moved or deleted.
    """
    if tries < 1:
        raise SendError("--send-tries must be at least 1")
    if timeout <= 0:
        raise SendError("--send-timeout must be more than 0 seconds")
    check_calling_ae(calling_ae)
    context = client_tls(tls) if tls is not None else None
    t0 = time.monotonic()
    report = SendReport(target=target, tls=tls is not None)
    items: list[_Item] = []
    for path in paths:
        outcome = FileOutcome(Path(path))
        report.outcomes.append(outcome)
        try:
            ds = dcmread(path, stop_before_pixels=True)
            outcome.sop_instance_uid = str(ds.get("SOPInstanceUID", ""))
        except Exception as exc:  # noqa: BLE001 - one unreadable file is reported, the rest still go
            outcome.reason, outcome.final = f"not readable DICOM ({type(exc).__name__})", True
            continue
        if not outcome.sop_instance_uid or "SOPClassUID" not in ds or "TransferSyntaxUID" not in ds.file_meta:
            outcome.reason, outcome.final = "no SOP Class / SOP Instance / Transfer Syntax UID: not a DICOM file", True
            continue
        items.append(_Item(outcome, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
    for attempt in range(1, tries + 1):
        pending = [i for i in items if not i.outcome.final]
        if not pending:
            break
        if attempt > 1:
            pause = backoff * 2 ** (attempt - 2)
            if time.monotonic() - t0 + pause > budget:
                break
            log.info("send to %s: try %d of %d in %.1f s for %d file(s)", target, attempt, tries, pause, len(pending))
            sleep(pause)
        _one_try(pending, target, context, calling_ae, timeout, attempt, deadline=t0 + budget)
    report.seconds = time.monotonic() - t0
    return report


def _one_try(pending: list[_Item], target: Target, context: Any, calling_ae: str, timeout: float, attempt: int,
             *, deadline: float) -> None:
    from pynetdicom import AE
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for sop_class, syntaxes in _contexts(pending):
        ae.add_requested_context(sop_class, syntaxes)
    for item in pending:
        item.outcome.tries = attempt
    with _pynetdicom_errors() as errors:
        assoc = ae.associate(target.host, target.port, ae_title=target.ae_title, max_pdu=0,
                             tls_args=(context, target.host) if context is not None else None)
        if not assoc.is_established:
            reason = errors.reason(assoc) or ("the connection closed without an answer: check the port, and whether "
                                              "the PACS expects TLS there (--send-tls-cert, -key, -ca)")
            for item in pending:
                item.outcome.status, item.outcome.reason = None, reason
                item.outcome.final = errors.permanent(reason)
            return
        try:
            for item in pending:
                if time.monotonic() > deadline:
                    item.outcome.reason = "not tried: the send's time budget ran out"
                    continue
                if not assoc.is_established:
                    item.outcome.status, item.outcome.reason = None, "the association ended before this file"
                    continue
                _store(assoc, item, STORAGE_SERVICE_CLASS_STATUS, errors)
        finally:
            if assoc.is_established:
                assoc.release()


def _store(assoc: Any, item: _Item, descriptions: dict[int, tuple[str, str]], errors: _Errors) -> None:
    outcome = item.outcome
    try:
        answer = assoc.send_c_store(outcome.path)
    except ValueError:  # no presentation context the PACS accepted fits this file
        outcome.status = None
        outcome.reason = f"the PACS accepts no presentation context for SOP class {UID(item.sop_class).name}"
        outcome.final = True
        return
    except (OSError, InvalidDicomError, AttributeError) as exc:  # changed or removed since it was checked
        outcome.status, outcome.final = None, True
        outcome.reason = f"could not be read at its turn ({type(exc).__name__})"
        return
    if "Status" not in answer:
        outcome.status = None
        outcome.reason = errors.reason(assoc) or "no answer from the PACS (timed out or the association was aborted)"
        return
    code = int(answer.Status)
    text = descriptions.get(code, ("", "unknown status"))[1]
    comment = str(answer.get("ErrorComment", "") or "").strip()
    outcome.status = code
    if code == 0x0000 or code in _WARNINGS:
        outcome.sent, outcome.final = True, True
        outcome.reason = "" if code == 0 else f"stored with a warning: {text}"
        return
    outcome.reason = "; ".join(x for x in (text, comment) if x)
    outcome.final = not _transient(code)


def _contexts(items: list[_Item]) -> Iterator[tuple[str, list[str]]]:
    """Per SOP class: the files' own transfer syntaxes, then explicit and implicit little endian."""
    syntaxes: dict[str, list[str]] = {}
    for item in items:
        own = syntaxes.setdefault(item.sop_class, [])
        if item.syntax not in own:
            own.insert(0, item.syntax)
    if len(syntaxes) > _MAX_CONTEXTS:
        raise SendError(f"{len(syntaxes)} different SOP classes: more than one association can carry; "
                        "send them in smaller groups")
    for sop_class, own in syntaxes.items():
        yield sop_class, list(dict.fromkeys([*own, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))


class _Errors(logging.Handler):
    """pynetdicom's ERROR lines of one association's threads: the reason an association failed, in its words."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def reason(self, assoc: Any) -> str:
        threads = {t for t in (getattr(assoc, "ident", None), getattr(getattr(assoc, "dul", None), "ident", None),
                               threading.get_ident()) if t is not None}
        picked, rejected = [], []
        for line in (r.getMessage() for r in list(self.records) if r.thread in threads):
            if line.startswith("TCP Initialisation Error: "):
                picked.append("cannot connect: " + line.removeprefix("TCP Initialisation Error: "))
            elif line.startswith(("Result: ", "Reason: ")):
                rejected.append(line.split(": ", 1)[1])
            elif line == "No accepted presentation contexts":
                picked.append("no accepted presentation contexts: the PACS takes none of these SOP classes")
            elif "timeout" in line.lower():
                picked.append(line)
        if rejected:
            picked.insert(0, f"the PACS rejected the association ({': '.join(rejected)})")
        return "; ".join(dict.fromkeys(picked))

    @staticmethod
    def permanent(reason: str) -> bool:
        """A permanent rejection, no common presentation context, an untrusted certificate: the same next time."""
        return any(s in reason for s in ("Rejected Permanent", "no accepted presentation contexts",
                                         "CERTIFICATE_VERIFY_FAILED"))


@contextlib.contextmanager
def _pynetdicom_errors() -> Iterator[_Errors]:
    """Collect pynetdicom's error lines for the report instead of printing them (its INFO lines name UIDs)."""
    logger = logging.getLogger("pynetdicom")
    handler, level, propagate = _Errors(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
