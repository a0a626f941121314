"""Per-stream request handling: validation, admission, concurrent scoring, chunking.

No grpc here: failures are raised as ``RequestError`` subclasses, each naming its gRPC status
code (``status``), which the servicer aborts with and the request counter is labelled by. A
stream's requests are scored concurrently and their chunks interleave; admission
(``Admission``) bounds the positions held across all streams, which also bounds the memory of
results waiting to be sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from hyperdistill.common.codec import bytes_per_position, encode_chunks, unpack_token_ids
from hyperdistill.common.stubs import teacher_pb2 as pb
from hyperdistill.teacher_service import metrics
from hyperdistill.teacher_service.engine import TeacherEngine

logger = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 256
# Room for the request id and protobuf framing on top of the packed token ids.
REQUEST_OVERHEAD_BYTES = 1024
# How the server ends a stream still open once it has drained (see `Admission.close_streams`).
STREAM_DRAINED = (
    "server is draining; every request admitted on this stream was answered, "
    "the unanswered ones were not admitted: retry them elsewhere"
)
# Room for a chunk's scalar fields and request id on top of the packed arrays.
CHUNK_OVERHEAD_BYTES = 512


class RequestError(Exception):
    """A request the service refuses; ``status`` is the name of its `grpc.StatusCode`."""

    status = "INVALID_ARGUMENT"


class InvalidRequest(RequestError):
    status = "INVALID_ARGUMENT"


class QueueFull(RequestError):
    status = "RESOURCE_EXHAUSTED"


class Draining(RequestError):
    status = "UNAVAILABLE"


def max_request_bytes(max_model_len: int) -> int:
    """The largest ScoreRequest accepted: ``max_model_len`` packed int32 ids plus the overhead."""
    return max_model_len * 4 + REQUEST_OVERHEAD_BYTES


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_model_len: int
    max_top_k: int
    logprob_dtype: str
    max_message_bytes: int

    @property
    def max_request_bytes(self) -> int:
        return max_request_bytes(self.max_model_len)

    def chunk_positions(self, top_k: int) -> int:
        """Positions per ScoreChunk so that a chunk stays under ``max_message_bytes``."""
        budget = self.max_message_bytes - CHUNK_OVERHEAD_BYTES
        return max(1, budget // bytes_per_position(top_k, self.logprob_dtype))


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes did not parse as its protobuf message (see `servicer.add_to_server`)."""

    reason: str


def validate(request: pb.ScoreRequest | Malformed, limits: Limits, in_flight: set[str]) -> np.ndarray:
    """Check one request against the limits; returns its token ids int32 [T]."""
    if isinstance(request, Malformed):
        raise InvalidRequest(request.reason)
    rid = request.request_id
    if not rid or len(rid) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(f"request_id: must be 1..{MAX_REQUEST_ID_CHARS} characters, got {len(rid)}")
    if rid in in_flight:
        raise InvalidRequest(f"request_id: {rid!r} is already in flight on this stream")
    if not 1 <= request.top_k <= limits.max_top_k:
        raise InvalidRequest(f"top_k: {request.top_k} is outside [1, {limits.max_top_k}] (request {rid!r})")
    try:
        ids = unpack_token_ids(request.token_ids)
    except ValueError as e:
        raise InvalidRequest(f"{e} (request {rid!r})") from None
    if len(ids) < 2:
        raise InvalidRequest(f"token_ids: {len(ids)} tokens; need at least 2 to score a position (request {rid!r})")
    if len(ids) > limits.max_model_len:
        raise InvalidRequest(
            f"token_ids: {len(ids)} tokens exceeds max_model_len {limits.max_model_len} (request {rid!r})"
        )
    bad = np.flatnonzero((ids < 0) | (ids >= limits.vocab_size))
    if bad.size:
        raise InvalidRequest(
            f"token_ids: id {int(ids[bad[0]])} at index {int(bad[0])} is outside the vocabulary "
            f"[0, {limits.vocab_size}) (request {rid!r}, {bad.size} bad ids)"
        )
    return ids


class Admission:
    """Counts positions admitted across all streams; refuses past ``max_positions``."""

    def __init__(self, max_positions: int):
        self.max_positions = max_positions
        self.positions = 0
        self.requests = 0
        self.draining = False
        self.streams: set[StreamScorer] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def acquire(self, positions: int, request_id: str) -> None:
        if self.draining:
            raise Draining(f"server is draining; request {request_id!r} not admitted, retry elsewhere")
        if self.positions + positions > self.max_positions:
            raise QueueFull(
                f"queue full: {self.positions} positions in flight + {positions} (request {request_id!r}) "
                f"exceeds server.max_queued_positions {self.max_positions}; retry with backoff"
            )
        self.positions += positions
        self.requests += 1
        self._idle.clear()
        metrics.INFLIGHT_POSITIONS.set(self.positions)
        metrics.INFLIGHT_REQUESTS.set(self.requests)

    def release(self, positions: int) -> None:
        self.positions -= positions
        self.requests -= 1
        metrics.INFLIGHT_POSITIONS.set(self.positions)
        metrics.INFLIGHT_REQUESTS.set(self.requests)
        if self.requests == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def close_streams(self) -> None:
        """Once draining with nothing in flight: end every open stream with UNAVAILABLE now,
        rather than leave the server's stop to cut them (the client would then not know which
        of its unanswered requests the server had admitted)."""
        for stream in list(self.streams):
            stream.close(Draining(STREAM_DRAINED))


class StreamScorer:
    """Scores the requests of one Score stream concurrently and yields their chunks.

    The first refused request (or engine failure) stops reading; requests already admitted
    still finish and are sent, then the stream ends with that error. Nothing admitted is lost.
    """

    def __init__(self, engine: TeacherEngine, admission: Admission, limits: Limits):
        self._engine = engine
        self._admission = admission
        self._limits = limits
        self._out: asyncio.Queue = asyncio.Queue()
        self._tasks: dict[str, asyncio.Task] = {}
        self._error: RequestError | None = None
        self._reader: asyncio.Task | None = None

    async def run(self, requests: AsyncIterator[pb.ScoreRequest]) -> AsyncIterator[pb.ScoreChunk]:
        self._reader = asyncio.create_task(self._read(requests))
        self._admission.streams.add(self)
        try:
            while not self._reader.done() or self._tasks or not self._out.empty():
                item = await self._out.get()
                if item is not _WAKE:
                    yield item
            if self._error is not None:
                raise self._error
        finally:
            self._admission.streams.discard(self)
            # Deadline or client cancel: abort every request still in the engine.
            self._reader.cancel()
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(self._reader, *self._tasks.values(), return_exceptions=True)

    def close(self, error: RequestError) -> None:
        """Stop reading; the stream ends with ``error`` (a stream's status, not a request's: not
        counted in the request metrics) once what it admitted is sent. A stream whose client has
        finished writing (its reader is done) is left to end by itself, OK once its answers are
        sent: they may still be queued when the last request releases its admission."""
        if self._reader is None or self._reader.done():
            return
        if self._error is None:
            self._error = error
        self._reader.cancel()
        self._out.put_nowait(_WAKE)

    def _fail(self, error: RequestError) -> None:
        if self._error is None:
            self._error = error
            metrics.REQUESTS.labels(status=error.status).inc()
        if self._reader is not None and asyncio.current_task() is not self._reader:
            self._reader.cancel()

    async def _read(self, requests: AsyncIterator[pb.ScoreRequest]) -> None:
        try:
            async for request in requests:
                ids = validate(request, self._limits, set(self._tasks))
                self._admission.acquire(len(ids) - 1, request.request_id)
                self._tasks[request.request_id] = asyncio.create_task(self._score(request, ids))
        except RequestError as e:
            self._fail(e)
        finally:
            self._out.put_nowait(_WAKE)

    async def _score(self, request: pb.ScoreRequest, ids: np.ndarray) -> None:
        rid, positions, start = request.request_id, len(ids) - 1, time.perf_counter()
        status = "CANCELLED"
        try:
            topk = await self._engine.score(rid, ids, request.top_k, request.priority)
            metrics.ENGINE_LATENCY.observe(time.perf_counter() - start)
            per_chunk = self._limits.chunk_positions(request.top_k)
            for chunk in encode_chunks(rid, topk, self._limits.logprob_dtype, per_chunk):
                metrics.RESPONSE_BYTES.inc(len(chunk.topk_ids) + len(chunk.topk_logprobs) + len(chunk.target_logprobs))
                self._out.put_nowait(chunk)
            status = "OK"
            metrics.REQUEST_LATENCY.observe(time.perf_counter() - start)
        except Exception as e:  # an engine fault fails this stream, never the server
            status = "INTERNAL"
            metrics.ENGINE_ERRORS.labels(engine=self._engine.info.name).inc()
            logger.exception("engine failed on request %r (%d positions)", rid, positions)
            self._fail(EngineFailure(f"engine failed on request {rid!r}: {type(e).__name__}: {e}"))
        finally:
            del self._tasks[rid]
            self._admission.release(positions)
            metrics.REQUESTS.labels(status=status).inc()
            metrics.POSITIONS.labels(status=status).inc(positions)
            self._out.put_nowait(_WAKE)


class EngineFailure(RequestError):
    status = "INTERNAL"


_WAKE = object()
