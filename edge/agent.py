"""The edge agent: tokenize, run the front half, encode, send, and report what it cost.

::

    text --tokenize--> ids (1, T) --blocks [0, k)--> (T, D) --codec--> payload --Infer--> answer

On connect the agent asks the server what it serves and refuses to talk to one whose model or codec
fingerprint differs from its own; every request also carries both fingerprints as metadata, and the
bearer token when one is configured. The channel is TLS (mutual with a client certificate) when
``EdgeConfig.security`` says so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch
from splitwire.codec.base import Codec
from splitwire.codec.catalog import CodecCatalog
from splitwire.codec.container import bits_per_token
from splitwire.edge import metrics
from splitwire.split.cut import Cut, SplitModel
from splitwire.split.models import DEFAULT_MODEL, LoadedModel, ModelFamily, load_model
from splitwire.split.security import ClientSecurity, CredentialsError
from splitwire.split.transport import (
    CODEC_FINGERPRINT_KEY,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_PORT,
    DEFAULT_TIMEOUT_SECONDS,
    MODEL_FINGERPRINT_KEY,
    channel_options,
)
from splitwire.v1 import splitwire_pb2 as pb
from splitwire.v1 import splitwire_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class EdgeError(RuntimeError):
    """Something the user of the edge agent must fix or know: the message says what."""


@dataclass(frozen=True)
class EdgeConfig:
    server: str = f"127.0.0.1:{DEFAULT_PORT}"
    model: str = DEFAULT_MODEL
    split: int | None = None  # None: the server's default split
    codec: str | None = None  # None: the server's default codec for the split
    timeout_s: float = DEFAULT_TIMEOUT_SECONDS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    security: ClientSecurity = field(default_factory=ClientSecurity)  # plaintext, no token


@dataclass
class EdgeResult:
    """One input's answer and what it cost on the edge and on the wire."""

    text: str
    codec: str
    split: int
    tokens: int
    payload: bytes
    message_bytes: int  # the serialised InferRequest, protobuf framing included
    embedding: np.ndarray | None = None
    next_token_id: int | None = None
    next_token: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def payload_bytes(self) -> int:
        return len(self.payload)

    @property
    def bits_per_token(self) -> float:
        return bits_per_token(self.payload_bytes, self.tokens)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "text": self.text,
            "codec": self.codec,
            "split": self.split,
            "tokens": self.tokens,
            "payload_bytes": self.payload_bytes,
            "message_bytes": self.message_bytes,
            "bits_per_token": round(self.bits_per_token, 3),
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }
        if self.embedding is not None:
            out["embedding"] = [round(float(v), 7) for v in self.embedding]
        if self.next_token_id is not None:
            out["next_token_id"] = self.next_token_id
            out["next_token"] = self.next_token
        return out


class EdgeAgent:
    """Front half + codec + gRPC client. ``load()``, ``connect()``, then ``infer()`` as often as needed."""

    def __init__(self, config: EdgeConfig, model: LoadedModel | None = None) -> None:
        """``model``: an already loaded model to share (it must be ``config.model``); loaded on demand otherwise."""
        self.config = config
        self.model: LoadedModel | None = None
        self.catalog: CodecCatalog | None = None
        self._split_model: SplitModel | None = None
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.SplitInferenceStub | None = None
        self.cut: Cut | None = None
        self.codec: Codec | None = None
        self.server_info: pb.ServerInfo | None = None
        self._auth: tuple[tuple[str, str], ...] = ()
        if model is not None:
            self._use(model)

    def __enter__(self) -> EdgeAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load(self) -> None:
        self._use(load_model(self.config.model))

    def _use(self, model: LoadedModel) -> None:
        self.model = model
        self._split_model = SplitModel(model)
        self.catalog = CodecCatalog.for_model(model.fingerprint, model.hidden_size)

    def connect(self) -> None:
        """Open the channel, fetch the server's info and settle model, split and codec with it."""
        if self.model is None:
            self.load()
        assert self.model is not None and self.catalog is not None
        security = self.config.security
        try:
            self._auth = security.metadata()
            self._channel = security.open_channel(self.config.server, channel_options(self.config.max_message_bytes))
        except CredentialsError as exc:
            raise EdgeError(str(exc)) from None
        self._stub = pb_grpc.SplitInferenceStub(self._channel)
        try:
            info = self._stub.GetServerInfo(
                pb.ServerInfoRequest(), timeout=self.config.timeout_s, wait_for_ready=True, metadata=self._auth
            )
        except grpc.RpcError as exc:
            raise EdgeError(f"cannot reach splitwire-cloud at {self.config.server}: {self._explain(exc)}") from None
        self.server_info = info
        served = {m.name: m for m in info.models}
        remote = served.get(self.model.name)
        if remote is None:
            raise EdgeError(
                f"server at {self.config.server} does not serve {self.model.name}; it serves {', '.join(served)}"
            )
        if remote.fingerprint != self.model.fingerprint:
            raise EdgeError(
                f"model fingerprint mismatch: server at {self.config.server} has {remote.name} with fingerprint "
                f"{remote.fingerprint}, this edge has {self.model.fingerprint}. Both sides must load identical "
                "weights: install the same model package version on both."
            )
        split = self.config.split if self.config.split is not None else remote.default_split
        self.cut = Cut(self.model.num_blocks, split)
        if split not in remote.splits:
            raise EdgeError(f"server does not accept split {split}; it accepts {list(remote.splits)}")
        codec_name = self.config.codec or remote.default_codec
        if self.config.codec is None and not self.catalog.get(codec_name).valid_at(split):
            codec_name = "fp16"
        self.codec = self.catalog.get(codec_name)
        if not self.codec.valid_at(split):
            raise EdgeError(f"codec {codec_name} was trained for split(s) {list(self.codec.splits)}, not {split}")
        remote_codecs = {c.name: c for c in remote.codecs}
        if codec_name not in remote_codecs:
            raise EdgeError(f"server does not offer codec {codec_name}; it offers {', '.join(remote_codecs)}")
        if remote_codecs[codec_name].fingerprint != self.codec.fingerprint():
            raise EdgeError(
                f"codec {codec_name} fingerprint mismatch: server has {remote_codecs[codec_name].fingerprint}, "
                f"this edge has {self.codec.fingerprint()}. Use the same splitwire release on both sides."
            )
        log.info("connected to %s: %s split %d codec %s", self.config.server, self.model.name, split, codec_name)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def prepare(self, text: str) -> tuple[pb.InferRequest, int, dict[str, float]]:
        """Tokenize, run the front half and encode: the request, the input's token count, stage times (ms)."""
        assert self.model and self._split_model and self.cut and self.codec
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        input_ids, token_mask = self.model.tokenize([text])
        t1 = time.perf_counter()
        with torch.inference_mode():
            hidden = self._split_model.run_front(self.cut, input_ids, token_mask)[0]
        t2 = time.perf_counter()
        payload = self.codec.encode_sequence(hidden)
        t3 = time.perf_counter()
        timings.update(tokenize=1000 * (t1 - t0), front=1000 * (t2 - t1), encode=1000 * (t3 - t2))
        request = pb.InferRequest(
            model=self.model.name, split=self.cut.to_wire(), codec=self.codec.name, payload=payload
        )
        return request, int(token_mask.sum()), timings

    def infer(self, text: str) -> EdgeResult:
        """Run ``text`` through the split and return the answer with its costs."""
        if self._stub is None:
            self.connect()
        assert self._stub and self.model and self.codec and self.cut
        started = time.perf_counter()
        request, tokens, timings = self.prepare(text)
        self._check_size(request)
        metadata = (
            *self._auth,
            (MODEL_FINGERPRINT_KEY, self.model.fingerprint),
            (CODEC_FINGERPRINT_KEY, self.codec.fingerprint()),
        )
        sent = time.perf_counter()
        try:
            response = self._stub.Infer(request, timeout=self.config.timeout_s, metadata=metadata)
        except grpc.RpcError as exc:
            metrics.REQUESTS.labels(exc.code().name).inc()
            raise EdgeError(f"server refused the request: {self._explain(exc)}") from None
        done = time.perf_counter()
        metrics.REQUESTS.labels("OK").inc()
        timings["round_trip"] = 1000 * (done - sent)
        timings["total"] = 1000 * (done - started)
        timings.update(
            server_decode=response.timing.decode_ms,
            server_queue=response.timing.queue_ms,
            server_compute=response.timing.compute_ms,
            server_total=response.timing.total_ms,
        )
        result = EdgeResult(
            text=text,
            codec=self.codec.name,
            split=self.cut.split,
            tokens=tokens,
            payload=request.payload,
            message_bytes=request.ByteSize(),
            timings_ms=timings,
        )
        if response.HasField("embedding"):
            result.embedding = np.asarray(response.embedding.values, dtype=np.float32)
        elif response.HasField("next_token"):
            result.next_token_id = response.next_token.id
            result.next_token = self.model.tokenizer.decode([response.next_token.id])
        self._observe(result)
        return result

    def _observe(self, result: EdgeResult) -> None:
        labels = (self.model.name if self.model else "", result.codec)
        for stage in ("front", "encode", "round_trip", "total"):
            metrics.STAGE_LATENCY.labels(*labels, stage).observe(result.timings_ms[stage] / 1000.0)
        metrics.PAYLOAD_BYTES.labels(*labels).observe(result.payload_bytes)
        metrics.BITS_PER_TOKEN.labels(*labels).observe(result.bits_per_token)

    @property
    def family(self) -> ModelFamily:
        assert self.model is not None
        return self.model.family

    def message_limit(self) -> int:
        """The largest request both this agent and the server accept, in bytes."""
        server = self.server_info.max_message_bytes if self.server_info else 0
        return min(self.config.max_message_bytes, server) if server else self.config.max_message_bytes

    def _check_size(self, request: pb.InferRequest) -> None:
        size, limit = request.ByteSize(), self.message_limit()
        if size > limit:
            raise EdgeError(
                f"request of {size} bytes is larger than the {limit} bytes the server accepts (its "
                "--max-message-bytes): use a codec with fewer bits per token or a shorter input"
            )

    def _explain(self, exc: grpc.RpcError) -> str:
        """The status and details, with what to do for the failures users hit when setting up."""
        code, details = exc.code(), exc.details() or ""
        text = f"{code.name}: {details}"
        if code is grpc.StatusCode.UNAUTHENTICATED:
            return f"{text} (check --auth-token-file against the server's token)"
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
            return f"{text} (the request exceeds a --max-message-bytes limit; use a smaller codec or input)"
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            hint = (
                "check --tls-ca, the client certificate and the server's certificate name"
                if self.config.security.tls
                else "if the server uses TLS, pass --tls-ca (and --tls-cert/--tls-key for mutual TLS)"
            )
            return f"{text} ({hint})"
        return text
