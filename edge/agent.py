"""The edge agent: tokenize, run the front half, encode, send, and report what it cost.

::

    text --tokenize--> ids (1, T) --blocks [0, k)--> (T, D) --codec--> payload --Infer--> answer

Generation (decoder models) runs over one InferStream stream, the edge keeping the KV cache of blocks
[0, k) and the server that of blocks [k, L); the server samples and answers one token per step::

    prompt ids (1, T) --front_step--> (T, D) --codec--> payload + GenerationOptions --> first token
    token id   (1, 1) --front_step--> (1, D) --codec--> payload                     --> next token ... finish

On connect the agent asks the server what it serves and refuses to talk to one whose model or codec
fingerprint differs from its own; every request also carries both fingerprints as metadata, and the
bearer token when one is configured. The channel is TLS (mutual with a client certificate) when
``EdgeConfig.security`` says so.
"""

from __future__ import annotations

import itertools
import logging
import queue
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping
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
from splitwire.split.sampling import SamplingParams
from splitwire.split.security import ClientSecurity, CredentialsError
from splitwire.split.transport import (
    CODEC_FINGERPRINT_KEY,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_PORT,
    DEFAULT_RECONNECT_BACKOFF_MAX_SECONDS,
    DEFAULT_TIMEOUT_SECONDS,
    MODEL_FINGERPRINT_KEY,
    balanced_channel_options,
    cloud_target,
    fleet_server_name,
)
from splitwire.v1 import splitwire_pb2 as pb
from splitwire.v1 import splitwire_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class EdgeError(RuntimeError):
    """Something the user of the edge agent must fix or know: the message says what.

    ``grpc_code`` names the server's gRPC status (``"UNAVAILABLE"``...) when the cloud refused a call.
    """

    def __init__(self, message: str, grpc_code: str | None = None) -> None:
        super().__init__(message)
        self.grpc_code = grpc_code


@dataclass(frozen=True)
class EdgeConfig:
    server: str = f"127.0.0.1:{DEFAULT_PORT}"  # HOST:PORT, a comma-separated list of replicas, or dns:///NAME:PORT
    model: str = DEFAULT_MODEL
    split: int | None = None  # None: the server's default split
    codec: str | None = None  # None: the server's default codec for the split
    timeout_s: float = DEFAULT_TIMEOUT_SECONDS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # per idempotent call, over the replicas, on UNAVAILABLE
    reconnect_backoff_max_s: float = DEFAULT_RECONNECT_BACKOFF_MAX_SECONDS
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
    response_bytes: int = 0  # the serialised InferResponse
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
            "response_bytes": self.response_bytes,
            "bits_per_token": round(self.bits_per_token, 3),
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }
        if self.embedding is not None:
            out["embedding"] = [round(float(v), 7) for v in self.embedding]
        if self.next_token_id is not None:
            out["next_token_id"] = self.next_token_id
            out["next_token"] = self.next_token
        return out


@dataclass
class GenerationResult:
    """One generation through the split: the new tokens and what they cost on the edge and on the wire."""

    prompt: str
    codec: str
    split: int
    prompt_tokens: int
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop_token" or "max_new_tokens"
    payload_bytes: int  # every payload sent: the prompt's, then one per step
    message_bytes: int  # the serialised InferRequests, protobuf framing included
    tokens_sent: int  # hidden states sent: the prompt's tokens, then one per step
    timings_ms: dict[str, float] = field(default_factory=dict)
    inter_token_ms: list[float] = field(default_factory=list)  # between consecutive tokens received

    @property
    def bits_per_token(self) -> float:
        return bits_per_token(self.payload_bytes, self.tokens_sent)

    def to_json(self) -> dict[str, object]:
        return {
            "prompt": self.prompt,
            "text": self.text,
            "token_ids": self.token_ids,
            "new_tokens": len(self.token_ids),
            "finish_reason": self.finish_reason,
            "codec": self.codec,
            "split": self.split,
            "prompt_tokens": self.prompt_tokens,
            "tokens_sent": self.tokens_sent,
            "payload_bytes": self.payload_bytes,
            "message_bytes": self.message_bytes,
            "bits_per_token": round(self.bits_per_token, 3),
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "inter_token_ms": [round(v, 3) for v in self.inter_token_ms],
        }


_FINISH_NAMES = {
    pb.FINISH_REASON_STOP_TOKEN: "stop_token",
    pb.FINISH_REASON_MAX_NEW_TOKENS: "max_new_tokens",
}


class _StepWatchdog:
    """Cancels a streaming call when one answer takes longer than ``timeout_s``.

    One thread per generation looks at the armed deadline ten times a second; arming it is a plain
    assignment, so a step starts no timer thread (that costs milliseconds per token on a busy machine).
    """

    def __init__(self, call: grpc.Call, timeout_s: float) -> None:
        self._call, self._timeout_s = call, timeout_s
        self._deadline: float | None = None
        self._stopped = threading.Event()
        self.fired = False
        threading.Thread(target=self._watch, name="splitwire-step-watchdog", daemon=True).start()

    def next(self, responses: Iterator[pb.InferResponse]) -> pb.InferResponse | None:
        """The next answer, None when the server has ended the stream."""
        self._deadline = time.monotonic() + self._timeout_s
        try:
            return next(responses, None)
        finally:
            self._deadline = None

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(min(0.1, self._timeout_s / 10)):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self.fired = True
                self._call.cancel()
                return


def codec_input(
    split_model: SplitModel, cut: Cut, codec: Codec, input_ids: torch.Tensor, token_mask: torch.Tensor
) -> torch.Tensor:
    """What ``codec`` encodes for a batch: the hidden states at the split ``(B, T, D)`` (from the front
    with the codec's front adapter, if it has one), or for the token-ids codec the ids themselves
    ``(B, T, 1)``, the front half not run at all."""
    if codec.codes_token_ids:
        return input_ids[..., None].float()
    with torch.inference_mode():
        return split_model.with_front_adapter(codec.front_adapter).run_front(cut, input_ids, token_mask)


class EdgeAgent:
    """Front half + codec + gRPC client. ``load()``, ``connect()``, then ``infer()`` as often as needed.

    ``infer`` and ``generate`` may be called from several threads at once: the device's own work
    (tokenizing, the front half, encoding) runs one call at a time, the round trips overlap.
    """

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
        self._metadata: tuple[tuple[str, str], ...] = ()  # auth + fingerprints, settled once by connect()
        # Hugging Face's fast tokenizers refuse concurrent use, and the device's cores are better spent on one
        # front half at a time than on several interleaved.
        self._device_lock = threading.Lock()
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
        self.catalog = CodecCatalog.for_model(model.fingerprint, model.hidden_size, vocab_size=model.vocab_size)

    def connect(self) -> None:
        """Open the channel, fetch the server's info and settle model, split and codec with it."""
        if self.model is None:
            self.load()
        assert self.model is not None and self.catalog is not None
        security = self.config.security
        try:
            self._auth = security.metadata()
            options = balanced_channel_options(
                self.config.max_message_bytes, self.config.max_attempts, self.config.reconnect_backoff_max_s
            )
            fleet_name = fleet_server_name(self.config.server)
            if security.tls and fleet_name and not security.tls_server_name:
                options.append(("grpc.ssl_target_name_override", fleet_name))
            self._channel = security.open_channel(cloud_target(self.config.server), options)
        except (CredentialsError, ValueError) as exc:
            raise EdgeError(str(exc)) from None
        self._stub = pb_grpc.SplitInferenceStub(self._channel)
        try:
            info = self._stub.GetServerInfo(
                pb.ServerInfoRequest(), timeout=self.config.timeout_s, wait_for_ready=True, metadata=self._auth
            )
        except grpc.RpcError as exc:
            self.close()
            raise EdgeError(
                f"cannot reach splitwire-cloud at {self.config.server}: {self._explain(exc)}", exc.code().name
            ) from None
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
        self.codec.warm_up()
        self._split_model.with_front_adapter(self.codec.front_adapter)  # merged now, not in the first request
        codec_fingerprint = self.codec.fingerprint()  # hashes a learned codec's parameters: once, not per call
        if remote_codecs[codec_name].fingerprint != codec_fingerprint:
            raise EdgeError(
                f"codec {codec_name} fingerprint mismatch: server has {remote_codecs[codec_name].fingerprint}, "
                f"this edge has {codec_fingerprint}. Use the same splitwire release on both sides."
            )
        self._metadata = (
            *self._auth,
            (MODEL_FINGERPRINT_KEY, self.model.fingerprint),
            (CODEC_FINGERPRINT_KEY, codec_fingerprint),
        )
        log.info("connected to %s: %s split %d codec %s", self.config.server, self.model.name, split, codec_name)

    def subscribe_connectivity(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        """Call ``callback`` with the channel's state now and at every change (READY while any replica is)."""
        assert self._channel is not None, "connect() first"
        self._channel.subscribe(callback, try_to_connect=False)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def prepare(self, text: str) -> tuple[pb.InferRequest, int, dict[str, float]]:
        """Tokenize, run the front half and encode: the request, the input's token count, stage times (ms)."""
        assert self.model and self._split_model and self.cut and self.codec
        timings: dict[str, float] = {}
        with self._device_lock:
            t0 = time.perf_counter()
            input_ids, token_mask = self.model.tokenize([text])
            t1 = time.perf_counter()
            hidden = codec_input(self._split_model, self.cut, self.codec, input_ids, token_mask)[0]
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
        sent = time.perf_counter()
        try:
            response = self._stub.Infer(request, timeout=self.config.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            metrics.REQUESTS.labels(exc.code().name).inc()
            raise EdgeError(f"server refused the request: {self._explain(exc)}", exc.code().name) from None
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
            response_bytes=response.ByteSize(),
            timings_ms=timings,
        )
        if response.HasField("embedding"):
            result.embedding = np.asarray(response.embedding.values, dtype=np.float32)
        elif response.HasField("next_token"):
            result.next_token_id = response.next_token.id
            with self._device_lock:
                result.next_token = self.model.tokenizer.decode([response.next_token.id])
        self._observe(result)
        return result

    # -- generation -----------------------------------------------------------------------------

    def prompt_ids(self, prompt: str, chat: bool = False) -> list[int]:
        """Token ids of ``prompt``; with ``chat``, of a user turn in the tokenizer's chat template."""
        assert self.model is not None
        tokenizer = self.model.tokenizer
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise EdgeError(f"{self.model.name}'s tokenizer has no chat template; leave out --chat")
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, Mapping):  # transformers 5 answers with a BatchEncoding
                ids = ids["input_ids"]
            ids = [int(i) for i in ids]
        else:
            input_ids, _ = self.model.tokenize([prompt])
            ids = input_ids[0].tolist()
        if not ids:
            raise EdgeError("the prompt is empty: generation needs at least one token")
        return ids

    def stop_tokens(self) -> frozenset[int]:
        """The model's end-of-sequence token(s): where generation stops unless told otherwise."""
        assert self.model is not None
        hf = self.model.hf_model
        found: set[int] = set()
        for source in (getattr(hf, "generation_config", None), hf.config):
            eos = getattr(source, "eos_token_id", None)
            if eos is not None:
                found.update([eos] if isinstance(eos, int) else eos)
        return frozenset(int(token) for token in found)

    def generate(
        self,
        prompt: str,
        params: SamplingParams,
        *,
        chat: bool = False,
        on_token: Callable[[int, str], None] | None = None,
    ) -> GenerationResult:
        """Generate after ``prompt`` through the split, the server choosing each token.

        ``on_token(token_id, text)`` is called as each token arrives, with the text it adds (possibly
        empty while a multi-byte character is incomplete). Needs ``params.max_new_tokens`` >= 1.
        """
        if self._stub is None:
            self.connect()
        assert self._stub and self.model and self._split_model and self.codec and self.cut
        if self.model.family is not ModelFamily.DECODER:
            raise EdgeError(f"{self.model.name} is an encoder: generate needs a decoder model (use run)")
        if params.max_new_tokens < 1:
            raise EdgeError("max_new_tokens must be at least 1")
        started = time.perf_counter()
        with self._device_lock:
            ids = self.prompt_ids(prompt, chat)
        tokenized = time.perf_counter()
        front = self._split_model.with_front_adapter(self.codec.front_adapter)
        cache = front.new_cache(self.cut.front)
        carry = self.codec.new_carry()  # the server's session keeps its own, payload by payload
        tokenizer = self.model.tokenizer
        front_s = encode_s = 0.0
        payload_bytes = message_bytes = tokens_sent = 0
        tokens: list[int] = []
        logprobs: list[float] = []
        arrivals: list[float] = []
        text = ""
        finish = ""

        def request_for(new_ids: list[int]) -> pb.InferRequest:
            nonlocal front_s, encode_s, payload_bytes, message_bytes, tokens_sent
            with self._device_lock:
                t0 = time.perf_counter()
                step_ids = torch.tensor([new_ids], dtype=torch.long)
                if self.codec.codes_token_ids:  # nothing runs on the edge: the ids go as they are
                    hidden = step_ids[0, :, None].float()
                else:
                    with torch.inference_mode():
                        hidden = front.front_step(cache, step_ids)[0]
                t1 = time.perf_counter()
                # Every token: the server's cache needs each position.
                payload = self.codec.encode_payload(hidden, carry=carry)
            front_s, encode_s = front_s + t1 - t0, encode_s + time.perf_counter() - t1
            request = pb.InferRequest(payload=payload)
            payload_bytes += len(payload)
            tokens_sent += len(new_ids)
            metrics.PAYLOAD_BYTES.labels(self.model.name, self.codec.name).observe(len(payload))
            return request

        outbox: queue.Queue[pb.InferRequest | None] = queue.Queue()
        call = self._stub.InferStream(iter(outbox.get, None), metadata=self._metadata)
        watchdog = _StepWatchdog(call, self.config.timeout_s)
        try:
            opening = request_for(ids)
            opening.model, opening.split, opening.codec = self.model.name, self.cut.to_wire(), self.codec.name
            opening.generation.CopyFrom(
                pb.GenerationOptions(
                    temperature=params.temperature,
                    top_p=params.top_p,
                    seed=params.seed,
                    max_new_tokens=params.max_new_tokens,
                    stop_token_ids=sorted(params.stop_tokens),
                )
            )
            self._check_size(opening)
            message_bytes += opening.ByteSize()
            outbox.put(opening)
            while True:
                response = watchdog.next(call)
                if response is None or not response.HasField("next_token"):
                    raise EdgeError("the server ended the generation without a final token; see its log")
                arrivals.append(time.perf_counter())
                token = response.next_token.id
                tokens.append(token)
                logprobs.append(response.next_token.logprob)
                with self._device_lock:
                    decoded = tokenizer.decode(tokens, skip_special_tokens=True)
                if not decoded.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    added, text = decoded[len(text) :], decoded
                    if on_token is not None:
                        on_token(token, added)
                if response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    finish = _FINISH_NAMES.get(response.finish_reason, "unknown")
                    break
                step = request_for([token])
                message_bytes += step.ByteSize()
                outbox.put(step)
            outbox.put(None)  # half-close; the server has ended its side
            while watchdog.next(call) is not None:
                pass
        except grpc.RpcError as exc:
            metrics.REQUESTS.labels(exc.code().name).inc()
            if watchdog.fired:
                raise EdgeError(
                    f"no token from the server within {self.config.timeout_s:g} s (--timeout); generation stopped"
                ) from None
            raise EdgeError(f"server refused the generation: {self._explain(exc)}", exc.code().name) from None
        finally:
            watchdog.stop()
            outbox.put(None)
            call.cancel()  # no-op once the call has ended
        metrics.REQUESTS.labels("OK").inc()
        done = time.perf_counter()
        with self._device_lock:
            text = tokenizer.decode(tokens, skip_special_tokens=True)
        inter_token = [1000 * (b - a) for a, b in itertools.pairwise(arrivals)]
        labels = (self.model.name, self.codec.name)
        metrics.TIME_TO_FIRST_TOKEN.labels(*labels).observe(arrivals[0] - started)
        for gap in inter_token:
            metrics.INTER_TOKEN_LATENCY.labels(*labels).observe(gap / 1000)
        timings = {
            "tokenize": 1000 * (tokenized - started),
            "ttft": 1000 * (arrivals[0] - started),
            "front": 1000 * front_s,
            "encode": 1000 * encode_s,
            "total": 1000 * (done - started),
        }
        if inter_token:
            timings["inter_token_median"] = statistics.median(inter_token)
            timings["per_token_mean"] = statistics.fmean(inter_token)
        result = GenerationResult(
            prompt=prompt,
            codec=self.codec.name,
            split=self.cut.split,
            prompt_tokens=len(ids),
            token_ids=tokens,
            logprobs=logprobs,
            text=text,
            finish_reason=finish,
            payload_bytes=payload_bytes,
            message_bytes=message_bytes,
            tokens_sent=tokens_sent,
            timings_ms=timings,
            inter_token_ms=inter_token,
        )
        metrics.BITS_PER_TOKEN.labels(*labels).observe(result.bits_per_token)
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
