"""The site's re-identification table: pseudonym -> original identifiers, encrypted.

A site may need to link a result (a flagged pseudonym, a model's error case) back to
its own patient. The table that allows it must never exist in clear on the site
machine, and the site machine must not be able to read it back: each row is sealed
to the privacy officer's X25519 public key (ECIES: an ephemeral X25519 key per row,
HKDF-SHA256, AES-256-GCM), so the de-identification run can append rows but only
the holder of the officer's private key - kept off the site machine, encrypted with
a passphrase - can open them (``medfed deid reid-lookup``).

Encryption alone does not say who wrote a row: anyone with the officer's *public* key
can seal one, and a forged row would make a lookup return another patient. So every
row is also signed with the site's Ed25519 audit signing key (:mod:`anonymization.audit.keys`),
and a lookup refuses an unsigned row or one whose signature does not verify.

File format (JSON lines, append-only), version 2:

* line 1, header: ``{"medfed_reid": 2, "officer_key": <SHA-256 of the public key>,
  "site_key": <the site's Ed25519 public key, base64>}``; appending with another
  officer key is refused (rows would be unreadable by the officer).
* one line per (patient, study): ``{"k": <keyed digest>, "epk": ..., "nonce": ...,
  "ct": ..., "kid": <site key id>, "sig": ...}`` (base64). ``k`` is an HMAC under the
  site secret of the identifiers, only used to avoid appending the same row twice; it
  reveals nothing without the secret. The plaintext (inside ``ct``) is a JSON object
  of :class:`ReidRecord`. ``sig`` signs the officer key's fingerprint and the row.

Version 1 tables (unsigned rows) are read only with ``accept_unsigned`` and never
appended to. The officer's private key is encrypted under a scrypt-derived key
(:func:`generate_officer_keys`); keys of the older PKCS#8 format (PBKDF2, 2,048
iterations) still open and are re-encrypted by :func:`rekey_officer_key`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from pydicom.dataset import Dataset

from anonymization.audit.keys import AuditSigner, key_id, verify_signature
from anonymization.errors import DeidError
from anonymization.policy import Policy
from anonymization.pseudonyms import Pseudonymizer
from medfed.files import private_file_problem, write_file

FORMAT_VERSION = 2
UNSIGNED_VERSION = 1  # rows not signed: readable only on request, never appended to
_INFO = b"medfed/reid/v1"
_AAD = b"medfed-reid-v1"
_ROW_SIGNATURE = b"medfed-reid-row-v2\x00"
KEY_FILE_VERSION = 2
# scrypt cost of the officer's key file: 2**17 x 8 x 128 bytes = 128 MiB, ~0.3 s per opening.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
_KEY_AAD = b"medfed-officer-key-v2\x00"


class ReidError(DeidError):
    """The re-identification table or a key is unusable; the message says what to do."""


@dataclass(frozen=True)
class ReidRecord:
    """One (patient, study) of the site: pseudonyms and the originals they stand for."""

    patient_pseudonym: str
    patient_id: str
    accession_pseudonym: str
    accession_number: str
    study_uid_pseudonym: str
    study_uid: str

    def matches(self, query: str) -> bool:
        """True if ``query`` is one of this row's pseudonyms."""
        q = query.strip()
        return q in (self.patient_pseudonym, self.accession_pseudonym, self.study_uid_pseudonym)


# ---- keys -------------------------------------------------------------------------
def generate_officer_keys(private_path: Path, public_path: Path, passphrase: bytes) -> str:
    """Create the privacy officer's key pair; return the public key's fingerprint.

    The private key is written PKCS#8, encrypted with ``passphrase``, mode 0600; it
    belongs on the officer's machine. Only the public key goes to the site.
    """
    if len(passphrase) < 8:
        raise ReidError("choose a passphrase of at least 8 characters for the officer's private key")
    private_path, public_path = Path(private_path), Path(public_path)
    for path in (private_path, public_path):
        if path.exists():
            raise ReidError(f"{path} already exists; refusing to overwrite a key (move it away first)")
    key = X25519PrivateKey.generate()
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(_encrypt_private(key, passphrase))
    public_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.write_bytes(public_pem)
    return fingerprint(key.public_key())


def _scrypt(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)


def _encrypt_private(key: X25519PrivateKey, passphrase: bytes) -> bytes:
    """The officer's key file: the raw private key under AES-256-GCM with a scrypt-derived key."""
    salt, nonce = os.urandom(16), os.urandom(12)
    public = _raw(key.public_key())
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    sealed = AESGCM(_scrypt(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)).encrypt(nonce, raw, _KEY_AAD + public)
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    doc = {"medfed_officer_key": KEY_FILE_VERSION, "kdf": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P,
           "salt": b64(salt), "nonce": b64(nonce), "ct": b64(sealed), "public": b64(public)}
    return (json.dumps(doc, indent=1) + "\n").encode("ascii")


def is_legacy_private_key(path: Path) -> bool:
    """True for an officer key in the old PKCS#8 PEM format (PBKDF2, 2,048 iterations)."""
    try:
        return Path(path).read_bytes().lstrip().startswith(b"-----BEGIN")
    except OSError:
        return False


def rekey_officer_key(path: Path, passphrase: bytes) -> None:
    """Re-encrypt an officer key file (any format) under scrypt, in place, keeping mode 0600."""
    key = load_private_key(path, passphrase)
    path = Path(path)
    write_file(path, _encrypt_private(key, passphrase), 0o600)


def fingerprint(public_key: X25519PublicKey) -> str:
    """SHA-256 (hex) of the raw public key: names the key in the table's header."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def load_public_key(path: Path) -> X25519PublicKey:
    """The officer's public key from a PEM file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ReidError(
            f"cannot read the privacy officer's public key {path}: {exc.strerror}; "
            "ask the officer for the .pub.pem file made by `medfed deid reid-keygen`"
        ) from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ReidError(f"{path} is not a PEM public key; use the officer's .pub.pem file") from None
    if not isinstance(key, X25519PublicKey):
        raise ReidError(f"{path} is not an X25519 key; make one with `medfed deid reid-keygen`")
    return key


def load_private_key(path: Path, passphrase: bytes | None) -> X25519PrivateKey:
    """The officer's private key, decrypted with its passphrase."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ReidError(f"cannot read the officer's private key {path}: {exc.strerror}") from None
    if not data.lstrip().startswith(b"-----BEGIN"):
        return _decrypt_private(path, data, passphrase or b"")
    try:  # the older format: PKCS#8 PEM (see rekey_officer_key)
        key = serialization.load_pem_private_key(data, password=passphrase or None)
    except (ValueError, TypeError):
        raise ReidError(
            f"cannot open the officer's private key {path}: wrong passphrase, or not a PEM private key"
        ) from None
    if not isinstance(key, X25519PrivateKey):
        raise ReidError(f"{path} is not an X25519 private key made by `medfed deid reid-keygen`")
    return key


def _decrypt_private(path: Path, data: bytes, passphrase: bytes) -> X25519PrivateKey:
    try:
        doc = json.loads(data)
        if doc.get("medfed_officer_key") != KEY_FILE_VERSION or doc.get("kdf") != "scrypt":
            raise ValueError("unknown key file version")
        salt, nonce, sealed, public = (base64.b64decode(doc[f]) for f in ("salt", "nonce", "ct", "public"))
        n, r, p = int(doc["n"]), int(doc["r"]), int(doc["p"])
        if n > 2**22 or r > 32 or p > 16:  # a hostile file must not make us allocate gigabytes
            raise ValueError("scrypt cost out of range")
    except (ValueError, KeyError, TypeError):
        raise ReidError(f"{path} is not an officer key made by `medfed deid reid-keygen`") from None
    try:
        raw = AESGCM(_scrypt(passphrase, salt, n, r, p)).decrypt(nonce, sealed, _KEY_AAD + public)
    except (InvalidTag, ValueError):
        raise ReidError(
            f"cannot open the officer's private key {path}: wrong passphrase, or the file was altered"
        ) from None
    return X25519PrivateKey.from_private_bytes(raw)


# ---- sealing ----------------------------------------------------------------------
def _derive(shared: bytes, epk: bytes, recipient: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=epk + recipient, info=_INFO).derive(shared)


def _raw(public_key: X25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def seal(record: ReidRecord, public_key: X25519PublicKey, dedupe_key: str) -> str:
    """One table line: ``record`` encrypted to ``public_key`` (no identifier in clear)."""
    ephemeral = X25519PrivateKey.generate()
    epk = _raw(ephemeral.public_key())
    key = _derive(ephemeral.exchange(public_key), epk, _raw(public_key))
    nonce = os.urandom(12)
    plaintext = json.dumps(asdict(record), sort_keys=True).encode("utf-8")
    ciphertext = AESGCM(key).encrypt(nonce, plaintext, _AAD + epk)
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    return json.dumps({"k": dedupe_key, "epk": b64(epk), "nonce": b64(nonce), "ct": b64(ciphertext)})


def open_line(line: str, private_key: X25519PrivateKey) -> ReidRecord:
    """Decrypt one row line (raises ReidError if it was not sealed to this key or was altered)."""
    try:
        row = json.loads(line)
        epk = base64.b64decode(row["epk"])
        nonce = base64.b64decode(row["nonce"])
        ciphertext = base64.b64decode(row["ct"])
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(epk))
        key = _derive(shared, epk, _raw(private_key.public_key()))
        plaintext = AESGCM(key).decrypt(nonce, ciphertext, _AAD + epk)
        return ReidRecord(**json.loads(plaintext))
    except (InvalidTag, ValueError, KeyError, TypeError) as exc:
        raise ReidError(f"a row of the re-identification table cannot be opened ({type(exc).__name__})") from None


def _header(public_key: X25519PublicKey, signer: AuditSigner) -> dict[str, object]:
    return {"medfed_reid": FORMAT_VERSION, "officer_key": fingerprint(public_key),
            "site_key": base64.b64encode(signer.public_raw).decode("ascii")}


def _signed_bytes(officer_key: str, row: dict[str, object]) -> bytes:
    """What a row's signature covers: the officer key it is sealed to and the sealed row."""
    body = {f: row.get(f) for f in ("k", "epk", "nonce", "ct")}
    return _ROW_SIGNATURE + officer_key.encode("ascii") + b"\x00" + json.dumps(body, sort_keys=True).encode("utf-8")


def sign_line(line: str, officer_key: str, signer: AuditSigner) -> str:
    """A sealed row line with the site's signature added (``kid``, ``sig``)."""
    row = json.loads(line)
    row["kid"] = signer.key_id
    row["sig"] = base64.b64encode(signer.sign(_signed_bytes(officer_key, row))).decode("ascii")
    return json.dumps(row)


_MIGRATE = (
    "it is a format-1 table, whose rows are not signed, so a forged row cannot be told from a real one"
)


class ReidTable:
    """Append-only writer used by ``medfed deid run`` (the parent process only).

    Rows are signed with the site's audit signing key (:meth:`use_signer`) as they
    are appended; a table without a signer cannot be appended to.
    """

    def __init__(self, path: Path, public_key: X25519PublicKey, signer: AuditSigner | None = None) -> None:
        self.path = Path(path)
        self.public_key = public_key
        self.signer = signer
        self._seen: set[str] = set()
        self._fh = None
        if self.path.exists():
            lines = self.path.read_text("utf-8").splitlines()
            header = json.loads(lines[0]) if lines else {}
            if header.get("officer_key") != fingerprint(public_key):
                raise ReidError(
                    f"the re-identification table {self.path} was written for another officer key; "
                    "use that key, or start a new table (the old one stays readable by its key)"
                )
            if header.get("medfed_reid") != FORMAT_VERSION:
                raise ReidError(
                    f"cannot append to the re-identification table {self.path}: {_MIGRATE}. Move it aside "
                    "(the officer can still read it with `medfed deid reid-lookup --accept-unsigned`) and run "
                    "again: a new table with signed rows is started"
                )
            for line in lines[1:]:
                if line.strip():
                    self._seen.add(json.loads(line).get("k", ""))

    def use_signer(self, signer: AuditSigner | None) -> None:
        """Sign rows with ``signer``: the site's audit signing key, the one that seals its trail."""
        self.signer = signer

    def __enter__(self) -> ReidTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, dedupe_key: str, line: str) -> bool:
        """Sign and append a sealed line unless a row with the same key is already there."""
        if dedupe_key in self._seen:
            return False
        if self.signer is None:
            raise ReidError("re-identification rows must be signed: the run has no site signing key")
        line = sign_line(line, fingerprint(self.public_key), self.signer)
        if self._fh is None:
            new = not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._fh = os.fdopen(fd, "a", encoding="utf-8")
            if new:
                self._fh.write(json.dumps(_header(self.public_key, self.signer)) + "\n")
        self._fh.write(line + "\n")
        self._seen.add(dedupe_key)
        return True

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None


def read_table(
    path: Path, private_key: X25519PrivateKey, *, site_keys: list[bytes] | None = None, accept_unsigned: bool = False,
) -> Iterator[ReidRecord]:
    """Every row of the table, its signature checked, then decrypted (officer's side).

    ``site_keys``: the site's Ed25519 public keys (raw) the officer trusts, from
    ``medfed audit export-key``; without them, the key named in the table's header.
    Any unsigned row, or one whose signature does not verify, stops the read: the
    table was tampered with. ``accept_unsigned`` reads a format-1 table (no signatures).
    """
    try:
        lines = Path(path).read_text("utf-8").splitlines()
    except OSError as exc:
        raise ReidError(f"cannot read the re-identification table {path}: {exc.strerror}") from None
    if not lines:
        return
    try:
        header = json.loads(lines[0])
    except ValueError:
        header = {}
    version = header.get("medfed_reid") if isinstance(header, dict) else None
    if version not in (FORMAT_VERSION, UNSIGNED_VERSION):
        raise ReidError(f"{path} is not a medfed re-identification table (version {FORMAT_VERSION})")
    officer = fingerprint(private_key.public_key())
    if header.get("officer_key") != officer:
        raise ReidError(f"{path} was sealed to another officer key; use the private key that matches it")
    if version == UNSIGNED_VERSION and not accept_unsigned:
        raise ReidError(
            f"{path}: {_MIGRATE}. Pass --accept-unsigned to read it anyway, check each answer against "
            "the site's records, and have the site start a new table (move this one aside)"
        )
    trusted: dict[str, bytes] = {}
    if version == FORMAT_VERSION:
        keys = list(site_keys or [])
        if not keys:
            try:
                keys = [base64.b64decode(str(header.get("site_key", "")), validate=True)]
            except ValueError:
                keys = []
        trusted = {key_id(raw): raw for raw in keys}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        if version == FORMAT_VERSION:
            _verify_row(path, number, line, officer, trusted)
        yield open_line(line, private_key)


def _verify_row(path: Path, number: int, line: str, officer: str, trusted: dict[str, bytes]) -> None:
    try:
        row = json.loads(line)
        kid, sig = row.get("kid"), row.get("sig")
    except (ValueError, AttributeError):
        raise ReidError(f"line {number} of {path} is not a table row: the table was altered; refused") from None
    if not kid or not sig:
        raise ReidError(
            f"line {number} of {path} is not signed by the site: anyone with the officer's public key could "
            "have written it; the table was tampered with - refused (ask the site to investigate)"
        )
    raw = trusted.get(str(kid))
    if raw is None:
        raise ReidError(
            f"line {number} of {path} is signed by key {kid}, which is not a site key you trust; if the site "
            "rotated its audit key, pass its public keys with --site-key (from `medfed audit export-key`)"
        )
    try:
        signature = base64.b64decode(str(sig), validate=True)
    except ValueError:
        signature = b""
    if not verify_signature(raw, signature, _signed_bytes(officer, row)):
        raise ReidError(
            f"line {number} of {path} has a signature that does not verify with the site key {kid}: the row "
            "was forged or altered - refused (ask the site to investigate)"
        )


def lookup(
    path: Path, private_key: X25519PrivateKey, query: str, *,
    site_keys: list[bytes] | None = None, accept_unsigned: bool = False,
) -> list[ReidRecord]:
    """Rows whose patient, accession or study UID pseudonym equals ``query`` (each row once)."""
    found: list[ReidRecord] = []
    for record in read_table(path, private_key, site_keys=site_keys, accept_unsigned=accept_unsigned):
        if record.matches(query) and record not in found:
            found.append(record)
    return found


def check_private_key_permissions(path: Path) -> None:
    """Refuse a private key file others can read (it unlocks every row)."""
    problem = private_file_problem(Path(path), "the officer's private key")
    if problem:
        raise ReidError(problem)


# ---- use in a de-identification run ---------------------------------------------------
def originals(ds: Dataset) -> tuple[str, str, str]:
    """(PatientID, AccessionNumber, StudyInstanceUID) of an *original* data set."""
    out = []
    for keyword in ("PatientID", "AccessionNumber", "StudyInstanceUID"):
        value = ds.get(keyword)
        out.append(str(value).strip().rstrip("\x00") if value is not None else "")
    return out[0], out[1], out[2]


class Sealer:
    """Seals re-identification rows in a worker: it holds the public key only."""

    def __init__(self, public_key_pem: bytes, pseudo: Pseudonymizer) -> None:
        key = serialization.load_pem_public_key(public_key_pem)
        if not isinstance(key, X25519PublicKey):
            raise ReidError("the privacy officer's key is not an X25519 public key")
        self.public_key = key
        self.pseudo = pseudo

    def seal(self, before: tuple[str, str, str], after: Dataset) -> tuple[str, str]:
        """(dedupe key, sealed line) linking ``after``'s pseudonyms to the ``before`` values."""
        patient_id, accession, study_uid = before
        record = ReidRecord(
            patient_pseudonym=str(after.get("PatientID", "") or ""),
            patient_id=patient_id,
            accession_pseudonym=str(after.get("AccessionNumber", "") or ""),
            accession_number=accession,
            study_uid_pseudonym=str(after.get("StudyInstanceUID", "") or ""),
            study_uid=study_uid,
        )
        dedupe = self.pseudo.digest(b"medfed/reid\x00" + "\x00".join(before).encode("utf-8"))
        return dedupe, seal(record, self.public_key, dedupe)


def open_for_run(policy: Policy, table: Path | None, dst: Path) -> tuple[ReidTable | None, bytes | None]:
    """The table writer and the officer's public key (PEM, for workers), or (None, None).

    ``table`` (``--reid-table``) overrides the policy's ``[reid] table``; the officer's
    public key always comes from the policy, which the privacy officer signs off.
    """
    settings = policy.reid
    if table is None and settings is None:
        return None, None
    if settings is None:
        raise ReidError(
            "--reid-table needs the privacy officer's public key: add a [reid] section with "
            "officer_public_key to the policy file (see anonymization/data/policy.example.toml)"
        )
    path = Path(table) if table is not None else settings.table
    resolved, store = path.resolve(), Path(dst).resolve()
    if resolved == store or store in resolved.parents:
        raise ReidError(
            f"the re-identification table {path} lies inside the destination {dst}; it links "
            "pseudonyms to patients and must be kept apart from the de-identified store"
        )
    public_key = load_public_key(settings.officer_public_key)
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return ReidTable(path, public_key), pem
