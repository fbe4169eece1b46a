"""SuperNode authentication keys: made at the site; only the public half ever travels.

Flower's SuperNode authentication signs every request with an EC key whose
public half the SuperLink has registered. The site makes the pair (`medfed
site keygen`) and sends the public key; the operator enrols it (`medfed
consortium add-site --public-key`). Both sides print the same SHA-256
fingerprint so they can compare it over a second channel. Everything that
reads a key someone sent checks it here, so a private key or a key of the
wrong kind is refused with the reason.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

#: EC curve of the SuperNode authentication keys (Flower's own choice in `generate_key_pairs`).
NODE_CURVE = ec.SECP384R1()
#: A public key file is one short line; anything much bigger is not one.
MAX_KEY_FILE = 64 * 1024
#: Text that only private keys carry (PEM "... PRIVATE KEY-----" in every variant, OpenSSH, PuTTY).
_PRIVATE_MARKERS = (b"PRIVATE KEY", b"PuTTY-User-Key-File", b"Private-Lines:")
KEYGEN_HINT = "make one at the site with `medfed site keygen KIT`"


class NodeKeyError(ValueError):
    """A key file is not what it must be; the message names the file, what it is and what to do."""


def node_keypair() -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair: (OpenSSH private key, OpenSSH public key line)."""
    key = ec.generate_private_key(NODE_CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    return private, public_line(key.public_key())


def public_line(key: ec.EllipticCurvePublicKey) -> bytes:
    """The OpenSSH public key line (no comment) that `flwr supernode register` and the coordinator read."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 fingerprint as `ssh-keygen -l -f node.pub` prints it (so either side can check it)."""
    blob = base64.b64decode(public_line(key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def is_private_key(data: bytes) -> bool:
    """Whether ``data`` holds a private key in any common encoding (PEM, OpenSSH, PuTTY, DER)."""
    if any(m in data for m in _PRIVATE_MARKERS):
        return True
    try:
        serialization.load_der_private_key(data, password=None)
    except TypeError:  # an encrypted DER private key
        return True
    except (ValueError, UnsupportedAlgorithm):
        return False
    return True


def _describe(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"an EC key on curve {key.curve.name}"
    kind = type(key).__name__.removesuffix("PublicKey").removesuffix("PrivateKey").lstrip("_")
    return {"RSA": "an RSA key", "Ed25519": "an Ed25519 key", "Ed448": "an Ed448 key",
            "DSA": "a DSA key"}.get(kind, f"a key of type {kind}")


def _check_public(key: object, source: str) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != NODE_CURVE.name:
        raise NodeKeyError(f"{source} holds {_describe(key)}; SuperNode authentication here uses EC P-384 "
                           f"({NODE_CURVE.name}) keys: {KEYGEN_HINT}")
    return key


def parse_public_key(data: bytes, source: str) -> ec.EllipticCurvePublicKey:
    """A site's public key from OpenSSH (one line) or PEM text; refuses private keys and other key types."""
    if is_private_key(data):
        raise NodeKeyError(
            f"{source} is a private key: a site's private key never leaves the site, so send only the public "
            "key (auth/node.pub from `medfed site keygen`). This key has now left its site: the site should "
            "make a new one with `medfed site keygen KIT --force` and send that node.pub")
    text = data.strip()
    try:
        if text.startswith(b"-----BEGIN"):
            key: object = serialization.load_pem_public_key(text)
        else:
            key = serialization.load_ssh_public_key(text)
    except (ValueError, UnsupportedAlgorithm):
        raise NodeKeyError(
            f"{source} is not a public key in OpenSSH form (one line, like auth/node.pub) or PEM form; "
            f"send auth/node.pub as `medfed site keygen` wrote it ({KEYGEN_HINT})") from None
    return _check_public(key, source)


def _read(path: Path, what: str) -> bytes:
    try:
        if path.stat().st_size > MAX_KEY_FILE:
            raise NodeKeyError(f"{path} is {path.stat().st_size} bytes, far too big for {what}; check the file")
        return path.read_bytes()
    except OSError as err:
        raise NodeKeyError(f"cannot read {what} {path}: {err.strerror}") from None


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Read and check a site's public key file (see parse_public_key)."""
    return parse_public_key(_read(path, "the public key"), str(path))


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The site's own SuperNode private key (OpenSSH, unencrypted, as flower-supernode reads it)."""
    data = _read(path, "the SuperNode private key")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:
        raise NodeKeyError(f"{path} is passphrase-protected; flower-supernode reads it unattended, so it must "
                           f"not be (its 0600 mode protects it): {KEYGEN_HINT} --force") from None
    except (ValueError, UnsupportedAlgorithm):
        raise NodeKeyError(f"{path} is not an OpenSSH private key: {KEYGEN_HINT} --force, then send the "
                           "new auth/node.pub to the consortium operator") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != NODE_CURVE.name:
        raise NodeKeyError(f"{path} holds {_describe(key)}; SuperNode authentication here uses EC P-384 "
                           f"({NODE_CURVE.name}) keys: {KEYGEN_HINT} --force")
    return key
