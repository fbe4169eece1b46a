"""Keyed pseudonyms: the only identifiers that leave the de-identification step.

Everything is HMAC-SHA256 under the site secret, so pseudonyms are stable across
files, runs and worker processes, differ between sites, and cannot be reversed
or recomputed without the secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

# Domain-separation labels: the same value used as a patient ID and as an
# accession number must not yield related pseudonyms.
_PATIENT = b"medfed/patient-id\x00"
_ACCESSION = b"medfed/accession\x00"
_DATE_OFFSET = b"medfed/date-offset\x00"

# Offsets move every date of a patient 1 to 10 years into the past.
MIN_OFFSET_DAYS = 365
MAX_OFFSET_DAYS = 3650


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=")


class Pseudonymizer:
    """Derives every pseudonym of one site from its secret."""

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, (bytes, bytearray)) or len(secret) < 16:
            raise ValueError("the site secret must be at least 16 bytes")
        self._secret = bytes(secret)
        self._uid_cache: dict[str, str] = {}

    def _mac(self, data: bytes) -> bytes:
        return hmac.new(self._secret, data, hashlib.sha256).digest()

    def uid(self, uid: str) -> str:
        """``2.25.<int>`` from the first 16 bytes of HMAC(secret, uid): <= 44 chars, valid UID."""
        key = uid.strip().rstrip("\x00").strip()
        cached = self._uid_cache.get(key)
        if cached is None:
            number = int.from_bytes(self._mac(key.encode("ascii", "replace"))[:16], "big")
            cached = f"2.25.{number}"
            if len(self._uid_cache) < 100_000:
                self._uid_cache[key] = cached
        return cached

    def patient_id(self, value: str) -> str:
        """``P`` + 20 base32 chars (100 bits): fits LO and a file name."""
        return "P" + _b32(self._mac(_PATIENT + value.strip().encode("utf-8")))[:20]

    def accession(self, value: str) -> str:
        """``A`` + 15 base32 chars (75 bits): exactly 16 chars, the SH maximum."""
        return "A" + _b32(self._mac(_ACCESSION + value.strip().encode("utf-8")))[:15]

    def digest(self, data: bytes) -> str:
        """Keyed hex digest of ``data`` (plain HMAC-SHA256, verifiable with the key)."""
        return hmac.new(self._secret, data, hashlib.sha256).hexdigest()

    def date_offset_days(self, patient_id: str) -> int:
        """Per-patient shift in days, in [-3650, -365]; same patient, same shift."""
        raw = int.from_bytes(self._mac(_DATE_OFFSET + patient_id.strip().encode("utf-8"))[:8], "big")
        span = MAX_OFFSET_DAYS - MIN_OFFSET_DAYS + 1
        return -(MIN_OFFSET_DAYS + raw % span)
