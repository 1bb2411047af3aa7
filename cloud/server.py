"""The cloud process: gRPC server (service, health, reflection) + Prometheus endpoint + engine.

Layers: process (cli) -> CloudServer (this) -> servicer (proto <-> domain) -> engine -> model.
Health says NOT_SERVING until the model is loaded and warm, and again while draining. With
``tls_cert``/``tls_key`` the server listens with TLS only (mutual TLS with ``tls_client_ca``); with
``auth_token_file`` every SplitInference call needs the bearer token. Health and reflection need none.
"""

from __future__ import annotations

import asyncio
import logging
import time
from importlib.metadata import PackageNotFoundError, version

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from splitwire.cloud.config import ServerConfig
from splitwire.cloud.engine import InferenceEngine
from splitwire.cloud.interceptors import AuthInterceptor, ErrorMappingInterceptor
from splitwire.cloud.servicer import SplitInferenceServicer
from splitwire.split.security import read_token_file
from splitwire.split.transport import SERVICE_NAME, server_options
from splitwire.v1 import splitwire_pb2 as pb
from splitwire.v1 import splitwire_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# How long no inference call may have arrived before a draining server stops listening. gRPC core
# cancels calls it has received but not yet handed to a handler when a server stops, and the client
# sees CANCELLED, which it does not retry (grpc/grpc#41785). Until callers have moved to other
# replicas (their health checks see NOT_SERVING), the server keeps answering, with a retryable
# UNAVAILABLE.
DRAIN_QUIET_S = 0.25


def splitwire_version() -> str:
    try:
        return version("splitwire")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0+unknown"


class CloudServer:
    """Owns the gRPC server, the metrics endpoint and the engine; ``start()`` then ``stop(grace)``."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine = InferenceEngine(config)
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._metrics_httpd = None
        self.port: int | None = None
        self.health_port: int | None = None
        self.metrics_port: int | None = None

    async def start(self) -> None:
        """Listen, load the model (health NOT_SERVING meanwhile), then report SERVING."""
        config = self.config
        interceptors: list[grpc.aio.ServerInterceptor] = [ErrorMappingInterceptor()]
        if config.auth_token_file is not None:
            interceptors.append(AuthInterceptor(read_token_file(config.auth_token_file)))
            if config.tls is None:
                log.warning("the bearer token travels in plaintext: add --tls-cert and --tls-key off trusted networks")
        tls = config.tls
        credentials = tls.credentials() if tls is not None else None  # read the files before listening
        if config.metrics_port is not None:
            self._metrics_httpd, _ = start_http_server(config.metrics_port, addr=config.host)
            self.metrics_port = self._metrics_httpd.server_address[1]
        server = grpc.aio.server(interceptors=interceptors, options=server_options(config.max_message_bytes))
        pb_grpc.add_SplitInferenceServicer_to_server(SplitInferenceServicer(self.engine, splitwire_version()), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                pb.DESCRIPTOR.services_by_name["SplitInference"].full_name,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{config.host}:{config.port}"
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if config.health_port is not None:
            await self._start_health_server(f"{config.host}:{config.health_port}")
        await server.start()
        self._server = server
        log.info(
            "listening on %s:%d with %s (metrics on %s)",
            config.host,
            self.port,
            "plaintext" if tls is None else "mutual TLS" if tls.client_ca else "TLS",
            self.metrics_port,
        )
        await asyncio.get_running_loop().run_in_executor(None, self.engine.load)
        self.engine.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s", self.engine.model.name if self.engine.model else "?")

    async def _start_health_server(self, address: str) -> None:
        """A plaintext port answering grpc.health.v1 only, from the same health state as the main port.

        Kubernetes' native gRPC probes (and many load balancers' checks) cannot speak TLS; this port
        lets them probe a TLS-only server without exposing anything but the serving status.
        """
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.health_port = server.add_insecure_port(address)
        if self.health_port == 0:
            raise OSError(f"cannot listen on {address} (--health-port)")
        await server.start()
        self._health_server = server

    async def drain(self) -> None:
        """Report NOT_SERVING and refuse new inference work (UNAVAILABLE); in-flight requests go on."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.engine.drain()

    async def stop(self, grace: float | None = None) -> None:
        """Drain (answering UNAVAILABLE) until callers have moved away, stop accepting calls, let in-flight ones
        finish, all within ``grace`` seconds; release everything."""
        grace = self.config.grace_seconds if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self.drain()
        while loop.time() < deadline and time.monotonic() - self.engine.last_call_at < DRAIN_QUIET_S:
            await asyncio.sleep(DRAIN_QUIET_S / 5)
        if self._server is not None:
            await self._server.stop(max(0.0, deadline - loop.time()))
        if self._health_server is not None:  # last, so probes see NOT_SERVING throughout the drain
            await self._health_server.stop(0)
        await self.engine.stop()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
            self._metrics_httpd = None
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)
