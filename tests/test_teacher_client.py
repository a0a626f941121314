"""The trainer's teacher client against real teacher servers on loopback (transformers engine).

Two teachers serve the tiny teacher for the whole module; teacher B is killed and restarted
on its port by one test. Expected results come from one direct ``Score`` stream of the
simple test client on teacher A, asked for K + 1 so that ties at the K-th place are visible.
A TCP proxy in front of teacher A stands in for a hung or vanished teacher.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from hyperdistill.common.tokenizer import load_tokenizer, tokenizer_fingerprint
from hyperdistill.teacher_service.probe_client import ProbeClient
from hyperdistill.trainer import metrics
from hyperdistill.trainer.teacher_client import (
    TeacherClient,
    TeacherClientConfig,
    TeacherClientStats,
    TeacherMismatchError,
    TeacherRequestError,
    TeacherUnavailableError,
)
from tests.conftest import adopt, start_teacher
from tests.devtools.teacher_process import TeacherProcess, free_port
from tests.helpers import ATOL, VOCAB, random_ids, scrape_metrics

TOP_K = 4
NUM_BATCHES = 8
# float32 on the wire: the same model scored in different engine batches agrees to ~1e-6.
TEACHER_OVERRIDES = ("engine.kind=hf", "server.logprob_dtype=float32")
OK_REQUESTS = ("teacher_requests_total", (("status", "OK"),))


class RestartableTeacher:
    """A teacher that can be SIGKILLed and started again on the same gRPC port."""

    def __init__(self, tmp_path_factory, tiny_models, owner: pytest.FixtureRequest):
        """``owner``: the fixture that stops the current process (also one restarted by a test)."""
        self._factory, self._models, self._owner = tmp_path_factory, tiny_models, owner
        self.process = start_teacher(tmp_path_factory, "teacher-b", tiny_models, *TEACHER_OVERRIDES)

    @property
    def address(self) -> str:
        return self.process.address

    def kill_and_restart(self) -> None:
        """SIGKILL, then start a new process on the same port without waiting for it to serve."""
        old = self.process
        old.proc.kill()
        old.proc.wait()
        new = start_teacher(self._factory, "teacher-b-restarted", self._models, *TEACHER_OVERRIDES, port=old.port)
        self.process = new.start()
        adopt(self._owner, new.proc.pid)


@pytest.fixture(scope="module")
def teachers(request, tmp_path_factory, tiny_models):
    """(teacher A, restartable teacher B), started together to overlap their start-up."""
    a = start_teacher(tmp_path_factory, "teacher-a", tiny_models, *TEACHER_OVERRIDES)
    b = RestartableTeacher(tmp_path_factory, tiny_models, owner=request)
    try:
        for process in (a.start(), b.process.start()):
            process.wait_serving()
        yield a, b
    finally:
        a.stop()
        b.process.stop()


@pytest.fixture(scope="module")
def teacher_a(teachers) -> TeacherProcess:
    return teachers[0]


@pytest.fixture(scope="module")
def teacher_b(teachers) -> RestartableTeacher:
    return teachers[1]


@pytest.fixture(scope="module")
def fingerprint(tiny_models) -> str:
    """The student's tokenizer fingerprint, as the trainer computes it."""
    return tokenizer_fingerprint(load_tokenizer(tiny_models.student))


@pytest.fixture(scope="module")
def batches() -> dict[str, list[np.ndarray]]:
    """NUM_BATCHES batches of 2 sequences, every sequence a different length (int32 [T])."""
    return {
        f"batch-{b}": [random_ids(8 + 7 * b + 3 * s, seed=100 * b + s) for s in range(2)] for b in range(NUM_BATCHES)
    }


@pytest.fixture(scope="module")
def expected(teacher_a, batches):
    """Direct scores of every batch (TopK [T - 1, TOP_K + 1] per sequence), one stream."""
    keys = list(batches)
    flat = [seq for key in keys for seq in batches[key]]

    async def score():
        async with ProbeClient(teacher_a.address) as client:
            return await client.score(flat, TOP_K + 1, timeout=300)

    results = iter(asyncio.run(score()))
    return {key: [next(results) for _ in batches[key]] for key in keys}


def assert_same_topk(got, want) -> None:
    """got: TopK [P, K]; want: TopK [P, K + 1] of the same sequence. Ids may differ only at ties."""
    k = got.top_k
    assert got.ids.shape == (want.num_positions, k)
    np.testing.assert_allclose(got.target, want.target, rtol=0, atol=ATOL)
    np.testing.assert_allclose(got.logprobs, want.logprobs[:, :k], rtol=0, atol=ATOL)
    gaps = -np.diff(want.logprobs, axis=1)  # [P, K], >= 0: column j is the gap between ranks j and j + 1
    tied = np.zeros(got.ids.shape, dtype=bool)
    tied |= gaps[:, :k] <= 2 * ATOL
    tied[:, 1:] |= gaps[:, : k - 1] <= 2 * ATOL
    assert np.all((got.ids == want.ids[:, :k]) | tied)


def assert_batch(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert_same_topk(g, w)


def make_client(addresses: list[str], fingerprint: str, **overrides) -> TeacherClient:
    settings = dict(
        addresses=addresses,
        top_k=TOP_K,
        prefetch_batches=3,
        request_timeout_seconds=60.0,
        retry_budget_seconds=60.0,
        backoff_initial_seconds=0.2,
        backoff_max_seconds=2.0,
        connect_timeout_seconds=60.0,
    )
    client = TeacherClient(TeacherClientConfig(**{**settings, **overrides}))
    client.start(VOCAB, fingerprint)
    return client


def run_prefetcher(client: TeacherClient, batches, expected, on_step=None) -> list[str]:
    """Train-loop stand-in: checks every yielded batch against ``expected``; returns keys in order."""
    seen = []
    for key, topk, waited in client.prefetch(list(batches), batches.__getitem__):
        assert waited >= 0.0
        assert_batch(topk, expected[key])
        seen.append(key)
        if on_step is not None:
            on_step(key)
    return seen


def test_prefetcher_matches_direct_score_in_order(teacher_a, fingerprint, batches, expected):
    depths = []
    with make_client([teacher_a.address], fingerprint) as client:
        seen = []
        for key, topk, _ in client.prefetch(list(batches), batches.__getitem__):
            depths.append(client.prefetch_depth)
            assert_batch(topk, expected[key])
            seen.append(key)
        stats = client.stats()
        again = client.submit("again", batches["batch-3"]).result(timeout=60)  # the future itself
    assert seen == list(batches)
    # Three batches stay submitted ahead of the current one until the data runs out.
    assert depths == [3] * (NUM_BATCHES - 3) + [2, 1, 0]
    assert stats.retries == 0 and stats.failures == 0 and stats.bytes_received > 0
    assert_batch(again, expected["batch-3"])


def test_leaving_the_loop_early_cancels_prefetched_batches(teacher_a, fingerprint, batches, expected):
    with make_client([teacher_a.address], fingerprint) as client:
        prefetcher = client.prefetch(list(batches), batches.__getitem__)
        for _ in prefetcher:
            assert client.prefetch_depth == 3
            break
        assert client.prefetch_depth == 0  # the three batches ahead were cancelled
        with pytest.raises(RuntimeError, match="only once"):
            next(iter(prefetcher))
        assert_batch(client.submit("after", batches["batch-1"]).result(timeout=60), expected["batch-1"])


def test_ranks_sharing_a_teacher_each_get_their_next_batch_first(teacher_a, fingerprint):
    """Rank 1 starts its prefetch while rank 0's whole window (5 long batches) is queued: the
    position of a batch in its run is its priority, so rank 1's first batch is scored before
    rank 0's batches 3 and 4 (first come, first served, it would be scored after all five)."""
    long_batches = [[random_ids(1500, seed=700 + b)] for b in range(6)]  # one engine step each
    yielded: list[tuple[int, int]] = []
    lock = threading.Lock()

    def rank(r: int, clients: list) -> None:
        with make_client([teacher_a.address], fingerprint, prefetch_batches=4) as client:
            clients.append(client)
            for index, (_, topk, _) in enumerate(client.prefetch(range(6), long_batches.__getitem__)):
                assert topk[0].num_positions == 1499
                with lock:
                    yielded.append((r, index))

    clients: list = []
    first = threading.Thread(target=rank, args=(0, clients))
    first.start()
    deadline = time.monotonic() + 60
    while not (clients and clients[0].prefetch_depth >= 4) and time.monotonic() < deadline:
        time.sleep(0.01)
    rank(1, [])
    first.join(timeout=120)
    assert not first.is_alive()
    assert yielded.index((1, 0)) < yielded.index((0, 3))


@pytest.mark.parametrize("case", ["fingerprint", "vocab", "top_k"])
def test_start_refuses_a_teacher_that_does_not_fit(teacher_a, fingerprint, case):
    vocab, student_fp, top_k = VOCAB, fingerprint, TOP_K
    if case == "fingerprint":
        student_fp = "0" * 64
        fragments = [fingerprint, student_fp, "tokenizer"]
    elif case == "vocab":
        vocab = 151_643
        fragments = ["vocab_size 151936", "151643"]
    else:
        top_k = 21
        fragments = ["top_k 21", "max_top_k 20"]
    client = TeacherClient(TeacherClientConfig(addresses=[teacher_a.address], top_k=top_k))
    with pytest.raises(TeacherMismatchError) as err:
        client.start(vocab, student_fp)
    for fragment in [teacher_a.address, *fragments]:
        assert fragment in str(err.value)
    client.close()


def test_start_fails_within_connect_timeout_when_nobody_listens(fingerprint):
    address = f"127.0.0.1:{free_port()}"
    client = TeacherClient(TeacherClientConfig(addresses=[address], connect_timeout_seconds=2.0))
    start = time.monotonic()
    with pytest.raises(TeacherUnavailableError, match=f"teacher at {address} did not answer GetInfo within 2 s"):
        client.start(VOCAB, fingerprint)
    assert time.monotonic() - start < 6.0
    client.close()


def test_refused_sequence_fails_only_its_batch(teacher_a, fingerprint, batches, expected):
    bad = np.array([5, VOCAB, 7], dtype=np.int32)
    with make_client([teacher_a.address], fingerprint) as client:
        with pytest.raises(ValueError, match="sequence 0 is int64 \\[1\\]"):
            client.submit("too-short", [np.array([1])])
        good = [client.submit(key, batches[key]) for key in ("batch-0", "batch-1")]
        refused = client.submit("bad", [batches["batch-2"][0], bad])
        later = [client.submit(key, batches[key]) for key in ("batch-4", "batch-5")]
        with pytest.raises(TeacherRequestError) as err:
            client.result("bad")
        for key in ("batch-0", "batch-1", "batch-4", "batch-5"):
            assert_batch(client.result(key), expected[key])
        assert client.stats().failures == 1
    assert all(f.done() for f in good + later)
    for fragment in ("INVALID_ARGUMENT", "sequence 1 of batch 'bad'", "id 151936 at index 1", "[0, 151936)"):
        assert fragment in str(err.value)
    assert refused.exception() is err.value


def test_requests_spread_over_two_teachers(teacher_a, teacher_b, fingerprint, batches, expected):
    four = {key: batches[key] for key in list(batches)[:4]}
    urls = (teacher_a.metrics_url, teacher_b.process.metrics_url)
    before = [scrape_metrics(url).get(OK_REQUESTS, 0) for url in urls]
    with make_client([teacher_a.address, teacher_b.address], fingerprint) as client:
        assert run_prefetcher(client, four, expected) == list(four)
    served = [scrape_metrics(url).get(OK_REQUESTS, 0) - b for url, b in zip(urls, before, strict=True)]
    assert served == [4, 4]  # 8 sequences, round robin


def test_a_teacher_dead_from_the_start_is_skipped(teacher_a, fingerprint, batches, expected):
    dead = f"127.0.0.1:{free_port()}"
    with make_client([dead, teacher_a.address], fingerprint, connect_timeout_seconds=3.0) as client:
        assert set(client.infos) == {teacher_a.address}
        assert run_prefetcher(client, batches, expected) == list(batches)


def test_teacher_killed_and_restarted_mid_run(teacher_b, fingerprint, batches, expected):
    """SIGKILL after the third step, restart on the same port: every batch once, in order, right."""

    def on_step(key):
        if key == "batch-2":
            teacher_b.kill_and_restart()

    with make_client([teacher_b.address], fingerprint, prefetch_batches=2, retry_budget_seconds=300.0) as client:
        seen = run_prefetcher(client, batches, expected, on_step)
        stats = client.stats()
    teacher_b.process.wait_serving()
    assert seen == list(batches)
    assert stats.retries >= 1 and stats.failures == 0
    # What the trainer exports each step: its counters advance by the client's, once.
    sample = lambda name: REGISTRY.get_sample_value(name, {"rank": "7"}) or 0.0  # noqa: E731
    metrics.export_teacher_stats(7, stats, TeacherClientStats())
    metrics.export_teacher_stats(7, stats, stats)
    assert sample("trainer_teacher_retries_total") == stats.retries and sample("trainer_teacher_failures_total") == 0


class TcpProxy:
    """A TCP forwarder to ``target`` on a free loopback port, run on its own loop thread.

    ``freeze`` stops moving bytes (a hung teacher); ``stop`` closes the port and every
    connection (a teacher that is gone).
    """

    def __init__(self, target: str):
        self._host, port = target.rsplit(":", 1)
        self._port = int(port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._transports = []
        self._tasks = set()
        self._flowing: asyncio.Event | None = None
        self._server = self._call(self._listen())
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _listen(self):
        self._flowing = asyncio.Event()
        self._flowing.set()
        return await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def _handle(self, reader, writer):
        self._tasks.add(asyncio.current_task())
        self._transports.append(writer.transport)
        up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        self._transports.append(up_writer.transport)
        pipes = [
            asyncio.ensure_future(self._pipe(reader, up_writer)),
            asyncio.ensure_future(self._pipe(up_reader, writer)),
        ]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            writer.transport.abort()
            up_writer.transport.abort()

    async def _pipe(self, reader, writer):
        while data := await reader.read(65536):
            await self._flowing.wait()
            writer.write(data)
            await writer.drain()

    def freeze(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.clear)

    async def _close(self):
        self._server.close()
        for transport in self._transports:
            transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def stop(self) -> None:
        if self._loop.is_running():
            self._call(self._close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)


@pytest.fixture
def proxy(teacher_a):
    proxy = TcpProxy(teacher_a.address)
    yield proxy
    proxy.stop()


def test_missed_deadline_moves_work_to_another_teacher(teacher_a, proxy, fingerprint, batches, expected):
    """Teacher A behind a frozen proxy never answers; its requests time out and go to A directly."""
    three = {key: batches[key] for key in list(batches)[:3]}
    with make_client([proxy.address, teacher_a.address], fingerprint, request_timeout_seconds=3.0) as client:
        proxy.freeze()
        start = time.monotonic()
        assert run_prefetcher(client, three, expected) == list(three)
        elapsed = time.monotonic() - start
        stats = client.stats()
    assert stats.retries >= 1 and stats.failures == 0
    assert 3.0 <= elapsed < 30.0


def test_retry_budget_exhausted_fails_clearly(proxy, fingerprint, batches, expected):
    with make_client([proxy.address], fingerprint, retry_budget_seconds=3.0) as client:
        assert_batch(client.submit("before", batches["batch-0"]).result(timeout=60), expected["batch-0"])
        proxy.stop()  # the teacher is gone for good
        start = time.monotonic()
        future = client.submit("after", batches["batch-1"])
        with pytest.raises(TeacherUnavailableError) as err:
            future.result(timeout=30)
        elapsed = time.monotonic() - start
        assert client.stats().failures == 1
    assert 2.5 <= elapsed < 8.0
    message = str(err.value)
    for fragment in ("batch 'after'", "attempts", "retry_budget_seconds", proxy.address, "UNAVAILABLE"):
        assert fragment in message


def test_close_cancels_pending_batches_and_is_idempotent(teacher_a, fingerprint, batches):
    client = make_client([teacher_a.address], fingerprint)
    futures = [client.submit(key, batches[key]) for key in batches]
    client.close()
    client.close()
    assert all(f.done() for f in futures)
    cancelled = [f for f in futures if f.cancelled()]
    assert cancelled
    with pytest.raises(concurrent.futures.CancelledError):
        cancelled[0].result(timeout=0)
    with pytest.raises(RuntimeError, match="closed"):
        client.submit("late", batches["batch-0"])
