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
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import replace

import grpc
import numpy as np

from common.codec import TopK, TopKAssembler, pack_token_ids
from common.security import channel_credentials, read_token
from common.stubs import teacher_pb2 as pb
from common.stubs import teacher_pb2_grpc as pb_grpc
from trainer.teacher_client.config import (
    RETRYABLE_CODES,
    TeacherClientConfig,
    TeacherClientStats,
    TeacherError,
    TeacherMismatchError,
    TeacherRequestError,
    TeacherUnavailableError,
)
from trainer.teacher_client.core import AUTH_CODES, Job, Link, Request, Stream, request_iterator
from trainer.teacher_client.prefetch import B, Prefetcher

logger = logging.getLogger(__name__)


# The server caps request ids at 256 characters; the key's part of ours is capped below that.
_MAX_KEY_CHARS = 160


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
        self._links: list[Link] = []
        self._jobs: set[Job] = set()
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
            job = Job(key=key, serial=next(self._serials), priority=priority, future=future)
        job.requests = [Request(job, i, data, len(data) // 4 - 1) for i, data in enumerate(packed)]
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

    def _on_future_done(self, job: Job, future: concurrent.futures.Future) -> None:
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
        deadline = self._loop.time() + timeout
        delay, last = self.config.backoff_initial_seconds, "no answer"
        while (remaining := deadline - self._loop.time()) > 0:
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

    def _start_job(self, job: Job) -> None:
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
        request.rid = f"{job.serial}:{str(job.key)[:_MAX_KEY_CHARS]}/{request.index}/{request.attempts - 1}"
        request.assembler = TopKAssembler(request.num_positions, self.config.top_k)
        if link.stream is None:
            link.stream = Stream()
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
        self._abandon_job(job)
        self._stats.failures += 1
        logger.error("%s", error)
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled by the caller meanwhile
            job.future.set_exception(error)

    def _abandon_job(self, job: Job) -> None:
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

    def _mark_down(self, link: Link, now: float) -> float:
        """Back off from ``link``: exponential in its consecutive failures, with jitter."""
        link.failures += 1
        link.verified = False
        cap = min(self.config.backoff_max_seconds, self.config.backoff_initial_seconds * 2 ** (link.failures - 1))
        delay = cap * self._rng.uniform(0.5, 1.0)
        link.down_until = max(link.down_until, now + delay)
        return delay

    def _retry(self, request: Request, status: str) -> None:
        self._stats.retries += 1
        request.last_status = status
        if request.retry_deadline is None:
            request.retry_deadline = self._loop.time() + self.config.retry_budget_seconds
        self._dispatch(request)
