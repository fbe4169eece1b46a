"""The site's de-identification policy: which PS3.15 options apply, chosen in a TOML file.

The privacy officer signs off one file, not a command line: every option of PS3.15
Annex E that this product implements is a field here, validated by pydantic, and an
error names the field and says what to do. The default policy (no file) is the Basic
Application Confidentiality Profile with Retain Longitudinal Temporal Information with
Modified Dates, which is what medfed has always done.

Relative paths in the file (the re-identification table, the officer's public key)
are taken relative to the file's folder, so a policy and its key can travel together.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from anonymization.errors import DeidError
from anonymization.table import OPTION_COLUMNS

POLICY_VERSION = 1
EXAMPLE_RESOURCE = "policy.example.toml"

# Table E.1-1 option columns, in the order they are applied (named once, in anonymization.table).
TABLE_OPTIONS: tuple[str, ...] = OPTION_COLUMNS
# Options that are not a column of the table (the pixel cleaning lives in pixels.py).
OTHER_OPTIONS: tuple[str, ...] = ("clean_pixel_data",)



class Code(NamedTuple):
    """A coded concept (Code Value, Coding Scheme Designator, Code Meaning)."""

    value: str
    scheme_designator: str
    meaning: str


# PS3.16 CID 7050 (De-identification Method), written out rather than taken from
# pydicom.sr.codedict: importing pydicom.sr loads every SR concept pydicom knows
# (~0.15 s per process, paid by each `deid run` and each of its workers).
# tests/anonymization/test_deid_policy.py checks every code here against pydicom's CID 7050.
BASIC_PROFILE_CODE = Code("113100", "DCM", "Basic Application Confidentiality Profile")
# The code of each option, in the order PS3.16 lists them.
_CODES: dict[str, Code] = {
    "clean_pixel_data": Code("113101", "DCM", "Clean Pixel Data Option"),
    "clean_graphics": Code("113103", "DCM", "Clean Graphics Option"),
    "clean_structured_content": Code("113104", "DCM", "Clean Structured Content Option"),
    "clean_descriptors": Code("113105", "DCM", "Clean Descriptors Option"),
    "retain_longitudinal_full_dates": Code(
        "113106", "DCM", "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain_longitudinal_modified_dates": Code(
        "113107", "DCM", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": Code("113108", "DCM", "Retain Patient Characteristics Option"),
    "retain_device_identity": Code("113109", "DCM", "Retain Device Identity Option"),
    "retain_uids": Code("113110", "DCM", "Retain UIDs Option"),
    "retain_safe_private": Code("113111", "DCM", "Retain Safe Private Option"),
    "retain_institution_identity": Code("113112", "DCM", "Retain Institution Identity Option"),
}


class PolicyError(DeidError):
    """The policy file is missing, not TOML, or has a field with a bad value."""


class ReidSettings(BaseModel):
    """Where the encrypted re-identification table goes and whose key can open it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    table: Path = Field(description="Append-only encrypted table (keep it outside the de-identified store).")
    officer_public_key: Path = Field(
        description="The privacy officer's X25519 public key (PEM), from `medfed deid reid-keygen`."
    )


# Decoded/inflated sizes a file may declare before it is quarantined unread (decompression
# bombs): large enough for a multi-frame enhanced CT, small enough that a run's peak memory
# stays bounded whatever a file claims. See docs/deidentification.md.
DEFAULT_MAX_PIXEL_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_INFLATED_BYTES = 256 * 1024 * 1024


class LimitSettings(BaseModel):
    """Sizes checked before pixel data is decoded or a deflated data set inflated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_pixel_bytes: int = Field(
        DEFAULT_MAX_PIXEL_BYTES, gt=0,
        description="Most bytes the pixel data may declare (rows x columns x frames x samples x bytes per sample).",
    )
    max_inflated_bytes: int = Field(
        DEFAULT_MAX_INFLATED_BYTES, gt=0,
        description="Most bytes a Deflated Explicit VR Little Endian data set may inflate to.",
    )


class Policy(BaseModel):
    """PS3.15 Annex E options for one site (field names follow Table E.1-1's columns)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = POLICY_VERSION
    retain_safe_private: bool = False
    retain_uids: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_patient_characteristics: bool = False
    retain_longitudinal_full_dates: bool = False
    retain_longitudinal_modified_dates: bool = True
    clean_descriptors: bool = False
    clean_structured_content: bool = False
    clean_graphics: bool = False
    clean_pixel_data: bool = False
    # Not a PS3.15 option: text (SH, LO, ST, LT, UT, UC) inside sequences the table does
    # not list, and inside kept private sequences, is removed unless this keeps it
    # (after cleaning with the same scrubber as Clean Descriptors).
    keep_text_in_unlisted_sequences: bool = False
    reid: ReidSettings | None = None
    limits: LimitSettings = LimitSettings()

    @model_validator(mode="after")
    def _dates_exclusive(self) -> Policy:
        if self.retain_longitudinal_full_dates and self.retain_longitudinal_modified_dates:
            raise ValueError(
                "retain_longitudinal_full_dates and retain_longitudinal_modified_dates are "
                "mutually exclusive: set one of them to false (the default policy sets "
                "retain_longitudinal_modified_dates = true)"
            )
        return self

    # ---- derived views ------------------------------------------------------------
    @property
    def table_options(self) -> tuple[str, ...]:
        """The Table E.1-1 option columns this policy applies, in table order."""
        return tuple(name for name in TABLE_OPTIONS if getattr(self, name))

    @property
    def applied_options(self) -> tuple[str, ...]:
        """Every option applied (table columns and Clean Pixel Data), for records."""
        return self.table_options + tuple(name for name in OTHER_OPTIONS if getattr(self, name))

    @property
    def longitudinal_temporal_information(self) -> str:
        """Value of Longitudinal Temporal Information Modified (0028,0303)."""
        if self.retain_longitudinal_modified_dates:
            return "MODIFIED"
        if self.retain_longitudinal_full_dates:
            return "UNMODIFIED"
        return "REMOVED"

    def method_codes(self) -> list[Code]:
        """CID 7050 codes for the De-identification Method Code Sequence: profile, then options."""
        return [BASIC_PROFILE_CODE] + [code for name, code in _CODES.items() if getattr(self, name)]

    def fingerprint(self) -> str:
        """Short digest of the options (not paths), to tell policies apart in records."""
        payload = json.dumps(self.applied_options + (f"text:{self.keep_text_in_unlisted_sequences}",))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @classmethod
    def from_options(cls, options: tuple[str, ...] | list[str]) -> Policy:
        """A policy with exactly these option names set (the others false)."""
        unknown = [o for o in options if o not in TABLE_OPTIONS + OTHER_OPTIONS]
        if unknown:
            raise PolicyError(
                f"unknown de-identification option(s): {unknown}; known: {list(TABLE_OPTIONS + OTHER_OPTIONS)}"
            )
        values: dict[str, Any] = {name: (name in options) for name in TABLE_OPTIONS + OTHER_OPTIONS}
        return cls(**values)


DEFAULT_POLICY = Policy()


def _field_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(file)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field; check its spelling against anonymization/data/policy.example.toml"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"field `{loc}`: {msg}")
    return "; ".join(lines)


def parse_policy(data: dict[str, Any], *, base: Path | None = None, source: str = "policy") -> Policy:
    """Validate a policy mapping (as read from TOML); relative paths are resolved against ``base``."""
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(f"{source}: {_field_errors(exc)}") from None
    if policy.reid is not None and base is not None:
        reid = ReidSettings(
            table=policy.reid.table if policy.reid.table.is_absolute() else base / policy.reid.table,
            officer_public_key=(
                policy.reid.officer_public_key
                if policy.reid.officer_public_key.is_absolute()
                else base / policy.reid.officer_public_key
            ),
        )
        policy = policy.model_copy(update={"reid": reid})
    return policy


def load_policy(path: Path | str | None) -> Policy:
    """Read and validate a policy file; ``None`` gives the default policy."""
    if path is None:
        return DEFAULT_POLICY
    path = Path(path)
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise PolicyError(
            f"cannot read policy file {path}: {exc.strerror}; pass the site's policy TOML "
            "(see anonymization/data/policy.example.toml)"
        ) from None
    except UnicodeDecodeError:
        raise PolicyError(f"policy file {path} is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy file {path} is not valid TOML: {exc}") from None
    return parse_policy(data, base=path.resolve().parent, source=f"policy file {path}")


def example_policy_text() -> str:
    """The documented example policy shipped with the package."""
    from importlib import resources

    return resources.files("anonymization").joinpath("data", EXAMPLE_RESOURCE).read_text("utf-8")
