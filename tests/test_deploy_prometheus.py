"""The Prometheus files in deploy/prometheus, checked by Prometheus itself: promtool on the configs, the
alert rules and their unit tests, then a real Prometheus scraping a running cloud server."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO
from splitwire.edge.agent import EdgeAgent, EdgeConfig
from test_deploy_grafana import dashboard_queries
from test_server import sample, scrape

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
NOT_INSTALLED = (
    "Debian's prometheus package is not installed (scripts/test.sh installs it when run as root with apt-get)"
)

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=NOT_INSTALLED)


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@needs_promtool
@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-kubernetes.yml"])
def test_promtool_accepts_the_scrape_configs(config: str) -> None:
    done = promtool("check", "config", config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout + done.stderr


@needs_promtool
def test_promtool_accepts_the_alert_rules_and_their_unit_tests_pass() -> None:
    done = promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    done = promtool("test", "rules", "alerts_test.yml")
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


@needs_promtool
def test_the_alert_unit_tests_can_fail(tmp_path: Path) -> None:
    """A rule file whose drift band is wrong fails alerts_test.yml: the unit tests do check the rules."""
    broken = (PROMETHEUS_DIR / "alerts.yml").read_text().replace("> 1.5", "> 5")
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(PROMETHEUS_DIR / "alerts_test.yml", tmp_path)
    done = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert done.returncode != 0 and "SplitwireBitsPerTokenDrift" in done.stdout + done.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrometheusProcess:
    def __init__(self, url: str, process: subprocess.Popen) -> None:
        self.url, self.process = url, process

    def api(self, path: str, **params: str) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as answer:
            return json.loads(answer.read())

    def query(self, expr: str) -> list[dict]:
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def wait_for(self, expr: str, timeout_s: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result:
                return result
            time.sleep(0.5)
        raise AssertionError(f"{expr} returned nothing within {timeout_s:g} s; targets: {self.api('targets')}")


@pytest.fixture(scope="module")
def prometheus(minilm_server, tmp_path_factory) -> Iterator[PrometheusProcess]:
    if PROMETHEUS is None:
        pytest.skip(NOT_INSTALLED)
    folder = tmp_path_factory.mktemp("prometheus")
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", folder)
    config = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    config = config.replace("scrape_interval: 10s", "scrape_interval: 1s").replace(
        "evaluation_interval: 10s", "evaluation_interval: 1s"
    )
    config = config.replace('"cloud:9464"', f'"127.0.0.1:{minilm_server.server.metrics_port}"')
    (folder / "prometheus.yml").write_text(config)
    port = free_port()
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(folder / "prometheus.log").open("w"),
    )
    running = PrometheusProcess(f"http://127.0.0.1:{port}", process)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{running.url}/-/ready", timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((folder / "prometheus.log").read_text()) from None
                time.sleep(0.2)
        yield running
    finally:
        process.terminate()
        process.wait(30)


def test_a_real_prometheus_scrapes_the_bits_per_token_histogram(prometheus, minilm_server, minilm) -> None:
    with EdgeAgent(EdgeConfig(server=minilm_server.address), model=minilm) as agent:
        codec = agent.infer("A first sentence.").codec
        for i in range(4):
            agent.infer(f"Another short sentence, number {i}.")
    # The server's own exposition, read directly: what Prometheus must have stored once it has scraped.
    exposition = scrape(minilm_server.metrics_url)
    labels = {"codec": codec, "model": minilm.name}
    count = sample(exposition, "splitwire_cloud_bits_per_token_count", **labels)
    total = sample(exposition, "splitwire_cloud_bits_per_token_sum", **labels)
    assert count >= 5
    selector = f'{{job="splitwire-cloud",codec="{codec}"}}'
    prometheus.wait_for(f"splitwire_cloud_bits_per_token_count{selector} == {count:g}")
    (stored,) = prometheus.query(f"splitwire_cloud_bits_per_token_sum{selector}")
    assert float(stored["value"][1]) == pytest.approx(total)
    buckets = prometheus.query(f"splitwire_cloud_bits_per_token_bucket{selector}")
    assert {series["metric"]["le"] for series in buckets} >= {"32.0", "64.0", "+Inf"}
    (expected,) = prometheus.query(f"splitwire_cloud_codec_expected_bits_per_token{selector}")
    assert float(expected["value"][1]) > 0


def test_prometheus_loads_the_alert_rules_and_evaluates_them_without_error(prometheus) -> None:
    deadline = time.monotonic() + 30
    while True:
        groups = prometheus.api("rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(rule.get("lastEvaluation", "").startswith("20") for rule in rules):
            break
        assert time.monotonic() < deadline, groups
        time.sleep(0.5)
    assert {group["name"] for group in groups} == {"splitwire-cloud", "splitwire-edge"}
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    assert len(rules) == 10


def test_every_dashboard_query_runs_on_the_real_prometheus(prometheus) -> None:
    queries = dashboard_queries()
    assert len(queries) > 20
    answered = 0
    for label, expr in queries:
        answer = prometheus.api("query", query=expr)
        assert answer["status"] == "success", (label, expr, answer)
        answered += bool(answer["data"]["result"])
    # Bits per token, latency by stage, throughput and the rest have data from the scraped server.
    assert answered >= len(queries) // 3, answered
