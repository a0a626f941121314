"""Wiring of the teacher service: gRPC server, health, reflection, metrics, engine, drain.

Start-up: the gRPC server starts first with health NOT_SERVING (so orchestrators see it is
alive but loading), the engine loads, then health turns SERVING. SIGTERM/SIGINT: health goes
NOT_SERVING, new work is refused with UNAVAILABLE, in-flight requests get up to
``server.grace_seconds`` to finish, then the server stops and the engine shuts down.
Security, off by default (``common.security``): TLS or mutual TLS on the gRPC port
(``server.tls_*``) and a bearer token on TeacherService calls (``server.auth_token_env``).
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hyperdistill.common.metrics import start_metrics_server
from hyperdistill.common.security import BearerTokenInterceptor, read_token, server_credentials
from hyperdistill.common.stubs import teacher_pb2 as pb
from hyperdistill.common.tokenizer import load_tokenizer, tokenizer_fingerprint
from hyperdistill.teacher_service import metrics
from hyperdistill.teacher_service.config import ServerConfig, TeacherConfig
from hyperdistill.teacher_service.engine_factory import build_engine
from hyperdistill.teacher_service.scoring import Admission, Limits, max_request_bytes
from hyperdistill.teacher_service.servicer import TeacherServicer, add_to_server

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TeacherService"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def serve(config: TeacherConfig) -> None:
    """Run the teacher service until SIGTERM/SIGINT, then drain and return."""
    # Before anything binds: a named but unset token variable must stop the start, not open the port.
    token = read_token(config.server.auth_token_env, "server.auth_token_env") if config.server.auth_token_env else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    admission = Admission(config.server.max_queued_positions)
    servicer = TeacherServicer(admission)
    health_servicer = health.aio.HealthServicer()
    server = grpc.aio.server(
        # Only TeacherService needs the token: health stays open for orchestrators, reflection for
        # grpcurl (its health check resolves the method by reflection); neither serves data.
        interceptors=[BearerTokenInterceptor(token, [SERVICE_NAME])] if token else None,
        options=[
            ("grpc.max_receive_message_length", max_request_bytes(config.engine.max_model_len)),
            ("grpc.max_send_message_length", config.server.max_message_bytes),
        ],
    )
    add_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, _NOT_SERVING)
    port = _bind(server, config.server)
    await server.start()
    metrics_server = start_metrics_server(config.server.metrics_host, config.server.metrics_port)
    logger.info(
        "gRPC on %s:%d, %s (NOT_SERVING while the %s engine loads)",
        config.server.host,
        port,
        _security(config.server),
        config.engine.kind,
    )

    engine = None
    try:
        engine, fingerprint = await _load(config, stop)
        if engine is not None:
            servicer.ready(engine, _limits(config, engine), fingerprint)
            metrics.initialise(engine.info.name)
            for name in ("", SERVICE_NAME):
                await health_servicer.set(name, _SERVING)
            logger.info("SERVING %s (engine %s, tokenizer %s)", engine.info.model, engine.info.name, fingerprint[:12])
            await stop.wait()
        await _drain(config, admission, health_servicer, server)
    finally:
        if engine is not None:
            await engine.shutdown()
        metrics_server.shutdown()
        logger.info("teacher stopped")


def _bind(server: grpc.aio.Server, config: ServerConfig) -> int:
    address = f"{config.host}:{config.port}"
    if config.tls_cert_file is None:
        if config.auth_token_env:
            logger.warning("server.auth_token_env without TLS: bearer tokens cross the network in clear text")
        return server.add_insecure_port(address)
    return server.add_secure_port(
        address, server_credentials(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
    )


def _security(config: ServerConfig) -> str:
    """The port's security, in words, for the start-up log."""
    if config.tls_cert_file is None:
        transport = "plaintext (no TLS)"
    else:
        transport = "mutual TLS (client certificates required)" if config.tls_client_ca_file else "TLS"
    token = f"bearer token from ${config.auth_token_env}" if config.auth_token_env else "no token"
    return f"{transport}, {token}"


async def _load(config: TeacherConfig, stop: asyncio.Event):
    """Load engine and tokenizer fingerprint; returns (None, None) if stopped while loading."""
    load = asyncio.ensure_future(build_engine(config.engine))
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not load.done():
        # Engines load in a worker thread, which cannot be interrupted: let it finish, then
        # release the engine (its worker processes) before exiting.
        logger.info("stopping while the engine loads: shutting it down once loaded")
        await (await load).shutdown()
        return None, None
    stopped.cancel()
    engine = load.result()
    tokenizer = await asyncio.to_thread(load_tokenizer, config.engine.tokenizer or config.engine.model)
    return engine, tokenizer_fingerprint(tokenizer)


def _limits(config: TeacherConfig, engine) -> Limits:
    return Limits(
        vocab_size=engine.info.vocab_size,
        max_model_len=engine.info.max_model_len,
        max_top_k=engine.info.max_top_k,
        logprob_dtype=config.server.logprob_dtype,
        max_message_bytes=config.server.max_message_bytes,
    )


async def _drain(config: TeacherConfig, admission: Admission, health_servicer, server: grpc.aio.Server) -> None:
    grace = config.server.grace_seconds
    logger.info("draining: NOT_SERVING, %d requests in flight, grace %.0f s", admission.requests, grace)
    await health_servicer.enter_graceful_shutdown()
    admission.draining = True
    try:
        await asyncio.wait_for(admission.wait_idle(), timeout=grace)
    except TimeoutError:
        logger.warning("grace period over with %d requests in flight; cancelling them", admission.requests)
    else:
        admission.close_streams()
    await server.stop(grace=1.0)
