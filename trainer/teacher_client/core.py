"""The teacher client's loop thread: `StreamCore` and its records, batches (jobs), sequence
attempts (requests), Score streams and teacher addresses (links). Touched on the client's
event-loop thread only."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import random
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, field

import grpc

from hyperdistill.common.codec import TopK, TopKAssembler
from hyperdistill.common.stubs import teacher_pb2 as pb
from hyperdistill.common.stubs import teacher_pb2_grpc as pb_grpc
from hyperdistill.trainer.teacher_client.config import (
    RETRYABLE_CODES,
    TeacherClientConfig,
    TeacherClientStats,
    TeacherError,
    TeacherMismatchError,
    TeacherRequestError,
    TeacherUnavailableError,
)

logger = logging.getLogger(__name__)

# Codes with which a teacher refuses this client's credentials: no retry helps, so `start` fails at once.
AUTH_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
# The server caps request ids at 256 characters; the key's part of ours is capped below that.
MAX_KEY_CHARS = 160


@dataclass(eq=False)
class Job:
    """One submitted batch: its future and one ``Request`` per sequence."""

    key: Hashable
    serial: int
    priority: int
    future: concurrent.futures.Future
    requests: list[Request] = field(default_factory=list)
    results: list[TopK | None] = field(default_factory=list)
    remaining: int = 0
    done: bool = False


@dataclass(eq=False)
class Request:
    """One sequence of a job and the state of its current attempt (loop thread only)."""

    job: Job
    index: int
    token_ids: bytes
    """int32 little-endian [T], packed once so every attempt sends the same sequence."""
    num_positions: int
    attempts: int = 0
    rid: str = ""
    stream: Stream | None = None
    assembler: TopKAssembler | None = None
    timer: asyncio.TimerHandle | None = None
    retry_handle: asyncio.TimerHandle | None = None
    retry_deadline: float | None = None
    last_status: str = "none"

    def cancel_timers(self) -> None:
        for handle in (self.timer, self.retry_handle):
            if handle is not None:
                handle.cancel()
        self.timer = self.retry_handle = None


@dataclass(eq=False)
class Stream:
    """One Score call: the queue feeding its request iterator and its unanswered requests."""

    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    pending: dict[str, Request] = field(default_factory=dict)
    task: asyncio.Task | None = None
    failure: tuple[grpc.StatusCode, str] | None = None


@dataclass(eq=False)
class Link:
    """One teacher address: its channel, current stream and health."""

    address: str
    channel: grpc.aio.Channel
    stub: pb_grpc.TeacherServiceStub
    stream: Stream | None = None
    verified: bool = False
    failures: int = 0
    down_until: float = 0.0


async def request_iterator(queue: asyncio.Queue) -> AsyncIterator[pb.ScoreRequest]:
    """A stream's request iterator; ``None`` ends it (so grpc's writer task exits)."""
    while (request := await queue.get()) is not None:
        yield request


class StreamCore:
    """The teacher client's loop thread: teachers' channels and Score streams, the jobs in flight,
    their requests' deadlines and retries. Every method runs on ``loop``'s thread; `TeacherClient`
    hands work over with ``loop.call_soon_threadsafe`` / ``asyncio.run_coroutine_threadsafe``."""

    def __init__(
        self,
        config: TeacherClientConfig,
        loop: asyncio.AbstractEventLoop,
        stats: TeacherClientStats,
        expected: tuple[int, str],
        credentials: grpc.ChannelCredentials | None,
    ):
        self.config = config
        self.loop = loop
        self.stats = stats
        """The client's counters, written here and read by `TeacherClient.stats` as a snapshot."""
        self.infos: dict[str, pb.TeacherInfo] = {}
        """GetInfo of each teacher that answered, by address."""
        self._expected = expected
        """The student's (vocab size, tokenizer fingerprint) every teacher must match."""
        self._credentials = credentials
        # Own RNG for jitter: the trainer's global `random` state is checkpointed and must not move.
        self._rng = random.Random()
        self._links: list[Link] = []
        self._jobs: set[Job] = set()
        self._next_link = 0
        self._closing = False

    # ----- loop thread: start-up and shutdown -----

    async def connect_all(self) -> None:
        """Create a channel per address and collect every teacher's checked GetInfo."""
        self._links = [self._make_link(address) for address in self.config.addresses]
        outcomes = await asyncio.gather(*(self._await_info(link) for link in self._links), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, TeacherUnavailableError):
                raise outcome
        if all(isinstance(outcome, BaseException) for outcome in outcomes):
            raise TeacherUnavailableError("no teacher answered: " + "; ".join(str(o) for o in outcomes))
        now = self.loop.time()
        for link, outcome in zip(self._links, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                logger.warning("%s; continuing without it and retrying it later", outcome)
                self._mark_down(link, now)
            else:
                link.verified = True
                self.infos[link.address] = outcome
                logger.info(
                    "teacher at %s: %s engine, model %s, vocab %d, max_model_len %d, max_top_k %d",
                    link.address,
                    outcome.engine,
                    outcome.model,
                    outcome.vocab_size,
                    outcome.max_model_len,
                    outcome.max_top_k,
                )

    def _make_link(self, address: str) -> Link:
        initial_ms = int(self.config.backoff_initial_seconds * 1000)
        # grpc's own reconnect backoff (default max 120 s) would keep a restarted teacher's
        # channel failing long after it is back; align it with ours.
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", initial_ms),
            ("grpc.max_reconnect_backoff_ms", max(initial_ms, int(self.config.backoff_max_seconds * 1000))),
        ]
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(address, options=options)
        else:
            if self.config.tls_server_name:
                options.append(("grpc.ssl_target_name_override", self.config.tls_server_name))
            channel = grpc.aio.secure_channel(address, self._credentials, options=options)
        return Link(address=address, channel=channel, stub=pb_grpc.TeacherServiceStub(channel))

    async def _await_info(self, link: Link) -> pb.TeacherInfo:
        """GetInfo with backoff until it answers (loading teachers say UNAVAILABLE) or time is up."""
        timeout = self.config.connect_timeout_seconds
        deadline = self.loop.time() + timeout
        delay, last = self.config.backoff_initial_seconds, "no answer"
        while (remaining := deadline - self.loop.time()) > 0:
            try:
                info = await link.stub.GetInfo(pb.GetInfoRequest(), timeout=remaining, wait_for_ready=True)
            except grpc.aio.AioRpcError as e:
                last = f"{e.code().name}: {e.details()}"
                if e.code() in AUTH_CODES:
                    raise TeacherRequestError(
                        f"teacher at {link.address} refused this client ({last}): check teacher.auth_token_env "
                        "and the token it names against the teacher's server.auth_token_env"
                    ) from None
                if e.code() not in RETRYABLE_CODES:
                    break
            else:
                self._check_info(link.address, info)
                return info
            await asyncio.sleep(min(delay * self._rng.uniform(0.5, 1.0), max(0.0, deadline - self.loop.time())))
            delay = min(2 * delay, self.config.backoff_max_seconds)
        raise TeacherUnavailableError(
            f"teacher at {link.address} did not answer GetInfo within {timeout:.0f} s (last status: {last})"
        )

    def _check_info(self, address: str, info: pb.TeacherInfo) -> None:
        """Raise ``TeacherMismatchError`` unless the teacher fits the student and ``top_k``."""
        vocab, fingerprint = self._expected
        if info.vocab_size != vocab:
            raise TeacherMismatchError(
                f"teacher at {address} has vocab_size {info.vocab_size} but the student's is {vocab}: "
                "the teacher's token ids would not index the student's vocabulary"
            )
        if info.tokenizer_fingerprint != fingerprint:
            raise TeacherMismatchError(
                f"teacher at {address} has tokenizer fingerprint {info.tokenizer_fingerprint} but the "
                f"student's is {fingerprint}: the two models use different tokenizers"
            )
        if self.config.top_k > info.max_top_k:
            raise TeacherMismatchError(
                f"top_k {self.config.top_k} exceeds the max_top_k {info.max_top_k} of the teacher at {address}"
            )

    async def shutdown(self) -> None:
        self._closing = True
        for job in list(self._jobs):
            self.abandon_job(job)
            job.future.cancel()
        tasks = [link.stream.task for link in self._links if link.stream is not None and link.stream.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(link.channel.close() for link in self._links), return_exceptions=True)

    # ----- loop thread: jobs and requests -----

    def start_job(self, job: Job) -> None:
        if job.future.cancelled() or self._closing:
            return
        if not job.requests:
            self._finish(job)
            return
        self._jobs.add(job)
        for request in job.requests:
            self._dispatch(request)

    def _dispatch(self, request: Request) -> None:
        """Send ``request`` on the next address that is up, or wait for one within the budget."""
        request.retry_handle = None
        if request.job.done or self._closing:
            return
        now = self.loop.time()
        if request.retry_deadline is not None and now >= request.retry_deadline:
            self._fail_job(request.job, self._budget_error(request))
            return
        link = self._pick_link(now)
        if link is None:
            if request.retry_deadline is None:
                request.retry_deadline = now + self.config.retry_budget_seconds
                request.last_status = "no teacher address is up"
            wake = min(min(link.down_until for link in self._links), request.retry_deadline)
            request.retry_handle = self.loop.call_at(wake, self._dispatch, request)
            return
        self._send(link, request)

    def _pick_link(self, now: float) -> Link | None:
        """Round robin over the addresses whose backoff has passed."""
        count = len(self._links)
        for step in range(count):
            index = (self._next_link + step) % count
            if self._links[index].down_until <= now:
                self._next_link = index + 1
                return self._links[index]
        return None

    def _send(self, link: Link, request: Request) -> None:
        """Write a new attempt of ``request`` to ``link``'s stream (opened if needed)."""
        request.attempts += 1
        job = request.job
        request.rid = f"{job.serial}:{str(job.key)[:MAX_KEY_CHARS]}/{request.index}/{request.attempts - 1}"
        request.assembler = TopKAssembler(request.num_positions, self.config.top_k)
        if link.stream is None:
            link.stream = Stream()
            link.stream.task = self.loop.create_task(self._run_stream(link, link.stream))
        stream = link.stream
        stream.pending[request.rid] = request
        request.stream = stream
        request.timer = self.loop.call_later(
            self.config.request_timeout_seconds, self._on_deadline, stream, request.rid
        )
        stream.queue.put_nowait(
            pb.ScoreRequest(
                request_id=request.rid, token_ids=request.token_ids, top_k=self.config.top_k, priority=job.priority
            )
        )

    def _on_deadline(self, stream: Stream, rid: str) -> None:
        """An attempt missed its deadline: fail its stream (cancelling it aborts the teacher's work)."""
        if rid in stream.pending and stream.failure is None and stream.task is not None:
            stream.failure = (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"request {rid!r} not answered within {self.config.request_timeout_seconds:g} s",
            )
            stream.task.cancel()

    def _deliver(self, request: Request, topk: TopK) -> None:
        job = request.job
        job.results[request.index] = topk
        job.remaining -= 1
        if job.remaining == 0:
            self._finish(job)

    def _finish(self, job: Job) -> None:
        job.done = True
        self._jobs.discard(job)
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled by the caller meanwhile
            job.future.set_result(job.results)

    def _fail_job(self, job: Job, error: TeacherError) -> None:
        if job.done:
            return
        self.abandon_job(job)
        self.stats.failures += 1
        logger.error("%s", error)
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled by the caller meanwhile
            job.future.set_exception(error)

    def abandon_job(self, job: Job) -> None:
        """Drop a job's unanswered attempts; late answers to them are ignored."""
        job.done = True
        self._jobs.discard(job)
        for request in job.requests:
            request.cancel_timers()
            if request.stream is not None:
                request.stream.pending.pop(request.rid, None)
                request.stream = None

    def _budget_error(self, request: Request) -> TeacherUnavailableError:
        return TeacherUnavailableError(
            f"batch {request.job.key!r}: sequence {request.index} not scored after {request.attempts} "
            f"attempts and {self.config.retry_budget_seconds:g} s of retries (retry_budget_seconds) on "
            f"teachers {', '.join(self.config.addresses)}; last status: {request.last_status}"
        )

    # ----- loop thread: streams -----

    async def _run_stream(self, link: Link, stream: Stream) -> None:
        """Run one Score call until it ends, then settle its unanswered requests."""
        try:
            code, details = await self._pump(link, stream)
        except asyncio.CancelledError:
            if stream.failure is None or self._closing:
                raise
            code, details = stream.failure
        finally:
            stream.queue.put_nowait(None)
        self._on_stream_end(link, stream, code, details)

    async def _pump(self, link: Link, stream: Stream) -> tuple[grpc.StatusCode, str]:
        """Verify the teacher if needed, then read the stream's chunks; returns how it ended."""
        try:
            if not link.verified:
                info = await link.stub.GetInfo(pb.GetInfoRequest(), timeout=self.config.request_timeout_seconds)
                self._check_info(link.address, info)
                link.verified = True
                logger.info("teacher at %s answers again", link.address)
            async for chunk in link.stub.Score(request_iterator(stream.queue)):
                self._on_chunk(link, stream, chunk)
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or ""
        except TeacherMismatchError as e:
            # A teacher restarted with another model must not feed this run; requests go elsewhere.
            logger.error("%s; not using it again", e)
            link.down_until = math.inf
            return grpc.StatusCode.FAILED_PRECONDITION, str(e)
        return grpc.StatusCode.OK, "the teacher ended the stream"

    def _on_chunk(self, link: Link, stream: Stream, chunk: pb.ScoreChunk) -> None:
        self.stats.bytes_received += chunk.ByteSize()
        link.failures = 0
        request = stream.pending.get(chunk.request_id)
        if request is None:  # a late answer of an abandoned attempt
            return
        try:
            last = request.assembler.add(chunk)
        except ValueError as e:
            self._fail_job(request.job, TeacherRequestError(f"teacher at {link.address} sent a malformed answer: {e}"))
            return
        if last:
            del stream.pending[chunk.request_id]
            request.cancel_timers()
            request.stream = None
            self._deliver(request, request.assembler.result())

    def _on_stream_end(self, link: Link, stream: Stream, code: grpc.StatusCode, details: str) -> None:
        """Fail the requests a non-retryable status names; resubmit the others."""
        if link.stream is stream:
            link.stream = None
        pending = list(stream.pending.values())
        stream.pending.clear()
        for request in pending:
            request.cancel_timers()
            request.stream = None
        status = f"{link.address}: {code.name}: {details}"
        refused = [r for r in pending if code not in RETRYABLE_CODES and repr(r.rid) in details]
        for request in refused:
            self._fail_job(
                request.job,
                TeacherRequestError(
                    f"teacher refused sequence {request.index} of batch {request.job.key!r} ({status})"
                ),
            )
        if not refused:
            delay = self._mark_down(link, self.loop.time())
            logger.warning(
                "stream to %s ended (%s: %s); resubmitting %d requests, address unused for %.1f s",
                link.address,
                code.name,
                details,
                len(pending),
                delay,
            )
        for request in pending:
            if not request.job.done:
                self._retry(request, status)

    def _mark_down(self, link: Link, now: float) -> float:
        """Back off from ``link``: exponential in its consecutive failures, with jitter."""
        link.failures += 1
        link.verified = False
        cap = min(self.config.backoff_max_seconds, self.config.backoff_initial_seconds * 2 ** (link.failures - 1))
        delay = cap * self._rng.uniform(0.5, 1.0)
        link.down_until = max(link.down_until, now + delay)
        return delay

    def _retry(self, request: Request, status: str) -> None:
        self.stats.retries += 1
        request.last_status = status
        if request.retry_deadline is None:
            request.retry_deadline = self.loop.time() + self.config.retry_budget_seconds
        self._dispatch(request)
