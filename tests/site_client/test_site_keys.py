"""Keys born at the site: `medfed site keygen`, enrolment by public key only, the encrypted CA key.

A site's private key is made in its own kit folder and never reaches the
operator; the operator's commands take only public keys, refuse anything else,
and the kits they write carry no private key. The consortium CA key can be
passphrase-encrypted; a missing or wrong passphrase is a clear error that
changes nothing.
"""

from __future__ import annotations

import hashlib
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from typer.testing import CliRunner

from coordinator.provision import (
    CA_PASSPHRASE_ENV,
    CertificateAuthority,
    ProvisionError,
    add_site,
    init_consortium,
    load_consortium,
    renew_tls,
    revoke_site,
)
from medfed.cli import app
from medfed.node_keys import fingerprint, load_public_key, parse_public_key
from site_client.kit import KitError, generate_site_key, load_kit
from site_client.supernode import FATAL_EXIT

runner = CliRunner()
#: What marks a private key in a file, whatever its encoding.
PRIVATE_MARKERS = (b"PRIVATE KEY", b"OPENSSH PRIVATE KEY", b"PuTTY-User-Key-File")


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _cli(*args: str | Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    res = runner.invoke(app, [str(a) for a in args], env=env)
    # a user's mistake ends in a message and exit code 2, never in a traceback
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, res.output


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _private_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and any(m in p.read_bytes() for m in PRIVATE_MARKERS)}


# ---- medfed site keygen ------------------------------------------------------------------------------


def test_keygen_makes_a_p384_pair_at_the_site_0600_in_0700_and_prints_what_to_do(tmp_path: Path) -> None:
    kit = tmp_path / "does" / "not" / "exist" / "kit"
    code, out = _cli("site", "keygen", kit)
    assert code == 0, out
    key, pub = kit / "auth" / "node.key", kit / "auth" / "node.pub"
    assert _mode(key) == 0o600 and _mode(key.parent) == 0o700
    private = serialization.load_ssh_private_key(key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    public = load_public_key(pub)
    assert public.public_numbers() == private.public_key().public_numbers()
    assert pub.read_bytes().startswith(b"ecdsa-sha2-nistp384 ") and pub.read_bytes().count(b"\n") == 1
    fp = fingerprint(public)
    assert fp in out and "add-site" in out and "--public-key node.pub" in out and "consortium operator" in out
    assert not [p for p in kit.rglob(".*.tmp")]  # written through temporary names, none left behind
    if shutil.which("ssh-keygen"):  # the same fingerprint OpenSSH prints, so either side can check it
        res = subprocess.run(["ssh-keygen", "-l", "-f", str(pub)], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0 and fp in res.stdout, res.stdout + res.stderr


def test_keygen_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    kit = tmp_path / "kit"
    assert _cli("site", "keygen", kit)[0] == 0
    before = (kit / "auth" / "node.key").read_bytes()
    code, out = _cli("site", "keygen", kit)
    assert code == 2 and "already exists" in out and "--force" in out
    assert (kit / "auth" / "node.key").read_bytes() == before
    code, out = _cli("site", "keygen", kit, "--force")
    assert code == 0 and "revoke" in out
    after = kit / "auth" / "node.key"
    assert after.read_bytes() != before and _mode(after) == 0o600
    priv = serialization.load_ssh_private_key(after.read_bytes(), None)
    assert load_public_key(kit / "auth" / "node.pub").public_numbers() == priv.public_key().public_numbers()


def test_keygen_in_a_received_kit_names_the_site(tmp_path: Path) -> None:
    cons = tmp_path / "cons"
    init_consortium(cons, "n", ["h"], [("hospital-a", generate_site_key(tmp_path / "a").public)])
    fresh = tmp_path / "fresh"
    shutil.copytree(cons / "kits" / "hospital-a", fresh)  # a kit without a key (e.g. a new machine)
    assert generate_site_key(fresh).site == "hospital-a"
    code, out = _cli("site", "keygen", fresh, "--force")
    assert code == 0 and "add-site DIR hospital-a --public-key" in out


# ---- enrolment at the operator: public keys only ---------------------------------------------------------


@pytest.fixture()
def enrolled(tmp_path: Path) -> Path:
    """A consortium with sites a (init --site) and b (add-site), each key made at its site, kits copied back."""
    cons = tmp_path / "cons"
    pubs = {s: generate_site_key(tmp_path / "sites" / s).public for s in ("a", "b")}
    code, out = _cli("consortium", "init", cons, "--name", "n", "--coordinator-host", "localhost",
                     "--site", f"a={pubs['a']}")
    assert code == 0 and fingerprint(load_public_key(pubs["a"])) in out, out  # to read back to the site
    code, out = _cli("consortium", "add-site", cons, "b", "--public-key", pubs["b"])
    assert code == 0 and fingerprint(load_public_key(pubs["b"])) in out, out
    for s in ("a", "b"):  # each site copies the kit it receives into its own folder
        shutil.copytree(cons / "kits" / s, tmp_path / "sites" / s, dirs_exist_ok=True)
    return cons


def test_no_private_key_at_the_operator_but_the_ca_and_the_coordinators_own(enrolled: Path) -> None:
    # the CA's, the coordinator's TLS key and the consortium's release key (it signs models, never a site's)
    assert _private_files(enrolled) == {"ca/ca.key", "coordinator/tls/server.key", "coordinator/release-signing.key"}
    sites = enrolled.parent / "sites"
    for s in ("a", "b"):
        secret = (sites / s / "auth" / "node.key").read_bytes()
        assert all(secret not in p.read_bytes() for p in enrolled.rglob("*") if p.is_file())
        kit = enrolled / "kits" / s
        assert sorted(p.relative_to(kit).as_posix() for p in kit.rglob("*") if p.is_file()) == [
            "README.md", "auth/node.pub", "auth/tls.pem", "ca.pem", "kit.toml", "medfed-site.service",
            "release-signing.pub"]
        # the site's copy of the kit kept its own private key, and `site start` accepts it
        assert _mode(sites / s / "auth" / "node.key") == 0o600 and _mode(sites / s / "auth") == 0o700
        assert load_kit(sites / s).auth_key == sites / s / "auth" / "node.key"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_add_site_refuses_private_keys_in_every_form(enrolled: Path, tmp_path: Path) -> None:
    before = _snapshot(enrolled)
    site_key = tmp_path / "sites" / "a" / "auth" / "node.key"
    p384 = ec.generate_private_key(ec.SECP384R1())
    forms = {
        "openssh": site_key,  # the very file keygen made
        "pkcs8": _write(tmp_path / "k.pem", p384.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
        "sec1": _write(tmp_path / "k.ec.pem", p384.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())),
        "der": _write(tmp_path / "k.der", p384.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
        "encrypted": _write(tmp_path / "k.enc", p384.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"))),
    }
    for form, path in forms.items():
        code, out = _cli("consortium", "add-site", enrolled, "c", "--public-key", path)
        assert code == 2 and "is a private key" in out and "send only the public key" in out, (form, out)
        assert "keygen" in out and "--force" in out  # and what the site must do now that it has left
    assert _snapshot(enrolled) == before  # nothing was written


def test_add_site_refuses_wrong_key_types_and_garbage(enrolled: Path, tmp_path: Path) -> None:
    before = _snapshot(enrolled)
    ssh = serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    wrong = {
        "an RSA key": rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(*ssh),
        "an Ed25519 key": ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(*ssh),
        "secp256r1": ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(*ssh),
    }
    for what, data in wrong.items():
        code, out = _cli("consortium", "add-site", enrolled, "c", "--public-key", _write(tmp_path / "w.pub", data))
        assert code == 2 and what in out and "P-384" in out, out
    for junk in (b"hello\n", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"):
        code, out = _cli("consortium", "add-site", enrolled, "c", "--public-key", _write(tmp_path / "j.pub", junk))
        assert code == 2 and "not a public key" in out, out
    code, out = _cli("consortium", "add-site", enrolled, "c", "--public-key", tmp_path / "missing.pub")
    assert code == 2 and "cannot read" in out
    assert _snapshot(enrolled) == before


def test_pem_public_key_of_the_right_curve_is_accepted(enrolled: Path, tmp_path: Path) -> None:
    site = generate_site_key(tmp_path / "sites" / "c")
    pem = load_public_key(site.public).public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    entry = add_site(enrolled, "c", _write(tmp_path / "c.pem", pem), site.csr)
    # registered in OpenSSH form, the same key
    assert parse_public_key((enrolled / entry.public_key).read_bytes(), "c").public_numbers() == \
        load_public_key(site.public).public_numbers()


def test_a_key_belongs_to_one_site_and_a_revoked_key_is_never_enrolled_again(enrolled: Path, tmp_path: Path) -> None:
    a_pub = tmp_path / "sites" / "a" / "auth" / "node.pub"
    code, out = _cli("consortium", "add-site", enrolled, "c", "--public-key", a_pub)
    assert code == 2 and "already enrolled for site a (active)" in out
    # the same key given twice in one init
    with pytest.raises(ProvisionError, match="already enrolled for site x"):
        init_consortium(tmp_path / "other", "n", ["h"], [("x", a_pub), ("y", a_pub)])
    assert not (tmp_path / "other").exists()
    # re-keying a site: revoke, keygen --force at the site, enrol the new key (under a new name)
    revoke_site(enrolled, "a")
    old = a_pub.read_bytes()
    shutil.copy(a_pub, tmp_path / "a-old.pub")
    with pytest.raises(ProvisionError, match="already enrolled for site a \\(revoked\\)"):
        add_site(enrolled, "a2", tmp_path / "a-old.pub")
    new = generate_site_key(tmp_path / "sites" / "a", force=True)
    assert new.public.read_bytes() != old
    entry = add_site(enrolled, "a2", new.public)
    assert entry.status == "active"
    shutil.copytree(enrolled / "kits" / "a2", tmp_path / "sites" / "a", dirs_exist_ok=True)
    kit = load_kit(tmp_path / "sites" / "a")
    assert kit.config.name == "a2"
    assert {s.name: s.status for s in load_consortium(enrolled).sites} == {"a": "revoked", "b": "active",
                                                                            "a2": "active"}


# ---- the site side: `medfed site start` checks the pair --------------------------------------------------


def test_site_start_without_a_key_says_run_keygen_first(enrolled: Path, tmp_path: Path) -> None:
    kit = tmp_path / "nokey"
    shutil.copytree(enrolled / "kits" / "b", kit)  # the operator's kit alone
    code, out = _cli("site", "start", kit, "--data", tmp_path)
    # a kit that cannot run exits with the code systemd does not restart (RestartPreventExitStatus=)
    assert code == FATAL_EXIT and f"medfed site keygen {kit}" in out and "node.pub" in out and "operator" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = _cli("site", "start", empty, "--data", tmp_path)
    assert code == FATAL_EXIT and "medfed site keygen" in out


def test_kit_whose_public_key_is_not_the_sites_is_refused(enrolled: Path, tmp_path: Path) -> None:
    a = tmp_path / "sites" / "a"
    shutil.copy(enrolled / "kits" / "b" / "auth" / "node.pub", a / "auth" / "node.pub")  # b's kit copied onto a
    with pytest.raises(KitError, match="does not match this site's private key"):
        load_kit(a)
    code, out = _cli("site", "start", a, "--data", tmp_path)
    assert code == FATAL_EXIT and "does not match" in out and "ssh-keygen -y" in out
    # a key file that is not a SuperNode key
    (a / "auth" / "node.key").write_bytes(b"not a key\n")
    with pytest.raises(KitError, match="not an OpenSSH private key"):
        load_kit(a)


# ---- the consortium CA key, passphrase-encrypted --------------------------------------------------------


def test_ca_key_encrypted_with_a_passphrase_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CA_PASSPHRASE_ENV, raising=False)
    pp = _write(tmp_path / "pp", b"correct horse battery staple\n")
    cons = tmp_path / "cons"
    code, out = _cli("consortium", "init", cons, "--name", "n", "--coordinator-host", "h",
                     "--ca-passphrase-file", pp)
    assert code == 0 and "passphrase-encrypted" in out, out
    data = (cons / "ca" / "ca.key").read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in data and _mode(cons / "ca" / "ca.key") == 0o600
    with pytest.raises(TypeError):  # cannot be loaded without it
        serialization.load_pem_private_key(data, password=None)
    key = serialization.load_pem_private_key(data, password=b"correct horse battery staple")  # the newline dropped
    ca = CertificateAuthority.load(cons / "ca", b"correct horse battery staple")
    assert ca.key.private_numbers() == key.private_numbers()  # type: ignore[union-attr]
    # a command that needs the CA key: missing or wrong passphrase -> clear error, nothing changed
    before = _snapshot(cons)
    code, out = _cli("consortium", "renew-tls", cons, env={CA_PASSPHRASE_ENV: ""})
    assert code == 2 and "empty" in out
    code, out = _cli("consortium", "renew-tls", cons)
    assert code == 2 and "is encrypted" in out and "--ca-passphrase-file" in out and CA_PASSPHRASE_ENV in out
    code, out = _cli("consortium", "renew-tls", cons, "--ca-passphrase-file", _write(tmp_path / "bad", b"wrong one"))
    assert code == 2 and "wrong CA passphrase" in out and "nothing was changed" in out
    code, out = _cli("consortium", "renew-tls", cons, env={CA_PASSPHRASE_ENV: "wrong again"})
    assert code == 2 and "wrong CA passphrase" in out
    assert _snapshot(cons) == before
    # the right one, from the environment this time
    code, out = _cli("consortium", "renew-tls", cons, env={CA_PASSPHRASE_ENV: "correct horse battery staple"})
    assert code == 0 and "restart the coordinator" in out, out
    after = _snapshot(cons)
    # the CRL is re-signed too (same revoked serials: none)
    assert {k for k in after if after[k] != before[k]} == {"coordinator/tls/server.pem", "coordinator/tls/server.key",
                                                           "coordinator/tls/crl.pem"}
    new = x509.load_pem_x509_certificate((cons / "coordinator" / "tls" / "server.pem").read_bytes())
    new.verify_directly_issued_by(ca.cert)


def test_ca_passphrase_rules(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="at least 8"):
        init_consortium(tmp_path / "c", "n", ["h"], ca_passphrase=b"short")
    assert not (tmp_path / "c").exists()
    init_consortium(tmp_path / "plain", "n", ["h"])
    assert b"BEGIN PRIVATE KEY" in (tmp_path / "plain" / "ca" / "ca.key").read_bytes()
    renew_tls(tmp_path / "plain")  # an unencrypted CA key needs no passphrase ...
    with pytest.raises(ProvisionError, match="not encrypted"):  # ... and refuses one
        renew_tls(tmp_path / "plain", b"a passphrase")
    code, out = _cli("consortium", "init", tmp_path / "d", "--name", "n", "--coordinator-host", "h",
                     "--ca-passphrase-file", tmp_path / "nope")
    assert code == 2 and "cannot read the CA passphrase file" in out
    # add-site signs the site's TLS certificate: with ca/ moved offline it says so and changes nothing
    shutil.move(tmp_path / "plain" / "ca", tmp_path / "offline-ca")
    with pytest.raises(ProvisionError, match="the consortium CA is missing"):
        add_site(tmp_path / "plain", "s", generate_site_key(tmp_path / "s").public)
    assert not (tmp_path / "plain" / "kits" / "s").exists()
    with pytest.raises(ProvisionError, match="the consortium CA is missing"):
        renew_tls(tmp_path / "plain")


# ---- TLS client certificates: requested at the site, signed by the CA, revoked on the CRL ----------------


def test_site_certificate_is_issued_from_the_sites_own_request(enrolled: Path, tmp_path: Path) -> None:
    site = tmp_path / "sites" / "a"
    key = serialization.load_pem_private_key((site / "auth" / "tls.key").read_bytes(), None)
    assert _mode(site / "auth" / "tls.key") == 0o600  # made at the site, never sent
    cert = x509.load_pem_x509_certificate((enrolled / "kits" / "a" / "auth" / "tls.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((enrolled / "coordinator" / "tls" / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "a"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.ExtendedKeyUsageOID.CLIENT_AUTH]  # a client certificate, never a server's
    assert load_kit(site).tls_cert == site / "auth" / "tls.pem"


@pytest.mark.adversarial
def test_a_missing_or_altered_request_is_refused_before_anything_is_written(enrolled: Path, tmp_path: Path) -> None:
    c = generate_site_key(tmp_path / "sites" / "c")
    before = _snapshot(enrolled)
    c.csr.unlink()
    code, out = _cli("consortium", "add-site", enrolled, "c", "--public-key", c.public)
    assert code == 2 and "tls.csr" in out and "--csr" in out
    # a request whose subject was changed after signing
    other = generate_site_key(tmp_path / "sites" / "d")
    pem = other.csr.read_bytes()
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    i = der.find(b"medfed site")
    der[i] ^= 1
    import base64

    bad = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der))
        + b"-----END CERTIFICATE REQUEST-----\n"
    )
    code, out = _cli("consortium", "add-site", enrolled, "d", "--public-key", other.public,
                     "--csr", _write(tmp_path / "bad.csr", bad))
    assert code == 2 and "not valid" in out, out
    # the site's private TLS key in place of the request
    code, out = _cli("consortium", "add-site", enrolled, "d", "--public-key", other.public,
                     "--csr", tmp_path / "sites" / "d" / "auth" / "tls.key")
    assert code == 2 and "PRIVATE" in out
    assert _snapshot(enrolled) == before


@pytest.mark.adversarial
def test_revoking_puts_the_certificate_on_the_crl_and_needs_the_ca_key(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CA_PASSPHRASE_ENV, raising=False)
    pp = _write(tmp_path / "pp", b"correct horse battery staple\n")
    cons = tmp_path / "cons"
    init_consortium(cons, "n", ["h"], [("a", generate_site_key(tmp_path / "a").public)],
                    ca_passphrase=b"correct horse battery staple")
    crl_path = cons / "coordinator" / "tls" / "crl.pem"
    assert len(list(x509.load_pem_x509_crl(crl_path.read_bytes()))) == 0
    before = _snapshot(cons)
    code, out = _cli("consortium", "revoke-site", cons, "a")  # encrypted CA key, no passphrase: says so
    assert code == 2 and "revocation list" in out and "is encrypted" in out and "--ca-passphrase-file" in out
    assert _snapshot(cons) == before and load_consortium(cons).site("a").status == "active"  # type: ignore[union-attr]
    code, out = _cli("consortium", "revoke-site", cons, "a", "--ca-passphrase-file", pp)
    assert code == 0 and "CRL" in out, out
    serial = x509.load_pem_x509_certificate((cons / "kits" / "a" / "auth" / "tls.pem").read_bytes()).serial_number
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    ca = x509.load_pem_x509_certificate((cons / "coordinator" / "tls" / "ca.pem").read_bytes())
    assert crl.is_signature_valid(ca.public_key()) and crl.get_revoked_certificate_by_serial_number(serial)
