"""The deployment files a user copies (deploy/): the programs accept their configs, systemd accepts the
unit, and the compose file and Dockerfile refer to what exists.

docker-compose (Debian's 1.29) validates the compose file against the Compose schema. No Docker daemon
or registry is reachable here, so the images themselves are not built by the tests;
what the Dockerfile's build stage does (a non-editable install of the sources it copies) is checked
instead by installing the same sources into a fresh virtual environment (see the README).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import BIN, REPO
from splitwire.cloud import cli as cloud_cli
from splitwire.edge import cli as edge_cli
from splitwire.edge.agent import EdgeAgent, EdgeConfig
from splitwire.edge.service import EdgeService, ServiceConfig

DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"

EDGE_CONFIGS = [DEPLOY / "edge.toml", DEPLOY / "compose" / "edge.toml"]
CLOUD_CONFIGS = [DEPLOY / "compose" / "cloud.toml", *sorted((DEPLOY / "k8s").rglob("cloud*.toml"))]


@pytest.mark.parametrize("path", EDGE_CONFIGS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_splitwire_edge_serve_accepts_its_config_files(path: Path) -> None:
    values = edge_cli.SERVE_OPTIONS.resolve(argparse.Namespace(config=path), environ={})
    config = edge_cli.service_config_from_values(values)
    assert config.edge.server and config.port == 8470


@pytest.mark.parametrize("path", CLOUD_CONFIGS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_splitwire_cloud_serve_accepts_its_config_files(path: Path) -> None:
    values = cloud_cli.SERVE_OPTIONS.resolve(argparse.Namespace(config=path), environ={})
    config = cloud_cli.config_from_values(values)
    assert config.host == "0.0.0.0" and config.port == 50051 and config.metrics_port == 9464


def test_a_config_file_with_a_typo_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text("[edge]\nservr = 'x:1'\n")
    with pytest.raises(ValueError, match="unknown setting"):
        edge_cli.SERVE_OPTIONS.read_file(path)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_edge_unit(tmp_path: Path) -> None:
    unit = (DEPLOY / "systemd" / "splitwire-edge.service").read_text()
    assert "ExecStart=/opt/splitwire/bin/splitwire-edge serve --config /etc/splitwire/edge.toml" in unit
    # Verify against this checkout's executable: systemd checks that ExecStart exists.
    local = tmp_path / "splitwire-edge.service"
    local.write_text(unit.replace("/opt/splitwire/bin/splitwire-edge", str(BIN / "splitwire-edge")))
    done = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values, only warning: any line about the unit is a failure.
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if local.name in line]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr


def dockerfile_stages() -> dict[str, list[str]]:
    """Each stage's instructions (continuation lines joined), by stage name."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            current = stages.setdefault(line.split()[-1], [])
        current.append(line)
    return stages


def test_dockerfile_builds_both_images_slim_non_root_with_health_checks() -> None:
    stages = dockerfile_stages()
    assert set(stages) == {"build", "runtime", "cloud", "edge"}
    build = " ".join(stages["build"])
    assert "torch==2.13.0" in build and "download.pytorch.org/whl/cpu" in build
    for line in stages["build"]:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    assert stages["runtime"][0].startswith("FROM python:3.11-slim")
    assert "USER 10001" in stages["runtime"]
    scripts = set(re.findall(r"^(splitwire-\w+) =", (REPO / "pyproject.toml").read_text(), re.M))
    for name, script in (("cloud", "splitwire-cloud"), ("edge", "splitwire-edge")):
        lines = stages[name]
        assert any(line.startswith("HEALTHCHECK ") for line in lines), name
        assert f'ENTRYPOINT ["{script}"]' in lines and script in scripts
    cloud_health = next(line for line in stages["cloud"] if line.startswith("HEALTHCHECK "))
    assert "splitwire.cloud.probe" in cloud_health.replace('", "', " ")


@pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose not installed (Debian package docker-compose; scripts/test.sh installs it as root)",
)
def test_docker_compose_validates_the_compose_file() -> None:
    """docker-compose checks the file against the Compose schema (no daemon needed for `config`)."""
    done = subprocess.run(
        ["docker-compose", "-f", "docker-compose.yml", "config", "-q"],
        cwd=DEPLOY,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_refers_to_what_exists() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"cloud", "edge", "traffic", "prometheus", "grafana"}
    stages = dockerfile_stages()
    for name in ("cloud", "edge"):
        build = services[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert build["target"] in stages
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            assert (DEPLOY / source).exists(), f"{name} mounts {source}, which does not exist"
        for other in service.get("depends_on", []):
            assert other in services
        image = service.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image, f"{name}: pin the image"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    # Health-gated start needs a HEALTHCHECK in the image it waits for.
    assert services["edge"]["depends_on"]["cloud"]["condition"] == "service_healthy"
    assert services["traffic"]["depends_on"]["edge"]["condition"] == "service_healthy"
    provisioned = {Path(m.split(":")[1]) for m in services["grafana"]["volumes"]}
    assert Path("/var/lib/grafana/dashboards") in provisioned


def test_the_compose_traffic_client_drives_a_real_edge_service(minilm_server, minilm) -> None:
    edge = EdgeConfig(server=minilm_server.address)
    service = EdgeService(ServiceConfig(edge=edge, port=0), agent=EdgeAgent(edge, model=minilm))
    service.start()
    try:
        assert service.wait_connected(60)
        client = subprocess.Popen(
            [sys.executable, str(DEPLOY / "compose" / "traffic.py"), f"http://127.0.0.1:{service.port}", "50"],
            stdout=subprocess.PIPE,
            text=True,
        )
        lines = []
        deadline = time.monotonic() + 60
        while len(lines) < 3 and time.monotonic() < deadline:
            lines.append(client.stdout.readline())
        client.kill()
        client.wait()
    finally:
        service.stop()
    assert len(lines) == 3 and all("bits/token" in line for line in lines), lines
