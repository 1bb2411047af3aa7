"""TLS, mutual TLS and bearer tokens on a real server: who gets in, who is refused, and how."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import ServerThread, tiny_bert_request
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pki import Pki, make_pki
from splitwire.cloud.config import ComputeMode, ServerConfig
from splitwire.cloud.server import CloudServer
from splitwire.edge.agent import EdgeAgent, EdgeConfig, EdgeError
from splitwire.split.models import LoadedModel
from splitwire.split.security import ClientSecurity, CredentialsError, bearer_metadata, read_token_file
from splitwire.split.transport import SERVICE_NAME, channel_options
from splitwire.v1 import splitwire_pb2 as pb
from splitwire.v1 import splitwire_pb2_grpc as pb_grpc
from test_server import sample, scrape

TOKEN = "s3cret-token-for-tests"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN + "\n")
    return path


def tiny_server(**options: object) -> ServerThread:
    options.setdefault("compute", ComputeMode.THREAD)
    return ServerThread(ServerConfig(port=0, metrics_port=0, model="tiny-bert", **options))


@pytest.fixture(scope="module")
def tls_server(pki: Pki, token_file: Path) -> Iterator[ServerThread]:
    with tiny_server(tls_cert=pki.server_cert, tls_key=pki.server_key, auth_token_file=token_file) as running:
        yield running


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[ServerThread]:
    with tiny_server(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca) as running:
        yield running


def tls_channel(server: ServerThread, pki: Pki, cert: Path | None = None, key: Path | None = None) -> grpc.Channel:
    security = ClientSecurity(tls_ca=pki.ca, tls_cert=cert, tls_key=key)
    return security.open_channel(server.address, channel_options())


def test_edge_agent_speaks_tls_with_a_token(tls_server: ServerThread, pki: Pki, token_file: Path, tiny_bert) -> None:
    security = ClientSecurity(tls_ca=pki.ca, auth_token_file=token_file)
    with EdgeAgent(EdgeConfig(server=tls_server.address, model="tiny-bert", security=security), tiny_bert) as edge:
        result = edge.infer("hello over TLS")
    assert result.embedding is not None and result.embedding.shape == (32,)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "missing bearer token"),
        (bearer_metadata("wrong"), "invalid bearer token"),
        ((("authorization", TOKEN),), "missing bearer token"),
    ],
)
def test_calls_without_the_right_token_are_unauthenticated(
    tls_server: ServerThread, pki: Pki, tiny_bert: LoadedModel, metadata, message: str
) -> None:
    before = scrape(tls_server.metrics_url)
    with tls_channel(tls_server, pki) as channel:
        stub = pb_grpc.SplitInferenceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Infer(tiny_bert_request(), timeout=10, metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert message in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetServerInfo(pb.ServerInfoRequest(), timeout=10, metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.InferStream(iter([tiny_bert_request()]), timeout=10, metadata=metadata))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.Infer(tiny_bert_request(), timeout=10, metadata=bearer_metadata(TOKEN))
        assert len(reply.embedding.values) == 32
    after = scrape(tls_server.metrics_url)
    name = "splitwire_cloud_rejected_requests_total"
    assert sample(after, name, reason="unauthenticated") - sample(before, name, reason="unauthenticated") == 3
    name = "splitwire_cloud_requests_total"
    code = {"method": "Infer", "code": "UNAUTHENTICATED"}
    assert sample(after, name, **code) - sample(before, name, **code) == 1


def test_health_and_reflection_need_no_token(tls_server: ServerThread, pki: Pki) -> None:
    with tls_channel(tls_server, pki) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        assert SERVICE_NAME in {s.name for s in answer.list_services_response.service}


def test_plaintext_client_is_refused_by_a_tls_server(tls_server: ServerThread, tiny_bert: LoadedModel) -> None:
    with grpc.insecure_channel(tls_server.address) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.SplitInferenceStub(channel).Infer(tiny_bert_request(), timeout=5, metadata=bearer_metadata(TOKEN))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_edge_without_tls_explains_the_refusal(tls_server: ServerThread, tiny_bert: LoadedModel) -> None:
    edge = EdgeAgent(EdgeConfig(server=tls_server.address, model="tiny-bert", timeout_s=2), tiny_bert)
    with pytest.raises(EdgeError, match="if the server uses TLS, pass --tls-ca"):
        edge.connect()
    edge.close()


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(
    mtls_server: ServerThread, pki: Pki, tiny_bert: LoadedModel
) -> None:
    for cert, key in ((None, None), (pki.rogue_cert, pki.rogue_key)):
        with tls_channel(mtls_server, pki, cert, key) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.SplitInferenceStub(channel).Infer(tiny_bert_request(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    with tls_channel(mtls_server, pki, pki.client_cert, pki.client_key) as channel:
        reply = pb_grpc.SplitInferenceStub(channel).Infer(tiny_bert_request(), timeout=10)
    assert len(reply.embedding.values) == 32


def test_the_health_port_answers_plaintext_probes_of_a_mutual_tls_server_and_nothing_else(
    pki: Pki, tiny_bert: LoadedModel
) -> None:
    tls = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_client_ca": pki.ca}
    with tiny_server(health_port=0, **tls) as running:
        probe_address = f"127.0.0.1:{running.server.health_port}"
        with grpc.insecure_channel(probe_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_NAME):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.SplitInferenceStub(channel).Infer(tiny_bert_request(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
            running.call(running.server.drain())
            reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_token_files_must_hold_a_token(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n  \n")
    with pytest.raises(CredentialsError, match="is empty"):
        read_token_file(empty)
    with pytest.raises(CredentialsError, match="does not exist"):
        read_token_file(tmp_path / "absent")
    (tmp_path / "two").write_text("  first-line  \nsecond\n")
    assert read_token_file(tmp_path / "two") == "first-line"


def test_server_with_an_empty_token_file_refuses_to_start(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("")
    server = CloudServer(ServerConfig(port=0, metrics_port=None, model="tiny-bert", auth_token_file=empty))
    with pytest.raises(CredentialsError, match="is empty"):
        asyncio.run(server.start())


def test_tls_options_must_come_in_pairs(pki: Pki) -> None:
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        ServerConfig(tls_cert=pki.server_cert)
    with pytest.raises(ValueError, match=r"--tls-client-ca .* needs"):
        ServerConfig(tls_client_ca=pki.ca)
    with pytest.raises(CredentialsError, match="--tls-cert and --tls-key go together"):
        ClientSecurity(tls_key=pki.client_key)


def test_edge_cli_takes_tls_and_token_from_the_environment(tls_server: ServerThread, pki: Pki, token_file) -> None:
    env = {
        **os.environ,
        "SPLITWIRE_EDGE_TLS_CA": str(pki.ca),
        "SPLITWIRE_EDGE_AUTH_TOKEN_FILE": str(token_file),
        "SPLITWIRE_EDGE_MODEL": "tiny-bert",
    }
    done = subprocess.run(
        [BIN / "splitwire-edge", "run", "--server", tls_server.address, "--json", "over TLS"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["embedding"]) == 32


def test_edge_agent_reaches_a_list_of_tls_replicas_with_a_token(
    tls_server: ServerThread, pki: Pki, token_file: Path, tiny_bert: LoadedModel
) -> None:
    """A list target (``ipv4:a,b``) still verifies each replica's certificate and carries the token.
    (Both servers share this process's metrics, so the spread is tested with processes in test_fleet.)"""
    tls = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, "auth_token_file": token_file}
    with tiny_server(**tls) as second:
        security = ClientSecurity(tls_ca=pki.ca, auth_token_file=token_file)
        config = EdgeConfig(server=f"{tls_server.address},{second.address}", model="tiny-bert", security=security)
        served = lambda: sample(scrape(second.metrics_url), "splitwire_cloud_requests_total", method="Infer", code="OK")  # noqa: E731
        before = served()
        with EdgeAgent(config, tiny_bert) as agent:
            for _ in range(6):
                assert agent.infer("hello there").embedding is not None
        assert served() == before + 6
