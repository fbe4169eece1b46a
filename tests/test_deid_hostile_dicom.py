"""Hostile DICOM content: decompression bombs, forged re-identification rows, unclean "C" values.

Every attack here is a file or table row an adversary can hand the site; each test
fails if the defence it covers is removed.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

from anonymization import limits
from anonymization.batch import run_deid
from anonymization.policy import DEFAULT_MAX_INFLATED_BYTES, DEFAULT_MAX_PIXEL_BYTES, Policy, parse_policy
from tests import dicom_factory as factory

pytestmark = pytest.mark.adversarial

ROOT = Path(__file__).resolve().parents[1]
BOMB_SIDE = 16384  # an RLE header declaring 16384 x 16384 x 16 bits: 512 MiB from under a kilobyte
INFLATED_ZEROS = 300 * 1024 * 1024  # the deflated bomb's run of zeros, inflated


# ---- the bombs -------------------------------------------------------------------------
def rle_bomb(path: Path) -> Path:
    """An RLE Lossless CT whose header declares 16384 x 16384 16-bit pixels, with two tiny segments."""
    ds = factory.make_ct()
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.Rows = ds.Columns = BOMB_SIDE
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    segment = bytes([0x81, 0x00]) * 4  # four runs of 128 zero bytes: 8 bytes of a 256 MiB segment
    header = struct.pack("<16L", 2, 64, 64 + len(segment), *([0] * 13))
    ds.PixelData = encapsulate([header + segment + segment])
    ds["PixelData"].VR = "OB"
    factory.write(ds, path)
    assert path.stat().st_size < 4096
    return path


def deflate_bomb(path: Path, zeros: int = INFLATED_ZEROS) -> Path:
    """A Deflated Explicit VR Little Endian CT whose deflated data set ends in ``zeros`` zero bytes.

    The zeros are Data Set Trailing Padding (FFFC,FFFC), which any reader accepts; the
    stream is built a megabyte at a time, so the test never holds the inflated file.
    """
    ds = factory.make_ct()
    body = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    pydicom.dcmwrite(body, ds, enforce_file_format=True)
    small = body.getvalue()
    meta_end = 132 + 12 + struct.unpack("<L", small[132 + 8:132 + 12])[0]  # after (0002,0000) and its group
    meta_ds = pydicom.dcmread(io.BytesIO(small), stop_before_pixels=True)
    meta_ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(out, meta_ds.file_meta, enforce_standard=True)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out.write(deflater.compress(small[meta_end:]))
    out.write(deflater.compress(struct.pack("<HH2sHL", 0xFFFC, 0xFFFC, b"OB", 0, zeros)))
    chunk = bytes(1 << 20)
    for _ in range(zeros // len(chunk)):
        out.write(deflater.compress(chunk))
    out.write(deflater.compress(bytes(zeros % len(chunk))) + deflater.flush())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue())
    assert path.stat().st_size < 1024 * 1024
    return path


def quarantine_reasons(summary) -> list[str]:
    log = summary.quarantine_dir / "quarantine.jsonl"
    return [json.loads(line)["reason"] for line in log.read_text().splitlines()] if log.exists() else []


# ---- decompression bombs ------------------------------------------------------------------
def test_rle_bomb_is_quarantined_before_decoding(tmp_path: Path) -> None:
    rle_bomb(tmp_path / "src" / "bomb.dcm")
    summary = run_deid(tmp_path / "src", tmp_path / "out", tmp_path / "k.key", progress=False)
    assert quarantine_reasons(summary) == [limits.REASON_PIXEL_LIMIT]
    assert not list((tmp_path / "out").rglob("*.dcm"))


def test_deflate_bomb_is_quarantined_before_inflating(tmp_path: Path) -> None:
    deflate_bomb(tmp_path / "src" / "bomb.dcm")
    summary = run_deid(tmp_path / "src", tmp_path / "out", tmp_path / "k.key", progress=False)
    assert quarantine_reasons(summary) == [limits.REASON_INFLATE_LIMIT]
    assert not list((tmp_path / "out").rglob("*.dcm"))


def test_deflated_file_under_the_limit_is_still_deidentified(tmp_path: Path) -> None:
    """The bound is a limit, not a ban: a deflated file that inflates to little goes through."""
    deflate_bomb(tmp_path / "src" / "small.dcm", zeros=1024)
    summary = run_deid(tmp_path / "src", tmp_path / "out", tmp_path / "k.key", progress=False)
    assert quarantine_reasons(summary) == []
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 1


def test_limits_come_from_the_site_policy(tmp_path: Path) -> None:
    """A site with larger images raises the limit; a smaller one quarantines an ordinary CT."""
    policy = parse_policy({"limits": {"max_pixel_bytes": 1024}})
    factory.write(factory.make_ct(), tmp_path / "src" / "ct.dcm")
    summary = run_deid(tmp_path / "src", tmp_path / "out", tmp_path / "k.key", progress=False, policy=policy)
    assert quarantine_reasons(summary) == [limits.REASON_PIXEL_LIMIT]
    assert Policy().limits.max_pixel_bytes == DEFAULT_MAX_PIXEL_BYTES
    assert Policy().limits.max_inflated_bytes == DEFAULT_MAX_INFLATED_BYTES
    with pytest.raises(Exception, match="limits.max_pixel_bytes"):
        parse_policy({"limits": {"max_pixel_bytes": 0}})
    with pytest.raises(Exception, match="limits.max_pixels"):
        parse_policy({"limits": {"max_pixels": 10}})


_PEAK = """
import resource, sys
from pathlib import Path
from anonymization.batch import run_deid
out = Path(sys.argv[1])
summary = run_deid(out / "src", out / "out", out / "k.key", progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.parametrize("bomb", [rle_bomb, deflate_bomb], ids=["rle", "deflate"])
def test_peak_memory_of_a_run_stays_bounded(tmp_path: Path, bomb) -> None:
    """A whole `deid run` on a bomb peaks far below what the bomb declares (RSS, in its own process)."""
    bomb(tmp_path / "src" / "bomb.dcm")
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_mib = int(proc.stdout.strip().splitlines()[-1])
    assert peak_mib < 250, f"peak RSS {peak_mib} MiB"


# ---- clean ("C") actions keep only values that have their attribute's form -------------------
def _deidentify(ds, *, converted: bool, policy: Policy | None = None):
    """Through a file and the engine: raw elements (fast paths) or converted ones (normal path)."""
    from anonymization.engine import Deidentifier
    from anonymization.pseudonyms import Pseudonymizer

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    read = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    if converted:
        for _ in read:  # converts every raw element: the engine's normal path
            pass
    Deidentifier(Pseudonymizer(b"s" * 32), policy=policy or Policy()).deidentify(read)
    return read


@pytest.mark.parametrize("converted", [False, True], ids=["raw", "converted"])
@pytest.mark.parametrize(
    ("keyword", "value", "kept"),
    [
        ("TimezoneOffsetFromUTC", "Zelda Phiname", False),  # free text in an SH "+HHMM": removed (basic X)
        ("TimezoneOffsetFromUTC", "+2500", False),  # no such offset
        ("TimezoneOffsetFromUTC", "-0500", True),
        ("StudyTime", "see Zelda", False),  # free text in a TM: emptied (basic Z)
        ("StudyTime", "101530.25", True),
    ],
)
def test_clean_action_drops_values_without_their_form(keyword: str, value: str, kept: bool, converted: bool) -> None:
    ds = factory.make_ct()
    ds.add_new(pydicom.datadict.tag_for_keyword(keyword), pydicom.datadict.dictionary_VR(keyword), value)
    out = _deidentify(ds, converted=converted)
    result = str(out.get(keyword, "") or "")
    if kept:
        assert result == value
    else:
        assert "Zelda" not in result and result != value


@pytest.mark.parametrize("converted", [False, True], ids=["raw", "converted"])
def test_clean_action_on_a_malformed_date_does_not_keep_it(converted: bool) -> None:
    """Under Modified Dates, a Study Date that is not a DA is not kept (nor shifted into something)."""
    ds = factory.make_ct()
    ds.StudyDate = "Zelda 1961"
    out = _deidentify(ds, converted=converted)
    assert str(out.get("StudyDate", "") or "") == ""
