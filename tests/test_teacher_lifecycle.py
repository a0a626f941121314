"""Start-up, drain on SIGTERM and stream cancellation of the teacher service."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hyperdistill.common.codec import pack_token_ids
from hyperdistill.common.stubs import teacher_pb2 as pb
from hyperdistill.teacher_service.probe_client import ProbeClient
from tests.conftest import start_teacher
from tests.helpers import assert_matches_reference, random_ids, scrape_metrics

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The deadline of the compose health check (grpcurl -max-time 5): a load that blocked the event loop
# would block it for the whole load (tens of seconds), while on 2 shared cores one check can take
# over 1 s while vLLM's worker starts (CI missed one 1 s deadline).
PROBE_TIMEOUT = 5.0


def _health_statuses_until_serving(address: str, timeout: float, stop_after_not_serving: int = 0) -> list:
    """Every distinct health status seen from the first answer until SERVING (or until the
    `stop_after_not_serving`-th NOT_SERVING). After the first answer a failed check (the
    server not answering within PROBE_TIMEOUT, e.g. while the engine load blocks it) is recorded
    by code."""
    seen: list = []
    not_serving = 0
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT).status
            except grpc.RpcError as e:
                if seen and seen[-1] != e.code():
                    seen.append(e.code())
                time.sleep(0.1)
                continue
            if not seen or seen[-1] != status:
                seen.append(status)
            not_serving += status == NOT_SERVING
            if status == SERVING or not_serving == stop_after_not_serving:
                return seen
            time.sleep(0.1)
    raise TimeoutError(f"not SERVING after {timeout} s; saw {seen}")


def test_loading_then_serving_then_drain_on_sigterm(tmp_path_factory, tiny_models, reference):
    teacher = start_teacher(
        tmp_path_factory,
        "drain",
        tiny_models,
        "engine.kind=vllm",
        "server.logprob_dtype=float32",
        "server.grace_seconds=600",
    )  # generous: 2 shared cores can be slow
    teacher.start()
    try:
        assert _health_statuses_until_serving(teacher.address, timeout=300) == [NOT_SERVING, SERVING]
        sequences = [random_ids(1500, seed=s) for s in range(3)]
        results, during_drain = asyncio.run(_drain_while_scoring(teacher, sequences))
        assert teacher.proc.wait(timeout=120) == 0
    finally:
        teacher.stop()
    assert during_drain["health"] == NOT_SERVING
    assert during_drain["new_stream"] == grpc.StatusCode.UNAVAILABLE
    for ids, topk in zip(sequences, results, strict=True):  # in-flight work finished, complete and right
        assert_matches_reference(topk, reference.logprobs(ids), ids)


def test_sigterm_while_loading_exits_cleanly(tmp_path_factory, tiny_models):
    """Stopped while the engine loads: health stays answered, the engine is released once loaded, exit 0."""
    teacher = start_teacher(tmp_path_factory, "stop-loading", tiny_models, "engine.kind=vllm")
    teacher.start()
    try:
        assert _health_statuses_until_serving(teacher.address, timeout=300, stop_after_not_serving=3) == [NOT_SERVING]
        teacher.proc.send_signal(signal.SIGTERM)
        assert teacher.proc.wait(timeout=300) == 0
    finally:
        teacher.stop()
    log = teacher.log_path.read_text()
    assert (
        "stopping while the engine loads" in log
        and "teacher_service.server: SERVING" not in log
        and "teacher stopped" in log
    )


async def _drain_while_scoring(teacher, sequences):
    async with ProbeClient(teacher.address) as client:
        scoring = asyncio.create_task(client.score(sequences, 5, timeout=300))
        while scrape_metrics(teacher.metrics_url).get(("teacher_inflight_requests", ()), 0) < len(sequences):
            await asyncio.sleep(0.05)
        teacher.proc.send_signal(signal.SIGTERM)
        observed = {}
        while (status := (await client.health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status) != NOT_SERVING:
            await asyncio.sleep(0.05)
        observed["health"] = status
        try:
            await client.score([np.arange(2, dtype=np.int32)], 1, timeout=30)
        except grpc.aio.AioRpcError as e:
            observed["new_stream"] = e.code()
        return await scoring, observed


def test_cancelled_stream_aborts_engine_work(vllm_teacher):
    """A client that cancels mid-request frees its admission and is counted CANCELLED."""
    ids = random_ids(6000, seed=21)
    cancelled = ("teacher_requests_total", (("status", "CANCELLED"),))

    async def run():
        async with ProbeClient(vllm_teacher.address) as client:
            before = scrape_metrics(vllm_teacher.metrics_url).get(cancelled, 0)
            call = client.stub.Score(iter([pb.ScoreRequest(request_id="c", token_ids=pack_token_ids(ids), top_k=20)]))
            while scrape_metrics(vllm_teacher.metrics_url).get(("teacher_inflight_requests", ()), 0) < 1:
                await asyncio.sleep(0.02)
            call.cancel()
            deadline = time.monotonic() + 30
            while scrape_metrics(vllm_teacher.metrics_url).get(cancelled, 0) < before + 1:
                assert time.monotonic() < deadline, "cancelled request was never released"
                await asyncio.sleep(0.05)
            after = scrape_metrics(vllm_teacher.metrics_url)
            assert after[("teacher_inflight_positions", ())] == 0
            # The server is still healthy and answers the next request.
            (topk,) = await client.score([ids[:100]], 3, timeout=60)
            assert topk.num_positions == 99

    asyncio.run(run())
