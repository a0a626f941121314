"""The trainer's teacher client: top-K log-probs of the next batches, fetched while a step runs.

The training loop is synchronous torch code; this client owns an asyncio event loop in a
background thread and offers a blocking API on top of it:

    client = TeacherClient(config)
    client.start(expected_vocab_size=151936, expected_fingerprint=fingerprint)
    for batch, topk, waited in client.prefetch(batches, lambda b: b.sequences):
        train_step(batch, topk)
    client.close()

Per teacher address there is one long-lived bidirectional ``Score`` stream: requests are
written to it as they are submitted and answers are matched to them by request id. Every
request has a deadline; when a stream fails (teacher killed, restarting, draining, queue
full, deadline passed) its unanswered requests are resubmitted on a new stream of another
address (round robin over the addresses that are up) or, after an exponential backoff with
jitter, of the same one, until the request's retry budget runs out. A refused request
(INVALID_ARGUMENT and other non-retryable codes) fails its batch at once with the server's
message. Each attempt carries its own request id, so a late answer of an older attempt is
dropped: every batch is delivered complete, once, for its own key.

Channels are plaintext unless ``tls_ca_file`` is set (TLS, mutual TLS with ``tls_cert_file``);
``auth_token_env`` adds a bearer token to every call (``common.security``).

Threading: everything after ``start`` that touches streams, requests and timers runs on the
loop thread; the caller's thread only creates futures, hands work over with
``loop.call_soon_threadsafe`` / ``asyncio.run_coroutine_threadsafe`` and waits on
``concurrent.futures.Future``s. ``submit``, ``result``, ``cancel`` and ``close`` are meant
to be called from one thread (the training loop's).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

import grpc
import numpy as np

from common.codec import TopK, TopKAssembler, pack_token_ids
from common.security import channel_credentials, check_tls_config, read_token
from common.stubs import teacher_pb2 as pb
from common.stubs import teacher_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

B = TypeVar("B")

# Codes after which a stream's unanswered requests are resubmitted. A non-retryable code whose
# message names none of the stream's requests is treated the same way (grpc reports some
# connection drops as UNKNOWN), so it is retried until the budget runs out.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)
# Codes with which a teacher refuses this client's credentials: no retry helps, so `start` fails at once.
_AUTH_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
# The server caps request ids at 256 characters; the key's part of ours is capped below that.
_MAX_KEY_CHARS = 160


class TeacherError(RuntimeError):
    """Base class of the teacher client's errors."""


class TeacherMismatchError(TeacherError):
    """A teacher serves another vocabulary or tokenizer than the student's, or a smaller top-K."""


class TeacherUnavailableError(TeacherError):
    """No teacher answered in time (at start, or within a request's retry budget)."""


class TeacherRequestError(TeacherError):
    """A teacher refused a request with a non-retryable status (e.g. INVALID_ARGUMENT)."""


@dataclass(kw_only=True)
class TeacherClientConfig:
    """Where the teachers are, what to ask them, and how long to wait and retry."""

    addresses: list[str] = field(default_factory=lambda: ["127.0.0.1:50051"])
    """Teacher gRPC addresses (``host:port``); requests are spread over them round robin."""
    top_k: int = 20
    """K of the top-K log-probs asked for; must not exceed any teacher's ``max_top_k``."""
    prefetch_batches: int = 2
    """N: batches ``prefetch`` keeps submitted ahead of the one being trained on."""
    request_timeout_seconds: float = 300.0
    """Deadline of one attempt of one sequence, from being written to a stream to its last
    chunk. It includes queueing behind this client's other requests, so it must cover the
    scoring of ``prefetch_batches`` whole batches. A missed deadline fails the attempt and the
    stream it was on (cancelling that stream aborts its work on the teacher)."""
    retry_budget_seconds: float = 900.0
    """Time a sequence may spend being retried, counted from its first failed attempt, before
    its batch fails with ``TeacherUnavailableError``. Covers a teacher restart (vLLM loading a
    480B FP8 checkpoint takes minutes)."""
    backoff_initial_seconds: float = 0.5
    """First wait before an address whose stream failed is used again; doubles per failure."""
    backoff_max_seconds: float = 15.0
    """Cap of that wait (each wait is drawn uniformly in [0.5, 1] x the exponential value)."""
    connect_timeout_seconds: float = 300.0
    """``start``: how long to wait for each teacher to answer GetInfo (it may be loading)."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest gRPC message sent or received; must be >= the teachers' ``max_message_bytes``."""
    tls_ca_file: str | None = None
    """PEM CA certificates that signed the teachers' certificates. Set: TLS to every address
    (the teachers' ``server.tls_cert_file``); unset: plaintext."""
    tls_cert_file: str | None = None
    """PEM client certificate chain, for teachers that require one (``server.tls_client_ca_file``:
    mutual TLS); with ``tls_key_file``. Needs ``tls_ca_file``."""
    tls_key_file: str | None = None
    """PEM private key of ``tls_cert_file``."""
    tls_server_name: str | None = None
    """Name to check the teachers' certificates against instead of the host in ``addresses`` (e.g.
    when they are reached by an IP their certificate does not list). Needs ``tls_ca_file``."""
    auth_token_env: str | None = None
    """Name of the environment variable holding the bearer token sent with every call (the
    teachers' ``server.auth_token_env``); ``start`` fails when it is unset or empty. Needs
    ``tls_ca_file``: the token is sent as call credentials, which gRPC sends only over TLS."""

    def __post_init__(self) -> None:
        check_tls_config(
            self, "teacher", switch="tls_ca_file", dependents=("tls_cert_file", "tls_server_name", "auth_token_env")
        )
        if not self.addresses or not all(isinstance(a, str) and a for a in self.addresses):
            raise ValueError(f"addresses must be a non-empty list of host:port strings, got {self.addresses!r}")
        if self.top_k < 1 or self.prefetch_batches < 0:
            raise ValueError(f"top_k must be >= 1 and prefetch_batches >= 0, got {self.top_k}, {self.prefetch_batches}")
        for name in (
            "request_timeout_seconds",
            "retry_budget_seconds",
            "backoff_initial_seconds",
            "backoff_max_seconds",
            "connect_timeout_seconds",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise ValueError(
                f"backoff_max_seconds {self.backoff_max_seconds} < backoff_initial_seconds "
                f"{self.backoff_initial_seconds}"
            )
        if self.max_message_bytes < 64 * 1024:
            raise ValueError(f"max_message_bytes must be >= 65536, got {self.max_message_bytes}")


@dataclass
class TeacherClientStats:
    """Counters for the trainer's metrics (a snapshot; ``TeacherClient.stats``)."""

    retries: int = 0
    """Sequence attempts resubmitted after a failed one."""
    failures: int = 0
    """Batches whose future failed (refused, malformed answer or retry budget exhausted)."""
    bytes_received: int = 0
    """Serialized bytes of all ScoreChunks received."""
    last_wait_seconds: float = 0.0
    """Seconds the last ``result`` call blocked."""


@dataclass(eq=False)
class _Job:
    """One submitted batch: its future and one ``_Request`` per sequence."""

    key: Hashable
    serial: int
    priority: int
    future: concurrent.futures.Future
    requests: list[_Request] = field(default_factory=list)
    results: list[TopK | None] = field(default_factory=list)
    remaining: int = 0
    done: bool = False


@dataclass(eq=False)
class _Request:
    """One sequence of a job and the state of its current attempt (loop thread only)."""

    job: _Job
    index: int
    token_ids: bytes
    """int32 little-endian [T], packed once so every attempt sends the same sequence."""
    num_positions: int
    attempts: int = 0
    rid: str = ""
    stream: _Stream | None = None
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
class _Stream:
    """One Score call: the queue feeding its request iterator and its unanswered requests."""

    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    pending: dict[str, _Request] = field(default_factory=dict)
    task: asyncio.Task | None = None
    failure: tuple[grpc.StatusCode, str] | None = None


@dataclass(eq=False)
class _Link:
    """One teacher address: its channel, current stream and health."""

    address: str
    channel: grpc.aio.Channel
    stub: pb_grpc.TeacherServiceStub
    stream: _Stream | None = None
    verified: bool = False
    failures: int = 0
    down_until: float = 0.0


async def _requests(queue: asyncio.Queue) -> AsyncIterator[pb.ScoreRequest]:
    """A stream's request iterator; ``None`` ends it (so grpc's writer task exits)."""
    while (request := await queue.get()) is not None:
        yield request


class TeacherClient:
    """Scores batches of token sequences on the teachers; a synchronous API over a loop thread."""

    def __init__(self, config: TeacherClientConfig):
        self.config = config
        # GetInfo of each teacher that answered at ``start``, by address.
        self.infos: dict[str, pb.TeacherInfo] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._futures: dict[Hashable, concurrent.futures.Future] = {}
        self._serials = itertools.count()
        self._closed = False
        self._max_len = 0
        self._stats = TeacherClientStats()
        # Own RNG for jitter: the trainer's global `random` state is checkpointed and must not move.
        self._rng = random.Random()
        # Loop-thread state.
        self._links: list[_Link] = []
        self._jobs: set[_Job] = set()
        self._next_link = 0
        self._closing = False
        self._expected: tuple[int, str] = (0, "")
        self._credentials: grpc.ChannelCredentials | None = None

    # ----- caller thread -----

    def start(self, expected_vocab_size: int, expected_fingerprint: str) -> None:
        """Start the loop thread and check every teacher's GetInfo against the student.

        Waits up to ``connect_timeout_seconds`` for each teacher. Raises
        ``TeacherMismatchError`` when a teacher's vocab size or tokenizer fingerprint differs
        from the student's or its ``max_top_k`` < ``top_k``; ``TeacherUnavailableError`` when no
        teacher answers; ``TeacherRequestError`` when a teacher refuses the bearer token;
        ``ValueError`` when ``auth_token_env`` names an unset variable or a TLS file is unreadable.
        Teachers that never answer while another does are logged and tried again later (they are
        verified before their first stream).
        """
        if self._thread is not None:
            raise RuntimeError("TeacherClient.start was already called")
        self._expected = (expected_vocab_size, expected_fingerprint)
        self._credentials = self._channel_credentials()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-client", daemon=True)
        self._thread.start()
        connecting = asyncio.run_coroutine_threadsafe(self._connect_all(), self._loop)
        try:
            connecting.result()
        except BaseException:
            connecting.cancel()
            self.close()
            raise
        self._max_len = min(info.max_model_len for info in self.infos.values())

    def submit(self, key: Hashable, sequences: Sequence[np.ndarray], priority: int = 0) -> concurrent.futures.Future:
        """Queue one batch without blocking; the future gets ``list[TopK]``, one per sequence.

        sequences: int [T_i] each, 2 <= T_i <= the teachers' max_model_len; the i-th result
        is ``TopK`` [T_i - 1, top_k]. ``key`` names the batch until ``result(key)`` or
        ``cancel(key)`` collects it. Cancelling the future drops the batch's work. The
        teacher starts waiting work lowest ``priority`` first, across all its clients.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._loop is None or self._closed:
                raise RuntimeError("TeacherClient is not started or already closed")
            if key in self._futures:
                raise ValueError(f"batch key {key!r} is already submitted and not yet collected")
            packed = [self._pack(key, i, seq) for i, seq in enumerate(sequences)]
            self._futures[key] = future
            job = _Job(key=key, serial=next(self._serials), priority=priority, future=future)
        job.requests = [_Request(job, i, data, len(data) // 4 - 1) for i, data in enumerate(packed)]
        job.results, job.remaining = [None] * len(packed), len(packed)
        future.add_done_callback(lambda f: self._on_future_done(job, f))
        self._loop.call_soon_threadsafe(self._start_job, job)
        return future

    def result(self, key: Hashable) -> list[TopK]:
        """Block until batch ``key`` is scored and collect it: ``TopK`` [T_i - 1, K] per sequence.

        Raises the batch's error (``TeacherRequestError``, ``TeacherUnavailableError``) or
        ``concurrent.futures.CancelledError`` if the client was closed. The seconds spent
        blocking are in ``stats().last_wait_seconds``.
        """
        with self._lock:
            future = self._futures.get(key)
        if future is None:
            raise KeyError(f"no submitted batch with key {key!r}")
        start = time.perf_counter()
        try:
            return future.result()
        finally:
            self._stats.last_wait_seconds = time.perf_counter() - start
            with self._lock:
                self._futures.pop(key, None)

    def cancel(self, key: Hashable) -> None:
        """Forget batch ``key``: its future is cancelled and its unanswered requests dropped."""
        with self._lock:
            future = self._futures.pop(key, None)
        if future is not None:
            future.cancel()

    def prefetch(self, batches: Iterable[B], to_sequences: Callable[[B], Sequence[np.ndarray]]) -> Prefetcher[B]:
        """Iterate ``(batch, list[TopK], wait_seconds)`` over ``batches``, ``prefetch_batches`` ahead."""
        return Prefetcher(self, batches, to_sequences)

    @property
    def prefetch_depth(self) -> int:
        """Batches submitted and not yet collected: the prefetch queue depth (a metric)."""
        with self._lock:
            return len(self._futures)

    def stats(self) -> TeacherClientStats:
        """A snapshot of the counters (written on the loop thread, read here)."""
        return replace(self._stats)

    def close(self) -> None:
        """Cancel every batch and stream, close the channels and stop the loop thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            futures = list(self._futures.values())
            self._futures.clear()
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        if self._loop is not None and not self._loop.is_running():
            self._loop.close()
        for future in futures:
            future.cancel()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS (and the bearer token) of every channel, or None for plaintext; files and token read now."""
        config = self.config
        if config.tls_ca_file is None:
            return None
        token = read_token(config.auth_token_env, "teacher.auth_token_env") if config.auth_token_env else None
        return channel_credentials(config.tls_ca_file, config.tls_cert_file, config.tls_key_file, token, "teacher")

    def _pack(self, key: Hashable, index: int, sequence: np.ndarray) -> bytes:
        """Check one sequence (int [T]) and pack it as int32 little-endian bytes."""
        arr = np.asarray(sequence)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or not 2 <= len(arr) <= self._max_len:
            raise ValueError(
                f"batch {key!r}: sequence {index} is {arr.dtype} {list(arr.shape)}; need an int [T] "
                f"with 2 <= T <= {self._max_len} (the teachers' max_model_len)"
            )
        return pack_token_ids(arr)

    def _on_future_done(self, job: _Job, future: concurrent.futures.Future) -> None:
        """Runs in the thread that completed or cancelled ``future``."""
        if future.cancelled() and not self._closed:
            self._loop.call_soon_threadsafe(self._abandon_job, job)

    # ----- loop thread: start-up and shutdown -----

    async def _connect_all(self) -> None:
        """Create a channel per address and collect every teacher's checked GetInfo."""
        self._links = [self._make_link(address) for address in self.config.addresses]
        outcomes = await asyncio.gather(*(self._await_info(link) for link in self._links), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, TeacherUnavailableError):
                raise outcome
        if all(isinstance(outcome, BaseException) for outcome in outcomes):
            raise TeacherUnavailableError("no teacher answered: " + "; ".join(str(o) for o in outcomes))
        now = self._loop.time()
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

    def _make_link(self, address: str) -> _Link:
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
        return _Link(address=address, channel=channel, stub=pb_grpc.TeacherServiceStub(channel))

    async def _await_info(self, link: _Link) -> pb.TeacherInfo:
        """GetInfo with backoff until it answers (loading teachers say UNAVAILABLE) or time is up."""
        timeout = self.config.connect_timeout_seconds
        deadline = self._loop.time() + timeout
        delay, last = self.config.backoff_initial_seconds, "no answer"
        while (remaining := deadline - self._loop.time()) > 0:
            try:
                info = await link.stub.GetInfo(pb.GetInfoRequest(), timeout=remaining, wait_for_ready=True)
            except grpc.aio.AioRpcError as e:
                last = f"{e.code().name}: {e.details()}"
                if e.code() in _AUTH_CODES:
                    raise TeacherRequestError(
                        f"teacher at {link.address} refused this client ({last}): check teacher.auth_token_env "
                        "and the token it names against the teacher's server.auth_token_env"
                    ) from None
                if e.code() not in RETRYABLE_CODES:
                    break
            else:
                self._check_info(link.address, info)
                return info
            await asyncio.sleep(min(delay * self._rng.uniform(0.5, 1.0), max(0.0, deadline - self._loop.time())))
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

    async def _shutdown(self) -> None:
        self._closing = True
        for job in list(self._jobs):
            self._abandon_job(job)
            job.future.cancel()
        tasks = [link.stream.task for link in self._links if link.stream is not None and link.stream.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(link.channel.close() for link in self._links), return_exceptions=True)

    # ----- loop thread: jobs and requests -----

    def _start_job(self, job: _Job) -> None:
        if job.future.cancelled() or self._closing:
            return
        if not job.requests:
            self._finish(job)
            return
        self._jobs.add(job)
        for request in job.requests:
            self._dispatch(request)

    def _dispatch(self, request: _Request) -> None:
        """Send ``request`` on the next address that is up, or wait for one within the budget."""
        request.retry_handle = None
        if request.job.done or self._closing:
            return
        now = self._loop.time()
        if request.retry_deadline is not None and now >= request.retry_deadline:
            self._fail_job(request.job, self._budget_error(request))
            return
        link = self._pick_link(now)
        if link is None:
            if request.retry_deadline is None:
                request.retry_deadline = now + self.config.retry_budget_seconds
                request.last_status = "no teacher address is up"
            wake = min(min(link.down_until for link in self._links), request.retry_deadline)
            request.retry_handle = self._loop.call_at(wake, self._dispatch, request)
            return
        self._send(link, request)

    def _pick_link(self, now: float) -> _Link | None:
        """Round robin over the addresses whose backoff has passed."""
        count = len(self._links)
        for step in range(count):
            index = (self._next_link + step) % count
            if self._links[index].down_until <= now:
                self._next_link = index + 1
                return self._links[index]
        return None

    def _send(self, link: _Link, request: _Request) -> None:
        """Write a new attempt of ``request`` to ``link``'s stream (opened if needed)."""
        request.attempts += 1
        job = request.job
        request.rid = f"{job.serial}:{str(job.key)[:_MAX_KEY_CHARS]}/{request.index}/{request.attempts - 1}"
        request.assembler = TopKAssembler(request.num_positions, self.config.top_k)
        if link.stream is None:
            link.stream = _Stream()
            link.stream.task = self._loop.create_task(self._run_stream(link, link.stream))
        stream = link.stream
        stream.pending[request.rid] = request
        request.stream = stream
        request.timer = self._loop.call_later(
            self.config.request_timeout_seconds, self._on_deadline, stream, request.rid
        )
        stream.queue.put_nowait(
            pb.ScoreRequest(
                request_id=request.rid, token_ids=request.token_ids, top_k=self.config.top_k, priority=job.priority
            )
        )

    def _on_deadline(self, stream: _Stream, rid: str) -> None:
        """An attempt missed its deadline: fail its stream (cancelling it aborts the teacher's work)."""
        if rid in stream.pending and stream.failure is None and stream.task is not None:
            stream.failure = (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"request {rid!r} not answered within {self.config.request_timeout_seconds:g} s",
            )
            stream.task.cancel()

    def _deliver(self, request: _Request, topk: TopK) -> None:
        job = request.job
        job.results[request.index] = topk
        job.remaining -= 1
        if job.remaining == 0:
            self._finish(job)

    def _finish(self, job: _Job) -> None:
        job.done = True
        self._jobs.discard(job)
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled by the caller meanwhile
            job.future.set_result(job.results)

    def _fail_job(self, job: _Job, error: TeacherError) -> None:
        if job.done:
            return
        self._abandon_job(job)
        self._stats.failures += 1
        logger.error("%s", error)
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled by the caller meanwhile
            job.future.set_exception(error)

    def _abandon_job(self, job: _Job) -> None:
        """Drop a job's unanswered attempts; late answers to them are ignored."""
        job.done = True
        self._jobs.discard(job)
        for request in job.requests:
            request.cancel_timers()
            if request.stream is not None:
                request.stream.pending.pop(request.rid, None)
                request.stream = None

    def _budget_error(self, request: _Request) -> TeacherUnavailableError:
        return TeacherUnavailableError(
            f"batch {request.job.key!r}: sequence {request.index} not scored after {request.attempts} "
            f"attempts and {self.config.retry_budget_seconds:g} s of retries (retry_budget_seconds) on "
            f"teachers {', '.join(self.config.addresses)}; last status: {request.last_status}"
        )

    # ----- loop thread: streams -----

    async def _run_stream(self, link: _Link, stream: _Stream) -> None:
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

    async def _pump(self, link: _Link, stream: _Stream) -> tuple[grpc.StatusCode, str]:
        """Verify the teacher if needed, then read the stream's chunks; returns how it ended."""
        try:
            if not link.verified:
                info = await link.stub.GetInfo(pb.GetInfoRequest(), timeout=self.config.request_timeout_seconds)
                self._check_info(link.address, info)
                link.verified = True
                logger.info("teacher at %s answers again", link.address)
            async for chunk in link.stub.Score(_requests(stream.queue)):
                self._on_chunk(link, stream, chunk)
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or ""
        except TeacherMismatchError as e:
            # A teacher restarted with another model must not feed this run; requests go elsewhere.
            logger.error("%s; not using it again", e)
            link.down_until = math.inf
            return grpc.StatusCode.FAILED_PRECONDITION, str(e)
        return grpc.StatusCode.OK, "the teacher ended the stream"

    def _on_chunk(self, link: _Link, stream: _Stream, chunk: pb.ScoreChunk) -> None:
        self._stats.bytes_received += chunk.ByteSize()
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

    def _on_stream_end(self, link: _Link, stream: _Stream, code: grpc.StatusCode, details: str) -> None:
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
            delay = self._mark_down(link, self._loop.time())
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

    def _mark_down(self, link: _Link, now: float) -> float:
        """Back off from ``link``: exponential in its consecutive failures, with jitter."""
        link.failures += 1
        link.verified = False
        cap = min(self.config.backoff_max_seconds, self.config.backoff_initial_seconds * 2 ** (link.failures - 1))
        delay = cap * self._rng.uniform(0.5, 1.0)
        link.down_until = max(link.down_until, now + delay)
        return delay

    def _retry(self, request: _Request, status: str) -> None:
        self._stats.retries += 1
        request.last_status = status
        if request.retry_deadline is None:
            request.retry_deadline = self._loop.time() + self.config.retry_budget_seconds
        self._dispatch(request)


class Prefetcher(Generic[B]):
    """Keeps the next ``prefetch_batches`` batches submitted while the current one trains.

    Made by ``TeacherClient.prefetch``. Iterating yields every batch of ``batches`` once, in
    order, with its ``list[TopK]`` (one per sequence of ``to_sequences(batch)``, int [T_i]
    each) and the seconds spent waiting for it. Leaving the loop early cancels the batches
    already submitted. A batch's priority is its position in ``batches``: ranks that step
    together share a teacher fairly, each rank's next batch ahead of anyone's prefetch (without
    it, one rank's first batch queues behind another rank's whole prefetch window). Keys are
    generated here, so several prefetchers (training and evaluation) can share one client.
    """

    def __init__(self, client: TeacherClient, batches: Iterable[B], to_sequences: Callable[[B], Sequence[np.ndarray]]):
        self.client = client
        self._batches = batches
        self._to_sequences = to_sequences
        self._prefix = f"p{next(_PREFETCHER_SERIALS)}"
        self._queue: deque[tuple[B, str]] = deque()
        self._iterated = False

    def __iter__(self) -> Iterator[tuple[B, list[TopK], float]]:
        if self._iterated:
            raise RuntimeError("a Prefetcher can be iterated only once")
        self._iterated = True
        batches = enumerate(self._batches)
        depth = self.client.config.prefetch_batches
        try:
            while True:
                self._fill(batches, depth + 1)  # the batch to train on next + `depth` ahead
                if not self._queue:
                    return
                batch, key = self._queue.popleft()
                topk = self.client.result(key)
                yield batch, topk, self.client.stats().last_wait_seconds
        finally:
            for _, key in self._queue:
                self.client.cancel(key)
            self._queue.clear()

    def _fill(self, batches: Iterator[tuple[int, B]], size: int) -> None:
        while len(self._queue) < size and (item := next(batches, None)) is not None:
            index, batch = item
            key = f"{self._prefix}.{index}"
            self.client.submit(key, self._to_sequences(batch), priority=index)
            self._queue.append((batch, key))


_PREFETCHER_SERIALS = itertools.count()
