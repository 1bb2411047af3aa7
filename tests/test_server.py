"""A real cloud server on a loopback port, driven by the real edge agent and raw gRPC calls."""

from __future__ import annotations

import re
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from conftest import ServerThread
from grpc_health.v1 import health_pb2, health_pb2_grpc
from splitwire.edge.agent import EdgeAgent, EdgeConfig, EdgeError
from splitwire.split.models import LoadedModel
from splitwire.split.transport import MODEL_FINGERPRINT_KEY, channel_options
from splitwire.v1 import splitwire_pb2 as pb
from splitwire.v1 import splitwire_pb2_grpc as pb_grpc
from test_cut import transformers_sentence_embedding

SENTENCES = ["A man with a hard hat is dancing.", "A young child is riding a horse."]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """Value of one sample in Prometheus text format, 0 when absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def stub(minilm_server: ServerThread):
    with grpc.insecure_channel(minilm_server.address, options=channel_options()) as channel:
        yield pb_grpc.SplitInferenceStub(channel)


@pytest.fixture(scope="module")
def agent(minilm_server: ServerThread, minilm: LoadedModel):
    with EdgeAgent(EdgeConfig(server=minilm_server.address, codec="fp32"), minilm) as edge:
        edge.connect()
        yield edge


def edge_for(server: ServerThread, model: LoadedModel, **kwargs) -> EdgeAgent:
    return EdgeAgent(EdgeConfig(server=server.address, **kwargs), model)


def test_health_reports_serving(minilm_server: ServerThread) -> None:
    with grpc.insecure_channel(minilm_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "splitwire.v1.SplitInference"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_server_info_lists_model_splits_and_codecs(stub, minilm: LoadedModel) -> None:
    info = stub.GetServerInfo(pb.ServerInfoRequest(), timeout=10)
    assert info.default_model == "all-MiniLM-L6-v2"
    (model,) = info.models
    assert model.fingerprint == minilm.fingerprint
    assert (model.num_blocks, model.hidden_size) == (6, 384)
    assert list(model.splits) == list(range(7))
    names = [c.name for c in model.codecs]
    assert names[:4] == ["fp32", "fp16", "bf16", "int8-zstd"]
    assert all(len(c.fingerprint) == 16 for c in model.codecs)


@pytest.mark.parametrize("split", range(7))
@pytest.mark.parametrize(("codec", "bound"), [("fp32", 0.99999), ("fp16", 0.9999)])
def test_split_embedding_matches_unsplit_over_grpc(
    minilm_server: ServerThread, minilm: LoadedModel, split: int, codec: str, bound: float
) -> None:
    expected = transformers_sentence_embedding(minilm, SENTENCES)
    with edge_for(minilm_server, minilm, split=split, codec=codec) as edge:
        for index, text in enumerate(SENTENCES):
            result = edge.infer(text)
            assert result.split == split and result.codec == codec
            cosine = torch.nn.functional.cosine_similarity(
                torch.from_numpy(result.embedding)[None], expected[index : index + 1]
            ).item()
            assert cosine >= bound


def test_token_ids_run_the_whole_model_in_the_cloud(minilm_server: ServerThread, minilm: LoadedModel) -> None:
    expected = transformers_sentence_embedding(minilm, SENTENCES)
    with edge_for(minilm_server, minilm, split=0, codec="token-ids") as edge:
        for index, text in enumerate(SENTENCES):
            result = edge.infer(text)
            cosine = torch.nn.functional.cosine_similarity(
                torch.from_numpy(result.embedding)[None], expected[index : index + 1]
            ).item()
            assert cosine >= 0.99999
            assert result.payload_bytes == 3 + (result.tokens * 15 + 7) // 8


def test_token_ids_are_refused_past_split_0(stub, agent: EdgeAgent) -> None:
    request = valid_request(agent)
    request.codec = "token-ids"
    with pytest.raises(grpc.RpcError) as caught:
        stub.Infer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "trained for split(s) [0]" in caught.value.details()


def test_result_reports_bytes_tokens_and_bits(agent: EdgeAgent) -> None:
    result = agent.infer(SENTENCES[0])
    assert result.tokens == 11  # [CLS] + 9 word pieces + [SEP]
    assert result.payload_bytes == 3 + 11 * 384 * 4
    assert result.bits_per_token == pytest.approx(result.payload_bytes * 8 / 11)
    assert result.message_bytes > result.payload_bytes
    for stage in ("tokenize", "front", "encode", "round_trip", "total", "server_compute"):
        assert result.timings_ms[stage] >= 0


def test_metrics_count_exactly_the_requests(minilm_server: ServerThread, agent: EdgeAgent) -> None:
    labels = {"model": "all-MiniLM-L6-v2", "codec": "fp32"}
    before = scrape(minilm_server.metrics_url)
    started = time.monotonic()
    requests = 5
    for i in range(requests):
        agent.infer(f"sentence number {i} goes through the split")
    elapsed = time.monotonic() - started
    after = scrape(minilm_server.metrics_url)
    busy = "splitwire_cloud_compute_busy_seconds_total"
    model = {"model": labels["model"], "work": "batches"}
    assert 0 < sample(after, busy, **model) - sample(before, busy, **model) < elapsed  # one request at a time
    for stage in ("decode", "queue", "compute", "total"):
        name = "splitwire_cloud_request_duration_seconds_count"
        assert sample(after, name, stage=stage, **labels) - sample(before, name, stage=stage, **labels) == requests
    for name in ("splitwire_cloud_payload_bytes_count", "splitwire_cloud_bits_per_token_count"):
        assert sample(after, name, **labels) - sample(before, name, **labels) == requests
    ok = "splitwire_cloud_requests_total"
    assert sample(after, ok, method="Infer", code="OK") - sample(before, ok, method="Infer", code="OK") == requests
    assert "splitwire_cloud_bits_per_token_bucket" in after


def valid_request(agent: EdgeAgent) -> pb.InferRequest:
    request, _, _ = agent.prepare(SENTENCES[1])
    return request


def test_random_bytes_get_invalid_argument_and_the_server_keeps_serving(stub, agent: EdgeAgent) -> None:
    rng = np.random.default_rng(7)
    for size in (0, 1, 5, 64, 4096):
        bad = pb.InferRequest(codec="fp32", payload=rng.bytes(size))
        with pytest.raises(grpc.RpcError) as caught:
            stub.Infer(bad, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed payload for codec fp32" in caught.value.details()
    response = stub.Infer(valid_request(agent), timeout=10)
    assert len(response.embedding.values) == 384


def test_truncated_payload_names_the_problem(stub, agent: EdgeAgent) -> None:
    request = valid_request(agent)
    request.payload = request.payload[:-3]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Infer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected" in caught.value.details()


@pytest.mark.parametrize(
    ("field", "value", "code", "message"),
    [
        ("codec", "no-such-codec", grpc.StatusCode.NOT_FOUND, "unknown codec 'no-such-codec'"),
        ("model", "gpt-17", grpc.StatusCode.NOT_FOUND, "unknown model 'gpt-17'"),
        ("split", 9, grpc.StatusCode.INVALID_ARGUMENT, "split 9 is outside [0, 6]"),
        ("codec", "fp16", grpc.StatusCode.INVALID_ARGUMENT, "coded with fp32, but the request names fp16"),
    ],
)
def test_bad_requests_get_clear_statuses(stub, agent: EdgeAgent, field: str, value, code, message: str) -> None:
    request = valid_request(agent)
    setattr(request, field, value)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Infer(request, timeout=10)
    assert caught.value.code() == code
    assert message in caught.value.details()


def test_model_fingerprint_mismatch_is_refused_by_the_server(stub, agent: EdgeAgent) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Infer(valid_request(agent), timeout=10, metadata=((MODEL_FINGERPRINT_KEY, "0123456789abcdef"),))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "model fingerprint mismatch" in caught.value.details()


def test_edge_refuses_a_server_with_other_weights(minilm_server: ServerThread, minilm: LoadedModel) -> None:
    altered = LoadedModel(minilm.spec, minilm.hf_model, minilm.tokenizer, "ffffffffffffffff")
    edge = edge_for(minilm_server, altered)
    with pytest.raises(EdgeError, match=r"model fingerprint mismatch.*identical weights"):
        edge.connect()
    edge.close()


def test_stream_answers_in_order(stub, agent: EdgeAgent) -> None:
    requests = []
    for i, text in enumerate(SENTENCES * 2):
        request, _, _ = agent.prepare(text)
        request.request_id = f"r{i}"
        requests.append(request)
    replies = list(stub.InferStream(iter(requests), timeout=30))
    assert [r.request_id for r in replies] == ["r0", "r1", "r2", "r3"]
    np.testing.assert_allclose(replies[0].embedding.values, replies[2].embedding.values, atol=1e-5)


def test_concurrent_requests_are_batched_and_match_single_answers(
    minilm_server: ServerThread, agent: EdgeAgent
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"the {i}th sentence, which has a length of its own{'!' * i}" for i in range(16)]
    alone = {text: agent.infer(text).embedding for text in texts[:3]}
    with ThreadPoolExecutor(max_workers=16) as pool:
        together = list(pool.map(agent.infer, texts))
    for result in together[:3]:
        np.testing.assert_allclose(result.embedding, alone[result.text], atol=1e-5)
    assert max(r.timings_ms["server_compute"] for r in together) > 0
