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
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import replace

import grpc
import numpy as np

from hyperdistill.common.codec import TopK, pack_token_ids
from hyperdistill.common.security import channel_credentials, read_token
from hyperdistill.common.stubs import teacher_pb2 as pb
from hyperdistill.trainer.teacher_client.config import (
    TeacherClientConfig,
    TeacherClientStats,
)
from hyperdistill.trainer.teacher_client.core import Job, Request, StreamCore
from hyperdistill.trainer.teacher_client.prefetch import B, Prefetcher

logger = logging.getLogger(__name__)


class TeacherClient:
    """Scores batches of token sequences on the teachers; a synchronous API over a loop thread."""

    def __init__(self, config: TeacherClientConfig):
        self.config = config
        # GetInfo of each teacher that answered at ``start``, by address.
        self.infos: dict[str, pb.TeacherInfo] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._core: StreamCore | None = None
        self._lock = threading.Lock()
        self._futures: dict[Hashable, concurrent.futures.Future] = {}
        self._serials = itertools.count()
        self._closed = False
        self._max_len = 0
        self._stats = TeacherClientStats()

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
        credentials = self._channel_credentials()
        self._loop = asyncio.new_event_loop()
        expected = (expected_vocab_size, expected_fingerprint)
        self._core = StreamCore(self.config, self._loop, self._stats, expected, credentials)
        self.infos = self._core.infos
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-client", daemon=True)
        self._thread.start()
        connecting = asyncio.run_coroutine_threadsafe(self._core.connect_all(), self._loop)
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
        self._loop.call_soon_threadsafe(self._core.start_job, job)
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
            asyncio.run_coroutine_threadsafe(self._core.shutdown(), self._loop).result(timeout=30)
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
            self._loop.call_soon_threadsafe(self._core.abandon_job, job)
