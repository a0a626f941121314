"""R4 load and R5 SIGTERM under load, against a running teacher process.

R4: S concurrent streams x N requests, a few in flight per stream: no errors while the positions in
flight stay below ``server.max_queued_positions``; then every stream sends all its requests at once,
far above the limit: only RESOURCE_EXHAUSTED (naming the limit), never a crash; peak RSS of the
server (VmHWM) and per-request latency p50/p99.

R5: streams keep requests in flight, SIGTERM: health NOT_SERVING at once, every admitted request
is answered, later ones get UNAVAILABLE, the process exits 0 within the grace period.
"""

from __future__ import annotations

import asyncio
import random
import re
import signal
import time
import urllib.request
from collections import Counter

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hyperdistill.common.codec import pack_token_ids
from hyperdistill.common.stubs import teacher_pb2 as pb
from hyperdistill.common.stubs import teacher_pb2_grpc as pb_grpc
from hyperdistill.teacher_service.scoring import STREAM_DRAINED

_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


# grpc.aio's client can report this instead of the server's status when the server ends a Score
# stream while the client is still writing (grpc/grpc#36066); the server's own counters say what
# it answered, so a run counts these apart and checks `server_internal_errors` is 0.
CLIENT_MASKED = "INTERNAL: Internal error from Core"


def server_requests(metrics_url: str, status: str) -> float:
    """``teacher_requests_total{status=...}`` from the teacher's /metrics (0 when absent)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    match = re.search(rf'^teacher_requests_total\{{status="{status}"\}} (\S+)$', text, flags=re.M)
    return float(match.group(1)) if match else 0.0


def server_internal_errors(metrics_url: str) -> float:
    """Requests the server itself answered with INTERNAL."""
    return server_requests(metrics_url, "INTERNAL")


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _requests(rng: random.Random, count: int, length: tuple[int, int], vocab: int, prefix: str) -> list:
    return [
        pb.ScoreRequest(
            request_id=f"{prefix}-{i}",
            top_k=20,
            token_ids=pack_token_ids(
                np.array([rng.randrange(vocab) for _ in range(rng.randint(*length))], dtype=np.int32)
            ),
        )
        for i in range(count)
    ]


async def _stream(stub, requests: list, window: int, latencies: list[float], statuses: Counter, timeout: float) -> int:
    """Send ``requests`` keeping at most ``window`` unanswered; returns how many were lost: written
    before the request the server refused (the stream's error names it), yet never answered."""
    call = stub.Score(timeout=timeout)
    sent_at, answered, written = {}, set(), []
    free = asyncio.Semaphore(window)

    async def writer() -> None:
        for request in requests:
            await free.acquire()
            sent_at[request.request_id] = time.perf_counter()
            written.append(request.request_id)
            await call.write(request)
        await call.done_writing()

    task = asyncio.create_task(writer())
    refused, details = None, ""
    try:
        async for chunk in call:
            if chunk.last:
                latencies.append(time.perf_counter() - sent_at[chunk.request_id])
                answered.add(chunk.request_id)
                free.release()
        statuses["OK"] += 1
    except grpc.aio.AioRpcError as e:
        details = e.details() or ""
        statuses[f"{e.code().name}: {details[:200]}"] += 1
        refused = next((rid for rid in written if f"{rid!r}" in details), None)
        if f"{e.code().name}: {details}" == CLIENT_MASKED:
            return 0  # the client lost the server's status and the rest of the stream: not countable
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    if refused is None and STREAM_DRAINED in details:
        return 0  # ended by a drained server, which had answered everything it admitted
    admitted = written[: written.index(refused)] if refused in written else written
    return len(set(admitted) - answered)


async def run_load(
    address: str, pid: int, streams: int = 16, per_stream: int = 100, seed: int = 0, vocab: int = 151936
) -> dict:
    """R4: below the admission limit (window 2 per stream, <= 256 tokens: <= 8,192 positions), then
    far above it (every request of every stream at once, 1-2k tokens each)."""
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(address, options=_OPTIONS) as channel:
        stub = pb_grpc.TeacherServiceStub(channel)
        below_lat, below = [], Counter()
        start = time.perf_counter()
        lost = await asyncio.gather(
            *(
                _stream(stub, _requests(rng, per_stream, (16, 256), vocab, f"s{s}"), 2, below_lat, below, 600)
                for s in range(streams)
            )
        )
        below_seconds = time.perf_counter() - start
        above_lat, above = [], Counter()
        lost_above = await asyncio.gather(
            *(
                _stream(
                    stub, _requests(rng, per_stream, (1024, 2048), vocab, f"a{s}"), per_stream, above_lat, above, 600
                )
                for s in range(streams)
            )
        )
        after = Counter()
        await _stream(stub, _requests(rng, 1, (64, 64), vocab, "after"), 1, [], after, 60)
    return {
        "streams": streams,
        "per_stream": per_stream,
        "below_answered": len(below_lat),
        "below_lost": sum(lost),
        "below_statuses": dict(below),
        "below_seconds": below_seconds,
        "p50_s": float(np.percentile(below_lat, 50)) if below_lat else None,
        "p99_s": float(np.percentile(below_lat, 99)) if below_lat else None,
        "above_statuses": dict(above),
        "above_answered": len(above_lat),
        "above_lost": sum(lost_above),
        "served_after": after == Counter(OK=1),
        "peak_rss_bytes": peak_rss_bytes(pid),
    }


async def run_sigterm_under_load(
    address: str, process, grace: float, streams: int = 4, seed: int = 0, vocab: int = 151936
) -> dict:
    """R5: SIGTERM while ``streams`` streams have requests in flight; ``process`` is the Popen."""
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(address, options=_OPTIONS) as channel:
        stub, health = pb_grpc.TeacherServiceStub(channel), health_pb2_grpc.HealthStub(channel)
        latencies, statuses = [], Counter()
        # <= 4 streams x 3 in flight x 256 tokens: below the admission limit, so only draining refuses.
        tasks = [
            asyncio.create_task(
                _stream(stub, _requests(rng, 40, (128, 256), vocab, f"t{s}"), 3, latencies, statuses, 600)
            )
            for s in range(streams)
        ]
        while len(latencies) < streams:  # every stream has had answers: work is in flight
            await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        not_serving_after = None
        while time.monotonic() - signalled < 5:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError:
                break
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                not_serving_after = time.monotonic() - signalled
                break
            await asyncio.sleep(0.01)
        lost = await asyncio.gather(*tasks)
    exit_code = await asyncio.to_thread(process.wait, grace + 60)
    return {
        "not_serving_after_s": not_serving_after,
        "answered": len(latencies),
        "lost": sum(lost),
        "statuses": dict(statuses),
        "exit_code": exit_code,
        "exit_after_s": time.monotonic() - signalled,
        "grace_s": grace,
    }
