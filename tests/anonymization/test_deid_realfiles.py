"""Real files from many vendors and transfer syntaxes through ``medfed deid run``.

Every file pydicom ships for its own tests, and every file of the ``pydicom-data``
package (a dev dependency), is copied into one source folder and de-identified in
one batch by the ``medfed deid run`` command (the second batch with a policy file
and two workers): each must come out de-identified or quarantined with a reason, none may
crash the batch, no identifying value of any input (names, IDs, UIDs, institution,
dates) may appear in any byte of the output tree, and pixel data that decoded
before must still decode to the same pixels. A second batch does the same under a
policy with the Clean options and Retain Safe Private on. Then the awkward
encodings one at a time (several of them share a SOP Instance UID, so in the big
batch all but one of a family are quarantined as duplicates).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.multival import MultiValue
from pydicom.uid import DeflatedExplicitVRLittleEndian

from anonymization.batch import DeidSummary, run_deid
from anonymization.dates import shift_da
from anonymization.engine import TYPE_UID_TAGS, is_well_known_uid, original_patient_id
from anonymization.keys import load_or_create_secret
from anonymization.policy import Policy
from anonymization.pseudonyms import Pseudonymizer
from anonymization.quarantine import QUARANTINE_LOG
from anonymization.screening import REASON_CRASH

PYDICOM_INPUT_WARNINGS = [  # pydicom reading deliberately odd or broken inputs: expected
    pytest.mark.filterwarnings("ignore:VR lookup failed:UserWarning"),
    pytest.mark.filterwarnings("ignore:The value length:UserWarning"),
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
]
pytestmark = [pytest.mark.integration, *PYDICOM_INPUT_WARNINGS]

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
ID_KEYWORDS = {
    "PatientID", "OtherPatientIDs", "AccessionNumber", "MedicalRecordLocator", "StudyID", "RequestedProcedureID",
    "AdmissionID", "PatientAddress", "PatientTelephoneNumbers", "IssuerOfPatientID", "PatientBirthName",
    "PatientMotherBirthName", "OtherPatientNames",
}
INSTITUTION_KEYWORDS = {"InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName"}
GENERIC = {"ANONYMIZED", "ANONYMOUS", "ANONYMISED", "UNKNOWN", "NONE", "TEST", "ANON"}


def real_files() -> list[Path]:
    """pydicom's own test files and, when installed, pydicom-data's (never downloads)."""
    files = sorted(p for p in PYDICOM_FILES.rglob("*") if p.is_file())
    try:
        import data_store  # the pydicom-data package
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("pydicom-data is not installed: it is a dev dependency (pip install -e '.[dev]')")
        warnings.warn("pydicom-data is not installed: only pydicom's bundled test files are used", stacklevel=1)
    else:
        files += sorted(p for p in (Path(data_store.__file__).parent / "data").rglob("*") if p.is_file())
    return files


@dataclass
class Input:
    name: str
    values: set[str]  # names, IDs, UIDs, institution: must appear in no output byte
    dates: set[str]  # YYYYMMDD: must not appear in this file's own output
    sop: str
    pixels: np.ndarray | None
    patient: str  # the identity the engine keys the date shift with


def _texts(value: object) -> list[str]:
    if isinstance(value, (list, MultiValue)):
        return [str(v) for v in value]
    if isinstance(value, bytes):
        return [value.decode("latin-1", "replace")]
    return [str(value)]


def _alnum(text: str) -> int:
    return sum(ch.isalnum() for ch in text)


def identifying_values(ds: pydicom.Dataset, vendors: set[str]) -> tuple[set[str], set[str]]:
    values: set[str] = set()
    dates: set[str] = set()
    for elem in ds.iterall():
        if elem.tag.is_private or elem.value in (None, "", b""):
            continue
        keyword = elem.keyword
        for text in _texts(elem.value):
            text = text.strip().strip("\x00").strip()
            if elem.VR == "PN" or keyword in ID_KEYWORDS:
                # long enough not to turn up by chance in pixel bytes or in the hex digests
                # and numbers of the audit trail (digits only: 8 or more); not a placeholder
                letters = any(c.isalpha() for c in text)
                long_enough = _alnum(text) >= (4 if letters and any(c.isdigit() for c in text) else 5 if letters else 8)
                if long_enough and text.upper() not in GENERIC:
                    values.add(text)
            elif keyword in INSTITUTION_KEYWORDS:
                if _alnum(text) >= 4 and not any(v in text.upper() or text.upper() in v for v in vendors):
                    values.add(text)  # test files often name the vendor as institution: not PHI
            elif elem.VR == "UI" and int(elem.tag) not in TYPE_UID_TAGS:
                if len(text) > 12 and not is_well_known_uid(text):
                    values.add(text)
            elif elem.VR in ("DA", "DT"):
                match = re.match(r"(\d{8})", text)
                if match and not match.group(1).startswith("1900"):
                    dates.add(match.group(1))
    return values, dates


def read_inputs(src: Path) -> list[Input]:
    datasets = {}
    for path in sorted(src.iterdir()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                datasets[path.name] = pydicom.dcmread(path, force=True)
            except Exception:  # noqa: BLE001 - not DICOM: nothing to look for
                continue
    vendors = {str(ds.get("Manufacturer", "")).strip().upper() for ds in datasets.values()} - {""}
    inputs = []
    for name, ds in datasets.items():
        try:
            values, dates = identifying_values(ds, vendors)
        except Exception:  # noqa: BLE001 - an element that cannot be decoded
            continue
        pixels = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                pixels = ds.pixel_array if "PixelData" in ds else None
            except Exception:  # noqa: BLE001 - did not decode before: nothing to keep
                pixels = None
        sop = str(ds.get("SOPInstanceUID", "") or "").strip("\x00 ")
        inputs.append(Input(name, values, dates, sop, pixels, original_patient_id(ds)))
    return inputs


@dataclass
class Run:
    src: Path
    dst: Path
    summary: DeidSummary
    files: int
    inputs: list[Input]
    pseudo: Pseudonymizer
    records: list[dict[str, str]]


def _deid_command(src: Path, dst: Path, key: Path, policy_file: Path | None, workers: int) -> DeidSummary:
    """``medfed deid run`` itself (the Typer command, in this process); its summary line parsed back."""
    from typer.testing import CliRunner

    from medfed.cli import app

    args = ["deid", "run", str(src), str(dst), "--key", str(key), "--no-progress", "--workers", str(workers)]
    if policy_file is not None:
        args += ["--policy", str(policy_file)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    line = " ".join(result.output.split())
    counts = {}
    for name, pattern in (("deidentified", r"de-identified (\d+)"), ("quarantined", r"quarantined (\d+)"),
                          ("skipped", r"skipped (\d+) duplicate")):
        match = re.search(pattern, line)
        counts[name] = int(match.group(1)) if match else 0
    return DeidSummary(dst=dst, quarantine_dir=dst.parent / f"{dst.name}-quarantine", audit_dir=dst / "audit",
                       manifest=dst / "manifest.csv", **counts)


def _policy_file(root: Path, policy: Policy | None) -> Path | None:
    """The policy as the site's TOML file (what a privacy officer signs off)."""
    if policy is None:
        return None
    path = root / "policy.toml"
    fields = policy.model_dump(exclude={"reid", "limits"})
    path.write_text("".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in fields.items()))
    return path


def _run(root: Path, policy: Policy | None, workers: int = 1) -> Run:
    src = root / "src"
    src.mkdir(parents=True)
    files = real_files()
    for i, path in enumerate(files):
        shutil.copyfile(path, src / f"{i:03d}_{path.name}")
    summary = _deid_command(src, root / "dst", root / "site.key", _policy_file(root, policy), workers)
    log = summary.quarantine_dir / QUARANTINE_LOG
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    pseudo = Pseudonymizer(load_or_create_secret(root / "site.key"))
    return Run(src, root / "dst", summary, len(files), read_inputs(src), pseudo, records)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _run(tmp_path_factory.mktemp("real-default"), None)


@pytest.fixture(scope="module")
def cleaning_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    policy = Policy(
        retain_safe_private=True,
        retain_patient_characteristics=True,
        clean_descriptors=True,
        clean_structured_content=True,
        clean_graphics=True,
        keep_text_in_unlisted_sequences=True,
    )
    return _run(tmp_path_factory.mktemp("real-cleaning"), policy, workers=2)  # and through the process pool


RUNS = ["default_run", "cleaning_run"]


@pytest.mark.parametrize("run_name", RUNS)
def test_every_file_deidentified_or_quarantined_with_a_reason(run_name: str, request: pytest.FixtureRequest) -> None:
    run: Run = request.getfixturevalue(run_name)
    s = run.summary
    assert run.files >= 150  # 86 of pydicom's + 68 of pydicom-data's, give or take
    assert s.deidentified + s.quarantined + s.skipped == run.files
    assert s.deidentified >= 40
    assert len(run.records) == s.quarantined
    assert all(r["reason"] for r in run.records)
    assert not [r for r in run.records if r["reason"].startswith(REASON_CRASH)]  # no worker died
    for record in run.records:  # the reason never carries a value from the file
        assert not any(v in record["reason"] for i in run.inputs for v in i.values)


@pytest.mark.parametrize("run_name", RUNS)
def test_no_identifying_value_in_any_output_byte(run_name: str, request: pytest.FixtureRequest) -> None:
    run: Run = request.getfixturevalue(run_name)
    blobs = {p: p.read_bytes() for p in run.dst.rglob("*") if p.is_file()}
    assert len(blobs) > run.summary.deidentified
    leaks = []
    for source in run.inputs:
        for value in source.values:
            needle = value.encode("latin-1", "replace")
            leaks += [f"{source.name}: {value!r} in {p.name}" for p, blob in blobs.items() if needle in blob]
    outputs = {p.stem: blobs[p] for p in blobs if p.suffix == ".dcm"}
    for source in run.inputs:
        out = outputs.get(run.pseudo.uid(source.sop)) if source.sop else None
        if out is not None:
            # one of the file's dates shifted by the patient's offset may land on another of them by chance
            offset = run.pseudo.date_offset_days(source.patient)
            shifted = {shift_da(d, offset) for d in source.dates}
            leaks += [f"{source.name}: date {d}" for d in source.dates - shifted if d.encode() in out]
    assert not leaks, "\n".join(leaks[:40])


@pytest.mark.parametrize("run_name", RUNS)
def test_pixels_that_decoded_still_decode(run_name: str, request: pytest.FixtureRequest) -> None:
    run: Run = request.getfixturevalue(run_name)
    by_sop: dict[str, list[Input]] = {}
    for source in run.inputs:
        if source.sop:
            by_sop.setdefault(run.pseudo.uid(source.sop), []).append(source)
    checked = 0
    for path in (run.dst / "images").rglob("*.dcm"):
        candidates = [s for s in by_sop.get(path.stem, []) if s.pixels is not None]
        if not candidates:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = pydicom.dcmread(path).pixel_array
        assert any(c.pixels.shape == out.shape and np.array_equal(c.pixels, out) for c in candidates), path.name
        checked += 1
    assert checked >= 30


def test_outputs_are_whole_and_marked(default_run: Run) -> None:
    leftovers = [p for p in default_run.dst.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert not leftovers
    for path in default_run.dst.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert not any(e.tag.is_private for e in ds.iterall())


# ---- the awkward encodings, one file per run ---------------------------------------------------
def _one(tmp_path: Path, name: str, data: bytes | None = None) -> tuple[DeidSummary, list[Path]]:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    target = src / Path(name).name
    if data is None:
        shutil.copyfile(PYDICOM_FILES / name if (PYDICOM_FILES / name).exists() else _pydicom_data(name), target)
    else:
        target.write_bytes(data)
    summary = run_deid(src, tmp_path / "dst", tmp_path / "site.key", progress=False)
    outputs = sorted((tmp_path / "dst").rglob("*.dcm"))
    assert not [p for p in (tmp_path / "dst").rglob("*") if p.suffix == ".tmp"]
    return summary, outputs


def _pydicom_data(name: str) -> Path:
    data_store = pytest.importorskip("data_store")
    return Path(data_store.__file__).parent / "data" / name


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_bigendian.dcm",  # explicit VR big endian
        "rtdose_expb.dcm",  # big endian, multi-frame dose
        "MR_small_implicit.dcm",  # implicit VR little endian
        "ExplVR_LitEndNoMeta.dcm",  # no file meta
        "ExplVR_BigEndNoMeta.dcm",  # no file meta, big endian
        "CT_small_deflated.dcm",  # deflated (made here: pydicom's own deflated file is a Secondary Capture)
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "emri_small.dcm",  # multi-frame (pydicom-data)
        "emri_small_big_endian.dcm",
        "rtplan.dcm",  # no pixels: objects/
    ],
)
def test_encodings_deidentified_and_readable(tmp_path: Path, name: str) -> None:
    if name == "CT_small_deflated.dcm":
        ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        source = tmp_path / name
        ds.save_as(source, enforce_file_format=True)
        shutil.move(source, tmp_path / "made.dcm")
        source = tmp_path / "made.dcm"
    else:
        source = PYDICOM_FILES / name if (PYDICOM_FILES / name).exists() else _pydicom_data(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = pydicom.dcmread(source, force=True)
        before = original.pixel_array if "PixelData" in original else None
    summary, outputs = _one(tmp_path, name, source.read_bytes())
    assert summary.deidentified == 1, summary
    (out_path,) = outputs
    out = pydicom.dcmread(out_path)  # with file meta, DICM prefix
    assert out.PatientIdentityRemoved == "YES"
    assert out.SOPInstanceUID != original.SOPInstanceUID
    if before is not None:
        assert np.array_equal(out.pixel_array, before)
        if int(original.get("NumberOfFrames", 1) or 1) > 1:
            assert out.pixel_array.shape[0] == int(original.NumberOfFrames)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("dicomdirtests/DICOMDIR", "DICOMDIR"),
        ("MR_truncated.dcm", "truncated"),
        ("rtplan_truncated.dcm", "truncated"),
        ("README.txt", "not a DICOM file"),
        ("zipMR.gz", "not a DICOM file"),
        ("no_meta.dcm", "not a DICOM file"),
        ("nested_priv_SQ.dcm", "not a composite DICOM instance"),
        ("image_dfl.dcm", "Secondary Capture"),  # deflated, but a screen-like capture
        ("ExplVR_BigEnd.dcm", "ultrasound"),
    ],
)
def test_bad_or_foreign_files_quarantined(tmp_path: Path, name: str, reason: str) -> None:
    summary, outputs = _one(tmp_path, name)
    assert summary.quarantined == 1 and not outputs
    (record,) = [json.loads(line) for line in (summary.quarantine_dir / QUARANTINE_LOG).read_text().splitlines()]
    assert reason in record["reason"]


@pytest.mark.parametrize("cut", [0, 1, 100, 128, 132, 300, 1000, -2000, -1])
def test_truncated_anywhere_is_quarantined_never_half_written(tmp_path: Path, cut: int) -> None:
    whole = (PYDICOM_FILES / "CT_small.dcm").read_bytes()
    summary, outputs = _one(tmp_path, "CT_small.dcm", whole[:cut] if cut else b"")
    assert summary.quarantined == 1 and summary.deidentified == 0 and not outputs
