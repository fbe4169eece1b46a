"""Keyed pseudonyms: format, determinism, and dependence on the secret."""

from __future__ import annotations

import hashlib
import hmac
import re

from anonymization.dates import shift_da, shift_dt
from anonymization.pseudonyms import Pseudonymizer

SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))
UID_RE = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")


def test_uid_is_hmac_of_original_in_2_25_form() -> None:
    p = Pseudonymizer(SECRET)
    original = "1.2.826.0.1.3680043.8.498.12345"
    new = p.uid(original)
    expected = int.from_bytes(hmac.new(SECRET, original.encode(), hashlib.sha256).digest()[:16], "big")
    assert new == f"2.25.{expected}"
    assert UID_RE.match(new) and len(new) <= 64
    assert p.uid(original) == Pseudonymizer(SECRET).uid(original)
    assert Pseudonymizer(OTHER).uid(original) != new
    assert p.uid(original + "1") != new


def test_identifier_pseudonyms_fit_their_vrs_and_are_keyed() -> None:
    p, q = Pseudonymizer(SECRET), Pseudonymizer(OTHER)
    acc = p.accession("ACC-0001")
    pid = p.patient_id("MRN-0001")
    assert len(acc) <= 16 and re.fullmatch(r"[A-Z2-7]+", acc)
    assert len(pid) <= 64 and re.fullmatch(r"[A-Z2-7]+", pid)
    assert acc == p.accession("ACC-0001") and acc != q.accession("ACC-0001")
    assert pid == p.patient_id("MRN-0001") and pid != q.patient_id("MRN-0001")
    # Domain separation: the same string as patient and accession gives unrelated values.
    assert p.patient_id("X")[1:16] != p.accession("X")[1:16]
    assert "ACC-0001" not in acc and "MRN-0001" not in pid


def test_date_offset_range_and_determinism() -> None:
    p = Pseudonymizer(SECRET)
    offsets = {p.date_offset_days(f"patient-{i}") for i in range(200)}
    assert all(-3650 <= o <= -365 for o in offsets)
    assert len(offsets) > 150  # spread out, not a constant
    assert p.date_offset_days("patient-1") == Pseudonymizer(SECRET).date_offset_days("patient-1")


def test_digest_is_plain_hmac_sha256() -> None:
    data = b"some bytes"
    assert Pseudonymizer(SECRET).digest(data) == hmac.new(SECRET, data, hashlib.sha256).hexdigest()
    assert Pseudonymizer(OTHER).digest(data) != Pseudonymizer(SECRET).digest(data)


def test_date_shifting_keeps_precision_time_and_offset() -> None:
    assert shift_da("20210315", -10) == "20210305"
    assert shift_da("2021.03.15", -15) == "20210228"
    assert shift_da("20210101-20210131", -1) == "20201231-20210130"
    assert shift_da("2021031", -1) is None
    assert shift_da("", -1) == ""
    assert shift_dt("20210315101530.123456+0100", -365) == "20200315101530.123456+0100"
    assert shift_dt("202103", -400) == "202001"
    assert shift_dt("2021", -400) == "2019"
    assert shift_dt("garbage", -1) is None
