"""Transport security of the teacher's gRPC port, shared by the teacher and the trainer's client.

- TLS: PEM files named in the config (server: certificate chain + key, optionally a client CA,
  which makes client certificates mandatory = mutual TLS; client: the CA that signed the server's
  certificate, optionally its own certificate + key).
- Bearer token: read from the environment variable a config field names (never from YAML),
  sent as ``authorization: Bearer <token>`` metadata and checked by ``BearerTokenInterceptor``
  on the services it protects. Other services (health, reflection) stay open, so orchestrators
  and grpcurl's reflection-based health check need no token.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import grpc

logger = logging.getLogger(__name__)

AUTH_METADATA_KEY = "authorization"
# Upper case only: a token pasted into the config instead (``openssl rand -hex 32``) does not pass.
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
_PEM_MARKER = b"-----BEGIN "
# One factory per (request streaming, response streaming): a refusal has the kind of the real handler.
_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def check_tls_config(config: object, switch: str, dependents: tuple[str, ...]) -> None:
    """Validate a config's security fields (named bare in errors, as validators do): ``tls_cert_file``
    and ``tls_key_file`` go together, each field of ``dependents`` needs ``switch`` (the field that
    turns TLS on), every ``tls_*_file`` set is a readable PEM file, and ``auth_token_env`` is the
    name of an environment variable (the token itself never goes in the config)."""
    cert, key = config.tls_cert_file, config.tls_key_file
    if (cert is None) != (key is None):
        given, missing = ("tls_cert_file", "tls_key_file") if cert is not None else ("tls_key_file", "tls_cert_file")
        raise ValueError(f"{given} is set but {missing} is not: a certificate needs its key")
    for name in dependents:
        if getattr(config, name) is not None and getattr(config, switch) is None:
            raise ValueError(f"{name} needs {switch} (TLS)")
    for name, value in vars(config).items():
        if name.startswith("tls_") and name.endswith("_file") and value is not None:
            read_pem(value, name)
    if config.auth_token_env is not None and not _ENV_NAME.fullmatch(config.auth_token_env):
        raise ValueError(
            "auth_token_env must name the environment variable that holds the token "
            "(upper case, e.g. TEACHER_AUTH_TOKEN); never put the token itself in the config"
        )


def read_pem(path: str, field: str) -> bytes:
    """The bytes of a PEM file; ``ValueError`` naming ``field`` when missing, unreadable or not PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{field}: cannot read {path!r} ({e.strerror})") from None
    if _PEM_MARKER not in data:
        raise ValueError(f"{field}: {path!r} is not a PEM file (no '-----BEGIN' line)")
    return data


def read_token(env_var: str, field: str) -> str:
    """The bearer token in ``env_var``; refuses an unset, empty or malformed one (never echoing it)."""
    token = os.environ.get(env_var, "")
    if not token:
        raise ValueError(
            f"{field} names the environment variable {env_var}, which is unset or empty: "
            f"set {env_var} to the bearer token (deploy/.env) or unset {field}"
        )
    if not (token.isascii() and token.isprintable()) or " " in token:
        raise ValueError(f"the token in {env_var} ({field}) must be printable ASCII without spaces")
    return token


def server_credentials(cert_file: str, key_file: str, client_ca_file: str | None) -> grpc.ServerCredentials:
    """TLS for a server port; with ``client_ca_file`` every client must present a certificate it signed."""
    pair = (read_pem(key_file, "server.tls_key_file"), read_pem(cert_file, "server.tls_cert_file"))
    client_ca = read_pem(client_ca_file, "server.tls_client_ca_file") if client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def channel_credentials(
    ca_file: str, cert_file: str | None, key_file: str | None, token: str | None, section: str
) -> grpc.ChannelCredentials:
    """TLS to a server whose certificate ``ca_file`` signed, with an optional client certificate
    (mutual TLS) and an optional bearer token on every call. gRPC sends call credentials only over
    TLS, so a token can never leave in clear text. ``section`` prefixes the field names in errors."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca_file, f"{section}.tls_ca_file"),
        private_key=read_pem(key_file, f"{section}.tls_key_file") if key_file else None,
        certificate_chain=read_pem(cert_file, f"{section}.tls_cert_file") if cert_file else None,
    )
    if token is None:
        return credentials
    return grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for calls to ``services`` without ``authorization: Bearer <token>``.

    Calls to other services pass untouched. A refused call never reaches the servicer, and its
    request is not even parsed.
    """

    def __init__(self, token: str, services: Iterable[str]):
        self._token = token.encode()
        self._prefixes = tuple(f"/{service}/" for service in services)

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefixes):
            return handler
        problem = self._problem(handler_call_details.invocation_metadata or ())
        if problem is None:
            return handler

        async def refuse(_request, context: grpc.aio.ServicerContext) -> None:
            logger.warning("refused %s from %s: %s", method, context.peer(), problem)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        return _HANDLER_FACTORIES[handler.request_streaming, handler.response_streaming](refuse)

    def _problem(self, metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
        """What is wrong with the call's credentials, in words that never repeat the token; None if fine."""
        values = [value for key, value in metadata if key == AUTH_METADATA_KEY]
        if not values:
            return f"missing '{AUTH_METADATA_KEY}: Bearer <token>' metadata: this teacher requires a bearer token"
        scheme, _, token = str(values[0]).partition(" ")
        if len(values) > 1 or scheme.lower() != "bearer" or not token.strip():
            return f"the '{AUTH_METADATA_KEY}' metadata must be exactly one 'Bearer <token>'"
        if not hmac.compare_digest(token.strip().encode(), self._token):
            return f"the bearer token in the '{AUTH_METADATA_KEY}' metadata is not valid"
        return None
