"""TLS credentials and bearer tokens, built the same way by the server, the edge agent and the benchmarks.

::

    server: cert + key (PEM)                 -> TLS
            cert + key + client CA           -> mutual TLS: clients must present a certificate the CA signed
    client: CA (verifies the server; the system roots when absent) [+ cert + key for mutual TLS]
    token:  first line of a file             -> "authorization: Bearer <token>" metadata on every call

The token always travels as call metadata, over TLS or plaintext alike, so one code path serves both
(gRPC refuses call credentials on plaintext channels). Over plaintext the token is readable by anyone
on the path: use TLS outside a trusted network.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from splitwire.split.settings import Option

AUTHORIZATION_KEY = "authorization"  # gRPC metadata keys are lower-case
_BEARER = "bearer"


class CredentialsError(ValueError):
    """A certificate, key or token file cannot be used; the message says which and why."""


def read_token_file(path: Path) -> str:
    """The token in ``path``: its first line, stripped. Refuses missing and empty files."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CredentialsError(f"token file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"cannot read token file {path}: {exc}") from None
    lines = text.splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise CredentialsError(f"token file {path} is empty; its first line must hold the token")
    if any(ch.isspace() or not ch.isprintable() for ch in token):
        raise CredentialsError(f"token in {path} contains spaces or control characters; use a plain token")
    return token


def read_pem(path: Path, what: str) -> bytes:
    """The bytes of a PEM file (``what`` names it in errors, e.g. "--tls-cert")."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CredentialsError(f"{what} file {path} does not exist") from None
    except OSError as exc:
        raise CredentialsError(f"cannot read {what} file {path}: {exc}") from None
    if b"-----BEGIN " not in data:
        raise CredentialsError(f"{what} file {path} is not PEM (no '-----BEGIN' line)")
    return data


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``."""
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),)


def presented_token(metadata: object) -> str | None:
    """The bearer token in call metadata (a sequence of key/value pairs), None when there is none."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key != AUTHORIZATION_KEY:
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == _BEARER and token.strip():
            return token.strip()
        return None
    return None


def token_matches(presented: str | None, expected: str) -> bool:
    """Constant-time comparison, so the time taken does not tell how much of a guess was right."""
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


@dataclass(frozen=True)
class ServerTls:
    """The server's certificate and key, and the CA its clients' certificates must chain to (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        pair = (read_pem(self.key, "--tls-key"), read_pem(self.cert, "--tls-cert"))
        client_ca = read_pem(self.client_ca, "--tls-client-ca") if self.client_ca else None
        return grpc.ssl_server_credentials(
            [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
        )


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches the server: plaintext or TLS (mutual when it has a certificate), and a token."""

    tls_ca: Path | None = None  # CA that signed the server's certificate; None: the system's roots
    tls_cert: Path | None = None  # client certificate, for servers that require one (mutual TLS)
    tls_key: Path | None = None
    tls_server_name: str | None = None  # name to verify in the server certificate, when it differs from the host
    auth_token_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise CredentialsError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_server_name and not self.tls:
            raise CredentialsError("--tls-server-name needs TLS: give --tls-ca (or a client certificate) too")

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata for every call: the bearer token when a token file is set. Reads the file."""
        return bearer_metadata(read_token_file(self.auth_token_file)) if self.auth_token_file else ()

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.tls_ca, "--tls-ca") if self.tls_ca else None,
            private_key=read_pem(self.tls_key, "--tls-key") if self.tls_key else None,
            certificate_chain=read_pem(self.tls_cert, "--tls-cert") if self.tls_cert else None,
        )

    def channel_options(self, options: list[tuple[str, int | str]]) -> list[tuple[str, int | str]]:
        if self.tls_server_name:
            return [*options, ("grpc.ssl_target_name_override", self.tls_server_name)]
        return options

    def open_channel(self, target: str, options: list[tuple[str, int | str]]) -> grpc.Channel:
        """A blocking channel to ``target`` (``host:port``), TLS when configured."""
        if self.tls:
            return grpc.secure_channel(target, self.credentials(), options=self.channel_options(options))
        return grpc.insecure_channel(target, options=options)

    def open_aio_channel(self, target: str, options: list[tuple[str, int | str]]) -> grpc.aio.Channel:
        """An asyncio channel to ``target``, TLS when configured."""
        if self.tls:
            return grpc.aio.secure_channel(target, self.credentials(), options=self.channel_options(options))
        return grpc.aio.insecure_channel(target, options=options)


# The client connection flags, shared by splitwire-edge and the splitwire-bench clients.
CLIENT_SECURITY_OPTIONS = (
    Option(
        "--tls-ca",
        Path,
        None,
        "PEM certificate of the CA that signed the server's certificate; connects with TLS",
        "FILE",
    ),
    Option(
        "--tls-cert",
        Path,
        None,
        "PEM client certificate, for servers that require one (mutual TLS); connects with TLS; needs --tls-key",
        "FILE",
    ),
    Option("--tls-key", Path, None, "PEM private key of --tls-cert", "FILE"),
    Option(
        "--tls-server-name",
        str,
        None,
        "name to verify in the server's certificate when it differs from the host in --server",
        "NAME",
    ),
    Option(
        "--auth-token-file",
        Path,
        None,
        "file whose first line is the bearer token the server expects (sent as 'authorization' metadata)",
        "FILE",
    ),
)


def client_security(values: Mapping[str, object]) -> ClientSecurity:
    """A :class:`ClientSecurity` from resolved option values (keys as in :data:`CLIENT_SECURITY_OPTIONS`)."""
    return ClientSecurity(**{option.key: values.get(option.key) for option in CLIENT_SECURITY_OPTIONS})
