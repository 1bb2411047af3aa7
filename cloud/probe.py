"""``splitwire-cloud health``: one grpc.health.v1 check, for container health checks and scripts.

Kept apart from the server's modules so that it starts in a fraction of a second: it imports gRPC and
the shared connection settings, not torch or the model code. ``python -m splitwire.cloud.probe`` runs
it without the rest of the ``splitwire-cloud`` command line.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from splitwire.split.security import CLIENT_SECURITY_OPTIONS, CredentialsError, client_security
from splitwire.split.settings import Option, OptionSet
from splitwire.split.transport import DEFAULT_PORT, SERVICE_NAME, channel_options

HEALTH_OPTIONS = OptionSet(
    env_prefix="SPLITWIRE_CLOUD_HEALTH",
    table="health",
    options=(
        Option("--server", str, f"127.0.0.1:{DEFAULT_PORT}", "server to ask", "HOST:PORT"),
        Option("--service", str, SERVICE_NAME, "service name to ask about ('' for the whole server)", "NAME"),
        Option("--timeout", float, 3.0, "seconds to wait for the answer", "SECONDS"),
        *CLIENT_SECURITY_OPTIONS,
    ),
)


def check_health(values: dict[str, object]) -> int:
    """One grpc.health.v1 Check against ``values["server"]``: 0 when SERVING, 1 otherwise."""
    security = client_security(values)
    try:
        channel = security.open_channel(values["server"], channel_options())
    except CredentialsError as exc:
        print(f"splitwire-cloud health: {exc}", file=sys.stderr)
        return 2
    with channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=values["service"]), timeout=values["timeout"]
            )
        except grpc.RpcError as exc:
            print(f"{values['server']}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{values['server']}: {status}")
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


def run(args: argparse.Namespace) -> int:
    """The check from parsed arguments (flags added by ``HEALTH_OPTIONS``): its exit status."""
    try:
        return check_health(HEALTH_OPTIONS.resolve(args))
    except ValueError as exc:
        print(f"splitwire-cloud health: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitwire-cloud health", description="Exit 0 when the server is SERVING.")
    HEALTH_OPTIONS.add_to(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
