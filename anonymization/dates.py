"""Shifting DICOM DA and DT values by a whole number of days.

Whole days keep times of day (TM) and every interval within a patient intact,
which is what the Retain Longitudinal Temporal Information with Modified Dates
option asks for. Values that do not parse are reported as ``None`` so the
caller can empty them rather than let an unrecognised date through.
"""

from __future__ import annotations

import datetime as _dt
import re

_DT_RE = re.compile(r"^(\d{4})(\d{2})?(\d{2})?((?:\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?(?:[+-]\d{4})?)$")


def _shift(year: int, month: int, day: int, days: int) -> _dt.date | None:
    try:
        return _dt.date(year, month, day) + _dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return None


def shift_da(value: str, days: int) -> str | None:
    """Shift one DA value (``YYYYMMDD``, legacy ``YYYY.MM.DD``, or a ``A-B`` range)."""
    text = value.strip().rstrip("\x00").strip()
    if not text:
        return ""
    if "-" in text:
        parts = text.split("-")
        if len(parts) != 2:
            return None
        shifted = [shift_da(p, days) if p else "" for p in parts]
        if any(s is None for s in shifted):
            return None
        return "-".join(s for s in shifted if s is not None)
    digits = text.replace(".", "")
    if len(digits) != 8 or not digits.isdigit():
        return None
    moved = _shift(int(digits[:4]), int(digits[4:6]), int(digits[6:8]), days)
    return None if moved is None else moved.strftime("%Y%m%d")


def shift_dt(value: str, days: int) -> str | None:
    """Shift the date part of one DT value, keeping its precision, time and UTC offset."""
    text = value.strip().rstrip("\x00").strip()
    if not text:
        return ""
    match = _DT_RE.match(text)
    if match is None:
        return None
    year, month, day, rest = match.groups()
    moved = _shift(int(year), int(month or 1), int(day or 1), days)
    if moved is None:
        return None
    out = f"{moved.year:04d}"
    if month:
        out += f"{moved.month:02d}"
    if day:
        out += f"{moved.day:02d}"
    return out + (rest or "")
