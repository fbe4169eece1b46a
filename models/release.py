"""A signed model release: weights, study and model card, verified by every site before it is loaded.

The coordinator writes ``release/`` beside ``model.pt`` at the end of a run (or `medfed model release`
for a chosen checkpoint) and signs it with the consortium's release key (Ed25519). Every site kit
carries the public half, so a site loads only a release whose every byte the consortium signed: the
signature covers ``manifest.json``, which pins each file by SHA-256. Files are read once, hashed and
parsed from the same bytes, so nothing can change between the check and the use.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medfed.files import write_file
from medfed.signing import KeyFileError, Signer, key_id, load_public_key, verify_signature

#: The files of a release, each pinned by SHA-256 in the signed manifest.
WEIGHTS = "model.pt"
STUDY = "study.json"
CARD = "card.json"
MANIFEST = "manifest.json"
SIGNATURE = "signature"
SIGNED_FILES: tuple[str, ...] = (WEIGHTS, STUDY, CARD)
#: Every file of a release folder: what travels when the coordinator sends a release in a run's last message.
RELEASE_FILES: tuple[str, ...] = (*SIGNED_FILES, MANIFEST, SIGNATURE)
FORMAT = 1
#: The consortium's release key (consortium folder) and its public half (in every site kit).
RELEASE_KEY = "release-signing.key"
RELEASE_PUBLIC_KEY = "release-signing.pub"
RELEASE_KEY_WHAT = "consortium release key"
#: Largest release file read (weights of the largest registry network are ~100 MB).
MAX_FILE_BYTES = 1 << 30


class ReleaseError(Exception):
    """A release cannot be written or must not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class Release:
    """A verified release, loaded from the very bytes that were checked."""

    path: Path
    study: Any  # models.study.Study
    state_dict: dict[str, Any]
    card: dict[str, Any]
    weights_sha256: str
    key_id: str

    @property
    def device_uid(self) -> str:
        """A DICOM UID derived from the weights' hash (2.25 + 128 bits): one UID per exact model."""
        return device_uid(self.weights_sha256)


def device_uid(weights_sha256: str) -> str:
    """``2.25.<decimal of the first 128 bits of the weights' SHA-256>`` (PS3.5 B.2)."""
    return f"2.25.{int(weights_sha256[:32], 16)}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()


def state_bytes(state_dict: dict[str, Any]) -> bytes:
    """A state dict as the bytes ``torch.save`` writes (CPU, contiguous): what a release and `train` store."""
    import torch

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, buf)
    return buf.getvalue()


def write_release(out: Path, state_dict: dict[str, Any], study: Any, card: dict[str, Any],
                  signer: Signer) -> Path:
    """Write and sign ``out`` (a fresh folder): weights, study, card, manifest, signature."""
    if out.exists() and any(out.iterdir()):
        raise ReleaseError(f"{out} already holds files; a release is written once, into a fresh folder")
    files = {WEIGHTS: state_bytes(state_dict), STUDY: study.canonical_json().encode()}
    files[CARD] = _canonical({**card, "weights_sha256": _sha256(files[WEIGHTS]),
                              "device_uid": device_uid(_sha256(files[WEIGHTS])),
                              "study_sha256": study.digest()})
    manifest = _canonical({"format": FORMAT, "key_id": signer.key_id,
                           "files": {name: _sha256(data) for name, data in files.items()}})
    for name, data in files.items():
        write_file(out / name, data)
    write_file(out / MANIFEST, manifest)
    write_file(out / SIGNATURE, base64.b64encode(signer.sign(manifest)) + b"\n")
    return out


def _read(path: Path) -> bytes:
    try:
        if path.is_symlink() or not path.is_file():
            raise ReleaseError(f"{path} is missing or not a regular file: this is not a complete release; "
                               "ask the consortium for the release again")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ReleaseError(f"{path} is larger than any release file ({MAX_FILE_BYTES} bytes); refused")
        return path.read_bytes()
    except OSError as err:
        raise ReleaseError(f"cannot read {path}: {err.strerror}") from None


def public_key_of(source: Path) -> bytes:
    """The release public key from a PEM file, or from a site kit folder that carries it."""
    path = source / RELEASE_PUBLIC_KEY if source.is_dir() else source
    try:
        return load_public_key(path, what="release public key",
                               hint=f"the consortium's release public key is {RELEASE_PUBLIC_KEY} in each site kit")
    except KeyFileError as err:
        raise ReleaseError(str(err)) from None


def verify_release(path: Path, public_key: bytes) -> Release:
    """Check the signature and every file's hash, then load the release from the checked bytes.

    Raises :class:`ReleaseError` for a release with any byte changed, a missing file, or a
    signature by any key but ``public_key``; nothing of such a release is loaded.
    """
    path = Path(path)
    if not path.is_dir():
        raise ReleaseError(f"{path} is not a release folder (it should hold {', '.join(SIGNED_FILES)}, "
                           f"{MANIFEST} and {SIGNATURE})")
    manifest_bytes = _read(path / MANIFEST)
    try:
        signature = base64.b64decode(_read(path / SIGNATURE).strip(), validate=True)
    except ValueError:
        raise ReleaseError(f"{path / SIGNATURE} is not a base64 signature: the release was altered; refused") \
            from None
    if not verify_signature(public_key, signature, manifest_bytes):
        raise ReleaseError(
            f"{path}: the signature does not verify with the consortium's release key (key {key_id(public_key)}): "
            "the release was altered or signed by another key; refused — ask the consortium for the release again"
        )
    manifest = json.loads(manifest_bytes)
    if manifest.get("format") != FORMAT or set(manifest.get("files", {})) != set(SIGNED_FILES):
        raise ReleaseError(f"{path}: release format {manifest.get('format')!r} is not one this medfed reads; "
                           "upgrade medfed or ask for a release of this version")
    data: dict[str, bytes] = {}
    for name in SIGNED_FILES:
        data[name] = _read(path / name)
        if _sha256(data[name]) != manifest["files"][name]:
            raise ReleaseError(f"{path / name} does not match the hash the consortium signed: the file was altered "
                               "after signing; refused — ask the consortium for the release again")
    return _load(path, data, key_id(public_key))


def release_bytes(path: Path) -> dict[str, bytes]:
    """Every file of the release folder ``path``, by name (what the coordinator sends to the sites)."""
    return {name: _read(Path(path) / name) for name in RELEASE_FILES}


def keep_release(files: Mapping[str, object], public_key: bytes, root: Path) -> Release:
    """Verify a release that arrived as bytes exactly as one on disk; keep it under ``root`` only if it verifies.

    The files are written to a fresh folder beside their final place and checked there by
    :func:`verify_release` (the same check as every command that loads a release), so a hostile
    sender's files never sit where a release is looked for. The release's folder is named after its
    card and the weights' hash; the same release sent again is kept once.
    """
    if set(files) != set(RELEASE_FILES) or not all(isinstance(v, bytes) for v in files.values()):
        raise ReleaseError(f"the release sent holds {sorted(files)}, not the files of a release "
                           f"({', '.join(RELEASE_FILES)}); refused")
    too_big = [name for name, data in files.items() if len(data) > MAX_FILE_BYTES]  # type: ignore[arg-type]
    if too_big:
        raise ReleaseError(f"{too_big[0]} of the release sent is larger than any release file; refused")
    root = Path(root)
    incoming = root / f".incoming-{secrets.token_hex(8)}"
    try:
        for name in RELEASE_FILES:
            write_file(incoming / name, files[name])  # type: ignore[arg-type]
        release = verify_release(incoming, public_key)
        label = re.sub(r"[^A-Za-z0-9._-]+", "-", str(release.card.get("name", "release")))[:80].strip(".-")
        final = root / f"{label or 'release'}-{release.weights_sha256[:12]}"
        if final.exists():  # kept before: the copy already there is what a later command loads, so check it
            if (final / MANIFEST).read_bytes() != files[MANIFEST]:
                raise ReleaseError(f"{final} already holds another release; move it away and ask again")
            return verify_release(final, public_key)
        os.replace(incoming, final)  # the very files just verified, moved whole
        return dataclasses.replace(release, path=final)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)


def _load(path: Path, data: dict[str, bytes], signer_id: str) -> Release:
    import torch

    from models.study import study_from_json

    study = study_from_json(data[STUDY].decode(), f"{path / STUDY}")
    state = torch.load(io.BytesIO(data[WEIGHTS]), weights_only=True, map_location="cpu")
    if not isinstance(state, dict):
        raise ReleaseError(f"{path / WEIGHTS} is not a state dict; refused")
    card = json.loads(data[CARD])
    return Release(path=path, study=study, state_dict=state, card=card, weights_sha256=_sha256(data[WEIGHTS]),
                   key_id=signer_id)


def model_card(*, study: Any, run_name: str, rounds: int, fab_sha256: str | None, metrics: dict[str, Any] | None,
               sites: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The card a release carries: what the model is, how it was trained, and what it scored."""
    import medfed

    return {
        # The study, then the run; a run already named after its study (medfed simulate, demo) is not repeated.
        "name": run_name if run_name.startswith(f"{study.name}-") else f"{study.name}-{run_name}",
        "network": study.network.name,
        "task": study.task,
        "classes": list(study.classes),
        "modality": study.modality,
        "image_size": study.image_size,
        "preprocessing": study.preprocessing.model_dump(mode="json"),
        "run": run_name,
        "rounds": rounds,
        "fab_sha256": fab_sha256,
        "medfed_version": medfed.__version__,
        "sites": sites,
        "metrics": metrics or {},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
