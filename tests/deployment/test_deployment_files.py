"""deploy/: compose file, images, systemd units and Kubernetes manifests, checked as far as this machine allows.

No Docker engine or cluster runs here: the compose file and manifests are parsed
and cross-checked against the files and commands they name, the units go
through `systemd-analyze verify`, and (in test_deployment.py) the images'
entrypoints run as plain processes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from coordinator.provision import SITE_UNIT_FILE, init_consortium, site_unit
from medfed.cli import app
from site_client.kit import generate_site_key, load_kit

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = ["Dockerfile.coordinator", "Dockerfile.site", "Dockerfile.site-cpu"]


def _entrypoint(dockerfile: Path) -> list[str]:
    line = next(ln for ln in dockerfile.read_text().splitlines() if ln.startswith("ENTRYPOINT"))
    return json.loads(line.split(None, 1)[1])


def _help_ok(args: list[str]) -> str:
    res = CliRunner().invoke(app, [*args, "--help"])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfiles_copy_what_exists_harden_flower_and_run_a_medfed_command(name: str) -> None:
    path = DEPLOY / "docker" / name
    text = path.read_text()
    for src in re.findall(r"(?m)^COPY\s+(\S+)\s", text):
        assert (ROOT / src).exists(), f"{name} copies {src}, which is not in the repository"
    for var in (
        "FLWR_TELEMETRY_ENABLED=0",
        "FLWR_DISABLE_UPDATE_CHECK=1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1",
    ):
        assert var in text
    assert "torch==2.13.0" in text and re.search(r"(?m)^USER medfed$", text)
    argv = _entrypoint(path)
    assert argv[0] == "medfed"
    help_text = _help_ok([a for a in argv[1:] if not a.startswith("/")][:2])
    assert all(opt in help_text for opt in [a for a in argv if a.startswith("--")])
    assert (DEPLOY / "docker" / f"{name}.dockerignore").is_file()


def test_site_images_cuda_and_cpu() -> None:
    gpu = (DEPLOY / "docker" / "Dockerfile.site").read_text()
    cpu = (DEPLOY / "docker" / "Dockerfile.site-cpu").read_text()
    assert re.search(r"ARG BASE_IMAGE=nvidia/cuda:\S+", gpu) and "download.pytorch.org/whl/cpu" not in gpu
    assert "ARG BASE_IMAGE=python:3.11" in cpu and "download.pytorch.org/whl/cpu" in cpu
    assert _entrypoint(DEPLOY / "docker" / "Dockerfile.site") == _entrypoint(DEPLOY / "docker" / "Dockerfile.site-cpu")


def test_compose_brings_up_a_coordinator_and_three_sites_with_tls_and_auth(tmp_path: Path) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"coordinator", "hospital-a", "hospital-b", "hospital-c"}
    for svc in services.values():
        ctx = (DEPLOY / svc["build"]["context"]).resolve()
        assert ctx == ROOT and (ctx / svc["build"]["dockerfile"]).is_file()
    assert services["coordinator"]["ports"] == ["9093:9093"]  # one port, HTTPS: nginx, the Fleet API only
    assert all("ports" not in svc for name, svc in services.items() if name != "coordinator")
    coordinator_image = (DEPLOY / "docker" / "Dockerfile.coordinator").read_text()
    assert "EXPOSE 9093" in coordinator_image and re.search(r"apt-get install[^\n]* nginx", coordinator_image)
    # provisioned as the compose file's header says (keys made in sites/, public keys enrolled, kits copied
    # back), every file the services mount exists
    work = tmp_path / "deploy"
    work.mkdir()
    shutil.copy(DEPLOY / "compose.yaml", work / "compose.yaml")
    sites = [n for n in services if n != "coordinator"]
    pubs = [(n, generate_site_key(work / "sites" / n).public) for n in sites]
    init_consortium(work / "consortium", "demo", ["coordinator"], pubs)
    for n in sites:
        shutil.copytree(work / "consortium" / "kits" / n, work / "sites" / n, dirs_exist_ok=True)
    shutil.move(work / "consortium" / "ca", tmp_path / "offline-ca")
    for name, svc in services.items():
        for vol in svc["volumes"]:
            host, container = vol.split(":")[:2]
            if host.startswith("./consortium"):
                assert name == "coordinator" and (work / host).exists(), f"{name} mounts {host}"
            elif container == "/kit":
                assert host == f"./sites/{name}", host  # the site's own folder, with its own key
                assert load_kit(work / host).auth_key.is_file()
            else:
                assert re.fullmatch(rf"\./demo-data/sites/{name}/deid", host), host  # `medfed demo` layout
        if name != "coordinator":
            # the kit's certificate names the coordinator as the sites reach it on the compose network
            kit = (work / "sites" / name / "kit.toml").read_text()
            assert 'superlink = "coordinator:9093"' in kit
            assert svc["command"] == ["--superlink", "coordinator:9093"]
            assert "--superlink" in _help_ok(["site", "start"])
    cert = (work / "consortium" / "coordinator" / "tls" / "server.pem").read_bytes()
    from cryptography import x509

    san = x509.load_pem_x509_certificate(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "coordinator" in san.value.get_values_for_type(x509.DNSName)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", ["medfed-site.service", "medfed-coordinator.service", "medfed-receive.service", "kit"])
def test_systemd_units_verify(unit: str, tmp_path: Path) -> None:
    if unit == "kit":  # the unit every site kit ships
        init_consortium(tmp_path / "c", "n", ["h"], [("a", generate_site_key(tmp_path / "site-a").public)])
        text = (tmp_path / "c" / "kits" / "a" / "medfed-site.service").read_text()
        unit = "medfed-site.service"
    else:
        text = (DEPLOY / "systemd" / unit).read_text()
    exec_start = re.search(r"(?m)^ExecStart=(\S+)(.*)$", text)
    assert exec_start and exec_start.group(1) == "/opt/medfed/.venv/bin/medfed"
    argv = exec_start.group(2).split()
    _help_ok([a for a in argv if not a.startswith("/") and not a.startswith("--")][:2])
    # verify against this machine's medfed (the unit's path is where deploy/README.md installs it)
    (tmp_path / unit).write_text(
        text.replace("/opt/medfed/.venv/bin/medfed", str(Path(sys.executable).parent / "medfed"))
    )
    res = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / unit)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and res.stderr.strip() == "" and res.stdout.strip() == "", res.stderr + res.stdout
    for var in (
        "FLWR_TELEMETRY_ENABLED=0",
        "FLWR_DISABLE_UPDATE_CHECK=1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1",
    ):
        assert f"Environment={var}" in text


def test_site_unit_is_stated_once_and_every_kit_ships_it_hardened(tmp_path: Path) -> None:
    """The deploy/ unit and each kit's unit come from one text, so a kit never lacks the deploy file's hardening."""
    deployed = (DEPLOY / "systemd" / SITE_UNIT_FILE).read_text()
    assert deployed == site_unit(), (
        f"deploy/systemd/{SITE_UNIT_FILE} differs from coordinator.provision.site_unit(); edit the unit there and "
        "regenerate: python -c 'from coordinator.provision import site_unit; print(site_unit(), end=\"\")' > "
        f"deploy/systemd/{SITE_UNIT_FILE}")
    init_consortium(tmp_path / "c", "n", ["h"], [("a", generate_site_key(tmp_path / "site-a").public)])
    kit_unit = (tmp_path / "c" / "kits" / "a" / SITE_UNIT_FILE).read_text()
    assert "Description=medfed site node a (" in kit_unit
    directives = [ln for ln in deployed.splitlines() if "=" in ln and not ln.startswith(("#", "Description="))]
    for hardening in ("NoNewPrivileges=true", "ProtectSystem=strict", "ProtectKernelTunables=true",
                      "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "UMask=0077", "KillMode=mixed"):
        assert hardening in directives
    assert [ln for ln in kit_unit.splitlines() if "=" in ln and not ln.startswith(("#", "Description="))] == directives


def test_kubernetes_manifests_are_consistent() -> None:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "coordinator.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"PersistentVolumeClaim", "Deployment", "Service", "NetworkPolicy"}
    dep = kinds["Deployment"]["spec"]
    assert dep["replicas"] == 1 and dep["strategy"]["type"] == "Recreate"
    pod = dep["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"superlink": 9093}
    svc_ports = kinds["Service"]["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in svc_ports] == [(9093, "superlink")]
    assert kinds["Service"]["spec"]["selector"] == dep["selector"]["matchLabels"]
    volumes = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volumes
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == kinds["PersistentVolumeClaim"]["metadata"]["name"]
               for v in pod["volumes"])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    # what `medfed coordinator start /consortium` reads and writes
    assert {"/consortium/consortium.toml", "/consortium/coordinator/tls", "/consortium/coordinator/nodes",
            "/consortium/coordinator/certs", "/consortium/coordinator/state"} <= mounts
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    # only the proxy's port is admitted (the SuperLink's Control/Runtime APIs are on the pod's loopback)
    assert kinds["NetworkPolicy"]["spec"]["ingress"] == [{"ports": [{"port": 9093, "protocol": "TCP"}]}]
    assert "crl.pem" in (DEPLOY / "k8s" / "coordinator.yaml").read_text()
    if shutil.which("kubectl"):
        res = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        rendered = {d["kind"] for d in yaml.safe_load_all(res.stdout) if d}
        assert rendered == {"Namespace", *kinds}


@pytest.mark.adversarial
@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                    reason="nginx is not installed (apt-get install nginx)")
def test_the_public_port_config_demands_site_certificates_and_proxies_only_the_fleet_api(tmp_path: Path) -> None:
    from coordinator.provision import Layout
    from coordinator.superlink import CoordinatorPaths, write_nginx_config

    cons = tmp_path / "c"
    init_consortium(cons, "n", ["h"], [("a", generate_site_key(tmp_path / "site-a").public)])
    CoordinatorPaths(Layout(cons)).state.mkdir(parents=True)
    conf = write_nginx_config(cons, public_port=9093, bind_host="0.0.0.0", internal=40000).read_text()  # `nginx -t`
    tls = cons / "coordinator" / "tls"
    assert "ssl_verify_client on;" in conf and f"ssl_client_certificate {tls / 'ca.pem'};" in conf
    assert f"ssl_crl {tls / 'crl.pem'};" in conf
    assert re.findall(r"proxy_pass (\S+);", conf) == ["https://127.0.0.1:40000"]  # the one proxied location ...
    assert re.findall(r"location (\S+) \{", conf) == ["/v1/fleet/", "/", "@plaintext", "@refused"]  # ... is /v1/fleet/
    assert "location / { return 403; }" in conf and "proxy_ssl_verify on;" in conf
