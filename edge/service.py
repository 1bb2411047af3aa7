"""``splitwire-edge serve``: the edge agent as a long-running service that local applications call.

::

    local app --HTTP/JSON (loopback)--> EdgeService --front half + codec--> gRPC, round robin --> replica 1
                                                                                               --> replica 2 ...

One model is loaded at start; the connection to the cloud is settled in the background, retried with
exponential backoff (and jitter, so a fleet of devices does not reconnect in step) until a replica
answers. From then on gRPC keeps a connection to every replica and reconnects to those that drop. The
API answers ``503`` until the first connection is made.

Routes::

    POST /v1/infer     {"texts": ["...", ...]}                  -> {"results": [EdgeResult.to_json(), ...]}
    POST /v1/generate  {"prompt": "...", "max_new_tokens": 32,  -> GenerationResult.to_json()
                        "temperature": 0, "top_p": 1, "seed": 0, "chat": false}
    GET  /healthz      200 once connected to the cloud, 503 before (with the last connection error)

Cloud errors map to HTTP statuses by their gRPC code (:data:`_HTTP_STATUS`), and the JSON body names it.
The Prometheus ``/metrics`` endpoint listens on its own address, so the API can stay on loopback while a
scraper reaches the metrics.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import grpc
from prometheus_client import start_http_server
from splitwire.edge import metrics
from splitwire.edge.agent import EdgeAgent, EdgeConfig, EdgeError
from splitwire.split.sampling import SamplingParams

log = logging.getLogger(__name__)

DEFAULT_API_PORT = 8470
IDLE_TIMEOUT_S = 5.0  # seconds a local connection may sit idle (or a body trickle in) before it is closed

# gRPC status of a refused call -> the HTTP status the local caller sees.
_HTTP_STATUS = {
    "INVALID_ARGUMENT": HTTPStatus.BAD_REQUEST,
    "OUT_OF_RANGE": HTTPStatus.BAD_REQUEST,
    "FAILED_PRECONDITION": HTTPStatus.BAD_REQUEST,
    "NOT_FOUND": HTTPStatus.BAD_REQUEST,
    "RESOURCE_EXHAUSTED": HTTPStatus.TOO_MANY_REQUESTS,
    "DEADLINE_EXCEEDED": HTTPStatus.GATEWAY_TIMEOUT,
    "UNAVAILABLE": HTTPStatus.SERVICE_UNAVAILABLE,
}


@dataclass(frozen=True)
class ServiceConfig:
    edge: EdgeConfig
    host: str = "127.0.0.1"  # the local API; loopback so only this device's applications reach it
    port: int = DEFAULT_API_PORT  # 0 picks a free port
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # None: no /metrics; 0 picks a free port
    connect_backoff_initial_s: float = 0.5
    connect_backoff_max_s: float = 30.0
    max_texts: int = 64  # texts per /v1/infer call
    max_body_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not 0 < self.connect_backoff_initial_s <= self.connect_backoff_max_s:
            raise ValueError("the connect backoff must satisfy 0 < initial <= max")
        if self.max_texts < 1 or self.max_body_bytes < 1:
            raise ValueError("max_texts and max_body_bytes must be at least 1")


class ApiError(Exception):
    """An answer other than 200: its HTTP status, a message and, for cloud errors, the gRPC code."""

    def __init__(self, status: HTTPStatus, message: str, grpc_code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.grpc_code = status, grpc_code


def backoff_delays(initial_s: float, max_s: float, rng: random.Random) -> Iterator[float]:
    """Endless delays between connection attempts: doubling from ``initial_s`` up to ``max_s``, each
    drawn uniformly from its upper half ("equal jitter")."""
    ceiling = initial_s
    while True:
        yield rng.uniform(ceiling / 2, ceiling)
        ceiling = min(max_s, ceiling * 2)


class EdgeService:
    """The model, the agent, the HTTP server and the background connector. ``start()``, then ``stop()``."""

    def __init__(self, config: ServiceConfig, agent: EdgeAgent | None = None) -> None:
        self.config = config
        self.agent = agent or EdgeAgent(config.edge)
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self.last_connect_error: str | None = None
        self._http: ThreadingHTTPServer | None = None
        self._metrics_httpd = None
        self.metrics_port: int | None = None

    @property
    def port(self) -> int:
        assert self._http is not None
        return int(self._http.server_address[1])

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        """Load the model, listen, and start connecting to the cloud in the background."""
        if self.agent.model is None:
            self.agent.load()
        if self.config.metrics_port is not None:
            self._metrics_httpd, _ = start_http_server(self.config.metrics_port, addr=self.config.metrics_host)
            self.metrics_port = int(self._metrics_httpd.server_address[1])
        handler = type("Handler", (_Handler,), {"service": self})
        self._http = ThreadingHTTPServer((self.config.host, self.config.port), handler)
        # stop() waits for calls in flight (bounded by the cloud timeout) and for idle keep-alive
        # connections to time out (IDLE_TIMEOUT_S), so a local caller never sees its answer cut off.
        self._http.daemon_threads = False
        self._http.block_on_close = True
        for target, name in ((self._http.serve_forever, "edge-http"), (self._connect, "edge-connect")):
            threading.Thread(target=target, name=name, daemon=True).start()
        log.info("edge API on http://%s:%d", self.config.host, self.port)

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def stop(self) -> None:
        """Stop accepting calls, let those in flight finish, then close the channel to the cloud."""
        self._stopping.set()
        for server in (self._http, self._metrics_httpd):
            if server is not None:
                server.shutdown()
                server.server_close()
        self.agent.close()

    def _connect(self) -> None:
        delays = backoff_delays(
            self.config.connect_backoff_initial_s, self.config.connect_backoff_max_s, random.Random()
        )
        while not self._stopping.is_set():
            try:
                self.agent.connect()
            except EdgeError as exc:
                self.agent.close()  # a refusal after the channel opened (a fingerprint mismatch) must not leak it
                self.last_connect_error = str(exc)
                metrics.CONNECT_ATTEMPTS.labels("error").inc()
                delay = next(delays)
                log.warning("%s; retrying in %.1f s", exc, delay)
                self._stopping.wait(delay)
                continue
            metrics.CONNECT_ATTEMPTS.labels("ok").inc()
            self.agent.subscribe_connectivity(self._on_connectivity)
            self.last_connect_error = None
            self._connected.set()
            return

    @staticmethod
    def _on_connectivity(state: grpc.ChannelConnectivity) -> None:
        metrics.CLOUD_READY.set(1 if state is grpc.ChannelConnectivity.READY else 0)

    # -- the API's work, called by the handler -------------------------------------------------

    def health(self) -> tuple[HTTPStatus, dict[str, object]]:
        if not self.connected:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "connecting", "error": self.last_connect_error}
        agent = self.agent
        assert agent.model and agent.codec and agent.cut
        return HTTPStatus.OK, {
            "status": "ok",
            "server": self.config.edge.server,
            "model": agent.model.name,
            "split": agent.cut.split,
            "codec": agent.codec.name,
        }

    def infer(self, body: dict[str, object]) -> dict[str, object]:
        texts = body.get("texts")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise ApiError(HTTPStatus.BAD_REQUEST, '"texts" must be a non-empty list of non-empty strings')
        if len(texts) > self.config.max_texts:
            raise ApiError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{len(texts)} texts; at most {self.config.max_texts} per call"
            )
        self._require_connection()
        return {"results": [self._call(self.agent.infer, text).to_json() for text in texts]}

    def generate(self, body: dict[str, object]) -> dict[str, object]:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(HTTPStatus.BAD_REQUEST, '"prompt" must be a non-empty string')
        self._require_connection()
        try:
            params = SamplingParams(
                max_new_tokens=int(body.get("max_new_tokens", 32)),
                temperature=float(body.get("temperature", 0.0)),
                top_p=float(body.get("top_p", 1.0)),
                seed=int(body.get("seed", 0)),
                stop_tokens=self.agent.stop_tokens(),
            )
        except (TypeError, ValueError) as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"bad generation options: {exc}") from None
        return self._call(self.agent.generate, prompt, params, chat=bool(body.get("chat", False))).to_json()

    def _require_connection(self) -> None:
        if not self.connected:
            detail = f": {self.last_connect_error}" if self.last_connect_error else ""
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, f"not connected to splitwire-cloud yet{detail}")

    @staticmethod
    def _call(method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except EdgeError as exc:
            status = _HTTP_STATUS.get(exc.grpc_code or "", HTTPStatus.BAD_GATEWAY)
            if exc.grpc_code is None:  # refused on the device: the input itself is at fault
                status = HTTPStatus.BAD_REQUEST
            raise ApiError(status, str(exc), exc.grpc_code) from None


class _Handler(BaseHTTPRequestHandler):
    service: EdgeService  # set on the subclass EdgeService.start() makes
    protocol_version = "HTTP/1.1"  # keep-alive: a local client reuses its connection
    timeout = IDLE_TIMEOUT_S
    server_version = "splitwire-edge"

    _ROUTES: ClassVar[dict[str, str]] = {"/v1/infer": "infer", "/v1/generate": "generate"}

    def do_GET(self) -> None:
        if self.path != "/healthz":
            self._answer_error(ApiError(HTTPStatus.NOT_FOUND, f"no route GET {self.path}; try /healthz"))
            return
        status, body = self.service.health()
        self._answer(status, body)

    def do_POST(self) -> None:
        route = self._ROUTES.get(self.path)
        try:
            if route is None:
                raise ApiError(HTTPStatus.NOT_FOUND, f"no route POST {self.path}; try {', '.join(self._ROUTES)}")
            body = self._read_json()
            answer = getattr(self.service, route)(body)
        except ApiError as exc:
            self._answer_error(exc)
            return
        except Exception:  # a bug must not kill the service: answer 500 and keep serving
            log.exception("unexpected error serving %s", self.path)
            self._answer_error(ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the agent's log"))
            return
        self._answer(HTTPStatus.OK, answer)

    def _read_json(self) -> dict[str, object]:
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "a JSON body with Content-Length is required")
        length = int(length_text)
        if length > self.service.config.max_body_bytes:
            self.close_connection = True  # the unread body must not be taken for the next request
            raise ApiError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body of {length} bytes; at most {self.service.config.max_body_bytes}",
            )
        try:
            body = json.loads(self.rfile.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        return body

    def _answer_error(self, exc: ApiError) -> None:
        body: dict[str, object] = {"error": str(exc)}
        if exc.grpc_code:
            body["grpc_code"] = exc.grpc_code
        self._answer(exc.status, body)

    def _answer(self, status: HTTPStatus, body: dict[str, object]) -> None:
        data = json.dumps(body).encode("utf-8")
        route = self.path if self.path in (*self._ROUTES, "/healthz") else "other"
        metrics.API_REQUESTS.labels(route, str(status.value)).inc()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.client_address[0], *args)
