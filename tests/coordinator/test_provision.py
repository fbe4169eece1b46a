"""Provisioning: CA, coordinator TLS identity, site kits — keys in the right places and nowhere else.

Each site makes its own key pair in its kit folder (as `medfed site keygen` at the
site); the operator enrols only the public keys. (Key handling in depth:
tests/site_client/test_site_keys.py.)"""

from __future__ import annotations

import ipaddress
import os
import shutil
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from coordinator.provision import (
    CONSORTIUM_FILE,
    ConsortiumConfig,
    ProvisionError,
    add_site,
    init_consortium,
    load_consortium,
    revoke_site,
)
from medfed.cli import app
from site_client.kit import KitConfig, KitError, generate_site_key, load_kit, supernode_command, write_site_config

SITES = ["hospital-a", "hospital-b", "hospital-c"]


def site_dir(cons: Path, site: str) -> Path:
    """The site's own kit folder (at the site, not in the consortium folder)."""
    return cons.parent / "sites" / site


def keygen(cons: Path, site: str) -> Path:
    """`medfed site keygen` at ``site``; the public key file it sends to the operator."""
    return generate_site_key(site_dir(cons, site)).public


def receive_kit(cons: Path, site: str) -> Path:
    """The site copies the operator's kit into its own folder (as `cp -r kits/SITE/. KIT/`)."""
    shutil.copytree(cons / "kits" / site, site_dir(cons, site), dirs_exist_ok=True)
    return site_dir(cons, site)


@pytest.fixture()
def cons(tmp_path: Path) -> Path:
    d = tmp_path / "cons"
    init_consortium(d, "Test Consortium", ["coord.example.org", "10.0.0.7"], [(s, keygen(d, s)) for s in SITES],
                    port=9443)
    for s in SITES:
        receive_kit(d, s)
    return d


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_server_certificate_names_the_hosts_and_chains_to_the_ca(cons: Path) -> None:
    ca = x509.load_pem_x509_certificate((cons / "coordinator" / "tls" / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((cons / "coordinator" / "tls" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"coord.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.0.0.7"),
                                                             ipaddress.ip_address("127.0.0.1")}
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key((cons / "coordinator" / "tls" / "server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]


def test_operator_holds_no_site_private_key_and_sites_keys_are_0600(cons: Path) -> None:
    private = {p for p in cons.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()}
    assert {p.relative_to(cons).as_posix() for p in private} == {"ca/ca.key", "coordinator/tls/server.key",
                                                                  "coordinator/release-signing.key"}
    assert all(_mode(p) == 0o600 for p in private)
    for s in SITES:
        key = site_dir(cons, s) / "auth" / "node.key"
        assert _mode(key) == 0o600 and _mode(key.parent) == 0o700
        secret = key.read_bytes()
        for f in cons.rglob("*"):
            assert not f.is_file() or secret not in f.read_bytes(), f"{s}'s private key in {f}"
        # every kit the operator writes: the kit files and the site's public key, nothing else
        assert {p.relative_to(cons / "kits" / s).as_posix() for p in (cons / "kits" / s).rglob("*") if p.is_file()} \
            == {"kit.toml", "ca.pem", "auth/node.pub", "auth/tls.pem", "medfed-site.service", "README.md",
                "release-signing.pub"}


def test_node_key_pair_is_what_flower_supernode_auth_reads(cons: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    kit = site_dir(cons, "hospital-b")
    private = serialization.load_ssh_private_key((kit / "auth" / "node.key").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    # the coordinator's copy of the public key is what `flwr supernode register` loads
    registered = try_load_public_key(cons / "coordinator" / "nodes" / "hospital-b.pub")
    assert registered == public_key_to_bytes(private.public_key())
    assert (kit / "auth" / "node.pub").read_bytes() == (cons / "coordinator" / "nodes" / "hospital-b.pub").read_bytes()


def test_consortium_and_kit_files_validate(cons: Path) -> None:
    cfg = load_consortium(cons)
    assert [s.name for s in cfg.sites] == SITES and all(s.status == "active" for s in cfg.sites)
    assert cfg.coordinator_hosts[:2] == ["coord.example.org", "10.0.0.7"] and cfg.port == 9443
    for s in SITES:
        kit = KitConfig.model_validate(tomllib.loads((cons / "kits" / s / "kit.toml").read_text()))
        assert kit.name == s and kit.superlink == "coord.example.org:9443"
        assert (cons / "kits" / s / "medfed-site.service").read_text().count("ExecStart=") == 1


def test_names_with_quotes_and_backslashes_survive_the_files(tmp_path: Path) -> None:
    """A consortium named as people name things still writes TOML its readers parse back to the same name."""
    name = 'St. Mary\'s "North" \\ Partners'
    d = tmp_path / "cons"
    init_consortium(d, name, ["coord.example.org"], [("hospital-a", keygen(d, "hospital-a"))])
    assert load_consortium(d).name == name
    kit = KitConfig.model_validate(tomllib.loads((d / "kits" / "hospital-a" / "kit.toml").read_text()))
    assert kit.consortium == name


def test_add_and_revoke_site(cons: Path) -> None:
    entry = add_site(cons, "hospital-d", keygen(cons, "hospital-d"))
    assert entry.status == "active" and (cons / "kits" / "hospital-d" / "auth" / "node.pub").is_file()
    assert not (cons / "kits" / "hospital-d" / "auth" / "node.key").exists()
    revoked = revoke_site(cons, "hospital-a")
    assert revoked.status == "revoked" and revoked.revoked
    cfg = load_consortium(cons)
    assert {s.name: s.status for s in cfg.sites} == {"hospital-a": "revoked", "hospital-b": "active",
                                                      "hospital-c": "active", "hospital-d": "active"}
    with pytest.raises(ProvisionError, match="already in the consortium"):
        add_site(cons, "hospital-a", keygen(cons, "hospital-e"))
    with pytest.raises(ProvisionError, match="not in the consortium"):
        revoke_site(cons, "hospital-z")


def test_bad_input_is_refused_with_the_fix(tmp_path: Path, cons: Path) -> None:
    pub = site_dir(cons, "hospital-a") / "auth" / "node.pub"
    other = keygen(cons, "hospital-z")
    with pytest.raises(ProvisionError, match="not allowed"):
        init_consortium(tmp_path / "x", "n", ["h"], [("bad name", pub)])
    with pytest.raises(ProvisionError, match="twice"):
        init_consortium(tmp_path / "y", "n", ["h"], [("a", pub), ("a", other)])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused before anything is written
    with pytest.raises(ProvisionError, match="already holds a consortium"):
        init_consortium(cons, "n", ["h"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ProvisionError, match="not empty"):
        init_consortium(tmp_path / "full", "n", ["h"])
    # a broken consortium.toml: the error names the file, the field and what to do
    path = cons / CONSORTIUM_FILE
    path.write_text(path.read_text().replace("port = 9443", 'port = "ninety"'))
    with pytest.raises(ProvisionError) as err:
        load_consortium(cons)
    assert str(path) in str(err.value) and "port" in str(err.value) and "Fix" in str(err.value)
    with pytest.raises(ProvisionError, match="not a consortium folder"):
        load_consortium(tmp_path)


def test_site_start_checks_the_kit_and_builds_the_supernode_command(cons: Path, tmp_path: Path) -> None:
    kit_dir = site_dir(cons, "hospital-c")
    kit = load_kit(kit_dir)
    with pytest.raises(KitError, match="manifest.csv"):
        write_site_config(kit, tmp_path)  # a raw folder, not a de-identified store
    deid = tmp_path / "deid"
    deid.mkdir()
    (deid / "manifest.csv").write_text("patient,label\np1,\np2,\n")
    with pytest.raises(KitError, match="2 image\\(s\\) and none has a label"):
        write_site_config(kit, deid)  # a store whose labels matched nothing: the site does not join
    (deid / "manifest.csv").write_text("patient,label\np1,1\np2,\n")
    site, path = write_site_config(kit, deid)
    assert site.data_dir == deid and site.state_dir == kit_dir / "state" and path == kit_dir / "site.toml"
    # the template's privacy keys reach site.toml (the lifetime cap, an optional per-run cap, evaluation noise)
    kit.config.site_template.epsilon_cap_per_run, kit.config.site_template.evaluation_noise = 2.0, 15.0
    site, _ = write_site_config(kit, deid)
    assert (site.epsilon_cap_per_run, site.evaluation_noise) == (2.0, 15.0)
    cmd = supernode_command(kit, path)
    assert cmd[cmd.index("--superlink") + 1] == "coord.example.org:9443"
    assert cmd[cmd.index("--root-certificates") + 1] == str(kit_dir / "ca.pem")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(kit_dir / "auth" / "node.key")
    assert "--insecure" not in cmd and "--ssl-certfile" in cmd  # even the loopback ClientApp API is TLS
    assert _mode(kit_dir / "runtime-tls" / "runtime.key") == 0o600
    os.chmod(kit_dir / "auth" / "node.key", 0o644)
    with pytest.raises(KitError, match="chmod 600"):
        load_kit(kit_dir)
    os.chmod(kit_dir / "auth" / "node.key", 0o600)
    (kit_dir / "kit.toml").write_text((kit_dir / "kit.toml").read_text().replace("reconnect-seconds", "reconect"))
    with pytest.raises(KitError) as err:
        load_kit(kit_dir)
    assert "kit.toml" in str(err.value) and "reconect" in str(err.value)


def test_cli_init_add_revoke(tmp_path: Path) -> None:
    runner = CliRunner()
    d = tmp_path / "c"
    keys = {}
    for s in "abc":
        res = runner.invoke(app, ["site", "keygen", str(tmp_path / "sites" / s)])
        assert res.exit_code == 0, res.output
        keys[s] = tmp_path / "sites" / s / "auth" / "node.pub"
    res = runner.invoke(app, ["consortium", "init", str(d), "--name", "n", "--coordinator-host", "localhost",
                              "--site", f"a={keys['a']}", "--site", f"b={keys['b']}"])
    assert res.exit_code == 0, res.output
    assert ConsortiumConfig.model_validate(tomllib.loads((d / CONSORTIUM_FILE).read_text())).sites[1].name == "b"
    res = runner.invoke(app, ["consortium", "add-site", str(d), "c", "--public-key", str(keys["c"])])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["consortium", "revoke-site", str(d), "a"])
    assert res.exit_code == 0 and "revoked" in res.output
    res = runner.invoke(app, ["consortium", "init", str(d), "--name", "n", "--coordinator-host", "x"])
    assert res.exit_code == 2 and "already holds a consortium" in res.output
    res = runner.invoke(app, ["consortium", "init", str(tmp_path / "e"), "--name", "n", "--coordinator-host", "x",
                              "--site", "a"])
    assert res.exit_code == 2 and "NAME=PUBLIC_KEY_FILE" in res.output


def test_kit_site_template_is_site_config_with_kit_relative_folders(tmp_path: Path) -> None:
    """The kit's [site] table is generated from SiteConfig: same keys, bounds and words, so they never drift."""
    from medfed.settings import SiteConfig
    from site_client.kit import SiteTemplate

    assert list(SiteTemplate.model_fields) == list(SiteConfig.model_fields)
    for name, field in SiteConfig.model_fields.items():
        tpl = SiteTemplate.model_fields[name]
        assert (tpl.alias, tpl.description) == (field.alias, field.description), name
        if name not in ("data_dir", "state_dir", "audit_dir", "audit_key", "release_key"):
            assert (tpl.annotation, tpl.metadata, tpl.default) == (field.annotation, field.metadata, field.default)
    with pytest.raises(ValueError, match="epsilon-cap"):
        SiteTemplate.model_validate({"name": "a", "epsilon-cap": 0})
    init_consortium(tmp_path / "c", "n", ["h"], [("a", generate_site_key(tmp_path / "site-a").public)])
    kit_toml = (tmp_path / "c" / "kits" / "a" / "kit.toml").read_text()
    site_table = tomllib.loads(kit_toml)["site"]
    assert site_table == {"name": "a", "state-dir": "state", "epsilon-cap": 8.0, "delta": 1e-5}
    for key in ("epsilon-cap", "epsilon-cap-per-run", "size-bucket", "max-model-abs"):
        field = next(f for f in SiteConfig.model_fields.values() if f.alias == key)
        assert f"# {field.description}" in kit_toml
