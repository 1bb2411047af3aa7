"""``splitwire-edge serve`` in front of a fleet: three real cloud replicas, one killed mid-run.

Also the service's local API on its own (errors, health before and after connecting) and the pieces it
is built from: the fleet's gRPC target and the connection backoff.
"""

from __future__ import annotations

import http.client
import json
import random
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BIN, DATA, ServerThread, start_cloud_process, start_serving_process
from prometheus_client import REGISTRY
from splitwire.cloud.config import ComputeMode, ServerConfig
from splitwire.edge.agent import EdgeConfig
from splitwire.edge.service import IDLE_TIMEOUT_S, EdgeService, ServiceConfig, backoff_delays
from splitwire.split.transport import cloud_target, fleet_server_name
from test_server import sample, scrape

REQUESTS = 180
CLIENTS = 4


def post(url: str, body: object, timeout: float = 60.0) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def served_ok(metrics_port: int) -> float:
    """Infer calls a replica answered OK, from a real scrape of its /metrics."""
    text = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    return sample(text, "splitwire_cloud_requests_total", method="Infer", code="OK")


def sentences(count: int) -> list[str]:
    lines = (DATA / "stsb" / "sts-dev.csv").read_text(encoding="utf-8").splitlines()
    return [line.split("\t")[5] for line in lines[:count]]


@pytest.fixture
def replicas() -> Iterator[list[tuple[subprocess.Popen, str]]]:
    started = []
    try:
        for _ in range(3):
            # Each request waits 20 ms for company in the batch queue, so the killed replica has calls in flight.
            started.append(start_cloud_process("--compute", "thread", "--codec", "fp16", "--max-queue-delay-ms", "20"))
        yield started
    finally:
        for process, _ in started:
            if process.poll() is None:
                process.kill()
            process.wait()


def start_edge_service(config: Path) -> tuple[subprocess.Popen, str, int]:
    command = [BIN / "splitwire-edge", "serve", "--config", str(config), "--port", "0", "--metrics-port", "0"]
    process, match = start_serving_process(command, r"serving on (http://[\d.]+:\d+), metrics on port (\d+)")
    return process, match.group(1), int(match.group(2))


def test_a_replica_killed_and_one_drained_mid_run_fail_no_request_and_load_is_spread(replicas, tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    servers = ",".join(address for _, address in replicas)
    config.write_text(f'[edge]\nserver = "{servers}"\nmax_attempts = 5\nreconnect_backoff_max = 2.0\n')
    edge, api, edge_metrics_port = start_edge_service(config)
    try:
        for _ in range(600):  # connects in the background; /healthz says when
            status, _ = get(f"{api}/healthz")
            if status == 200:
                break
            threading.Event().wait(0.1)
        assert status == 200, "the edge service never connected"
        texts = sentences(REQUESTS)
        statuses: list[int] = []
        errors: list[dict] = []
        lock = threading.Lock()
        done_count = threading.Semaphore(0)
        (killed, _), (drained, _), (last, _) = replicas

        def client(worker: int) -> None:
            for text in texts[worker::CLIENTS]:
                status, body = post(f"{api}/v1/infer", {"texts": [text]})
                with lock:
                    statuses.append(status)
                    if status != 200:
                        errors.append(body)
                done_count.release()

        workers = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for worker in workers:
            worker.start()
        # A third of the way in, one replica crashes (SIGKILL, with calls in flight); two thirds in,
        # another is stopped as Kubernetes stops a pod (SIGTERM: it drains, then exits). The clients
        # keep sending throughout.
        for _ in range(REQUESTS // 3):
            done_count.acquire()
        served_by_killed = served_ok(killed.metrics_port)
        killed.send_signal(signal.SIGKILL)
        for _ in range(REQUESTS // 3):
            done_count.acquire()
        served_by_drained = served_ok(drained.metrics_port)
        drained.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.join(timeout=300)
        assert killed.wait(10) == -signal.SIGKILL
        assert drained.wait(30) == 0, "a drained replica exits cleanly"
        assert len(statuses) == REQUESTS
        assert not errors, f"{len(errors)} requests failed, first: {errors[0]}"
        served_by_last = served_ok(last.metrics_port)
        # Round robin: every replica took its share while it served, and the last one the final third alone.
        shares = (served_by_killed, served_by_drained, served_by_last)
        assert served_by_killed >= REQUESTS / 3 / 3 * 0.5, shares
        assert served_by_drained >= (REQUESTS / 3 / 3 + REQUESTS / 3 / 2) * 0.5, shares
        assert served_by_last >= REQUESTS / 3, shares
        _, edge_metrics = get(f"http://127.0.0.1:{edge_metrics_port}/metrics")
        assert f'splitwire_edge_api_requests_total{{route="/v1/infer",status="200"}} {REQUESTS}.0' in edge_metrics
        assert "splitwire_edge_cloud_ready 1.0" in edge_metrics
    finally:
        edge.send_signal(signal.SIGTERM)
        assert edge.wait(30) == 0


@pytest.fixture(scope="module")
def tiny_llama_server() -> Iterator[ServerThread]:
    config = ServerConfig(port=0, metrics_port=None, model="tiny-llama", codec="fp32", compute=ComputeMode.THREAD)
    with ServerThread(config) as running:
        yield running


@pytest.fixture(scope="module")
def service(tiny_llama_server) -> Iterator[EdgeService]:
    edge = EdgeConfig(server=tiny_llama_server.address, model="tiny-llama", codec="fp32")
    running = EdgeService(ServiceConfig(edge=edge, port=0, max_texts=2, max_body_bytes=4096))
    running.start()
    assert running.wait_connected(60)
    yield running
    running.stop()


def test_the_local_api_answers_inference_and_generation(service: EdgeService) -> None:
    base = f"http://127.0.0.1:{service.port}"
    status, health = get(f"{base}/healthz")
    assert status == 200 and json.loads(health)["model"] == "tiny-llama"
    status, body = post(f"{base}/v1/infer", {"texts": ["hello there", "one more"]})
    assert status == 200 and len(body["results"]) == 2
    assert body["results"][0]["codec"] == "fp32" and "next_token_id" in body["results"][0]
    status, body = post(f"{base}/v1/generate", {"prompt": "hello", "max_new_tokens": 3, "seed": 1})
    assert status == 200 and 1 <= body["new_tokens"] <= 3


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/v1/infer", {"texts": []}, 400, "non-empty list"),
        ("/v1/infer", {"texts": ["a", "b", "c"]}, 413, "at most 2"),
        ("/v1/infer", {"text": "a"}, 400, '"texts"'),
        ("/v1/infer", ["not", "an", "object"], 400, "JSON object"),
        ("/v1/infer", {"texts": ["x" * 5000]}, 413, "at most 4096"),
        ("/v1/generate", {"prompt": "hi", "max_new_tokens": "many"}, 400, "bad generation options"),
        ("/v1/generate", {"prompt": "hi", "max_new_tokens": 0}, 400, "at least 1"),
        ("/v2/nothing", {}, 404, "no route"),
    ],
)
def test_the_local_api_refuses_bad_calls_clearly_and_keeps_serving(
    service: EdgeService, path: str, body: object, status: int, says: str
) -> None:
    base = f"http://127.0.0.1:{service.port}"
    got, answer = post(f"{base}{path}", body)
    assert got == status and says in answer["error"], answer
    assert post(f"{base}/v1/infer", {"texts": ["still serving"]})[0] == 200


def test_stopping_the_service_lets_a_call_in_flight_finish_and_closes_idle_connections(tiny_llama_server) -> None:
    edge = EdgeConfig(server=tiny_llama_server.address, model="tiny-llama", codec="fp32")
    service = EdgeService(ServiceConfig(edge=edge, port=0))
    service.start()
    assert service.wait_connected(60)
    idle = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    idle.request("GET", "/healthz")
    assert idle.getresponse().read() and idle.sock is not None  # kept alive, then left idle
    answers: list[tuple[int, dict, float]] = []

    def generate() -> None:
        status, body = post(f"http://127.0.0.1:{service.port}/v1/generate", {"prompt": "hi", "max_new_tokens": 120})
        answers.append((status, body, time.monotonic()))

    def generating() -> float:
        return REGISTRY.get_sample_value("splitwire_cloud_generation_sessions", {"model": "tiny-llama"}) or 0.0

    caller = threading.Thread(target=generate)
    caller.start()
    deadline = time.monotonic() + 30
    while not generating() and time.monotonic() < deadline:  # the cloud holds the session: under way
        time.sleep(0.001)
    assert generating(), "the generation never started"
    started = time.monotonic()
    service.stop()
    stopped = time.monotonic()
    caller.join(30)
    (status, body, answered) = answers[0]
    assert status == 200 and body["new_tokens"] >= 1, body
    assert answered <= stopped, "stop() returned before the call in flight was answered"
    assert stopped - started < IDLE_TIMEOUT_S + 10, "an idle keep-alive connection held stop() up"


def test_the_local_api_answers_503_until_a_cloud_answers() -> None:
    edge = EdgeConfig(server="127.0.0.1:1", model="tiny-bert", timeout_s=0.5)
    service = EdgeService(ServiceConfig(edge=edge, port=0, connect_backoff_initial_s=0.05, connect_backoff_max_s=0.1))
    service.start()
    try:
        base = f"http://127.0.0.1:{service.port}"
        for _ in range(100):
            if service.last_connect_error:
                break
            threading.Event().wait(0.05)
        status, health = get(f"{base}/healthz")
        assert status == 503 and "cannot reach splitwire-cloud" in json.loads(health)["error"]
        status, body = post(f"{base}/v1/infer", {"texts": ["hello"]})
        assert status == 503 and "not connected" in body["error"]
    finally:
        service.stop()


def test_a_list_of_replicas_becomes_one_round_robin_target() -> None:
    assert cloud_target("127.0.0.1:1") == "127.0.0.1:1"
    assert cloud_target("dns:///cloud.svc:50051") == "dns:///cloud.svc:50051"
    assert cloud_target("127.0.0.1:1, 127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert cloud_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    assert cloud_target("localhost:7,127.0.0.3:8") == "ipv4:127.0.0.1:7,127.0.0.3:8"
    for bad, says in [
        ("", "no server"),
        ("127.0.0.1:1,b", "not HOST:PORT"),
        ("nohost.invalid:1,127.0.0.1:2", "cannot resolve"),
        ("dns:///a:1,b:2", "plain HOST:PORT"),
    ]:
        with pytest.raises(ValueError, match=says):
            cloud_target(bad)
    assert fleet_server_name("cloud-a:1,cloud-b:1") == "cloud-a" and fleet_server_name("[::1]:1,[::1]:2") == "::1"
    assert fleet_server_name("cloud:1") is None and fleet_server_name("dns:///cloud:1") is None
    with pytest.raises(ValueError, match="mix IPv4 and IPv6"):
        cloud_target("127.0.0.1:1,[::1]:2")


def test_connection_backoff_doubles_to_its_ceiling_with_jitter() -> None:
    delays = backoff_delays(0.5, 4.0, random.Random(0))
    got = [next(delays) for _ in range(8)]
    for delay, ceiling in zip(got, [0.5, 1, 2, 4, 4, 4, 4, 4], strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(got)) == len(got)  # jittered: devices restarted together do not reconnect in step
