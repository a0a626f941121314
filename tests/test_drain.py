"""The drain's last step, in process: once nothing is in flight, every open Score stream is ended
by the server with UNAVAILABLE saying its unanswered requests were not admitted (the server's stop
would otherwise cut them, and a client could not tell what the server had admitted)."""

from __future__ import annotations

import asyncio

import numpy as np

from hyperdistill.common.codec import TopK, pack_token_ids
from hyperdistill.common.stubs import teacher_pb2 as pb
from hyperdistill.teacher_service.engine import EngineInfo
from hyperdistill.teacher_service.scoring import STREAM_DRAINED, Admission, Draining, Limits, StreamScorer

LIMITS = Limits(vocab_size=100, max_model_len=64, max_top_k=4, logprob_dtype="float32", max_message_bytes=1 << 20)


class GatedEngine:
    """Answers each request once ``release`` is set."""

    info = EngineInfo(name="gated", model="none", vocab_size=100, max_model_len=64, max_top_k=4)

    def __init__(self):
        self.release = asyncio.Event()

    async def score(self, request_id, token_ids, top_k, priority=0):
        await self.release.wait()
        p = len(token_ids) - 1
        return TopK(np.zeros((p, top_k), np.int32), np.zeros((p, top_k), np.float32), np.zeros(p, np.float32))


def _request(rid: str) -> pb.ScoreRequest:
    return pb.ScoreRequest(request_id=rid, top_k=2, token_ids=pack_token_ids(np.arange(5, dtype=np.int32)))


async def _client(first: list[str], written: asyncio.Event):
    """Writes ``first``, then stays open without writing (an idle client, or one whose next write
    the server has not read yet)."""
    for rid in first:
        yield _request(rid)
    written.set()
    await asyncio.Event().wait()


async def _consume(scorer: StreamScorer, requests) -> tuple[list[str], Exception | None]:
    answered = []
    try:
        async for chunk in scorer.run(requests):
            answered += [chunk.request_id] if chunk.last else []
    except Draining as e:
        return answered, e
    return answered, None


def test_drained_server_ends_open_streams_after_answering_what_they_admitted():
    async def run():
        engine, admission = GatedEngine(), Admission(max_positions=1000)
        busy_written, idle_written = asyncio.Event(), asyncio.Event()
        busy = asyncio.create_task(_consume(StreamScorer(engine, admission, LIMITS), _client(["a", "b"], busy_written)))
        idle = asyncio.create_task(_consume(StreamScorer(engine, admission, LIMITS), _client([], idle_written)))
        await asyncio.wait_for(asyncio.gather(busy_written.wait(), idle_written.wait()), 5)
        while admission.requests < 2:
            await asyncio.sleep(0.01)
        assert len(admission.streams) == 2

        admission.draining = True
        engine.release.set()  # the admitted requests finish
        await asyncio.wait_for(admission.wait_idle(), 5)
        admission.close_streams()
        return await asyncio.wait_for(asyncio.gather(busy, idle), 5), admission

    ((busy_answered, busy_error), (idle_answered, idle_error)), admission = asyncio.run(run())
    assert sorted(busy_answered) == ["a", "b"] and idle_answered == []
    for error in (busy_error, idle_error):
        assert error is not None and error.status == "UNAVAILABLE"
        assert str(error) == STREAM_DRAINED
    assert admission.streams == set()


async def _finished_client(rids: list[str]):
    """Writes ``rids`` and half-closes (the probe client, the learn-bench scorer)."""
    for rid in rids:
        yield _request(rid)


def test_a_stream_whose_client_finished_writing_ends_ok_with_all_its_answers():
    """Its last answers may still be queued when the drain finds nothing in flight: closing it then
    would turn a complete stream into UNAVAILABLE (as test_teacher_lifecycle once saw)."""

    async def run():
        engine, admission = GatedEngine(), Admission(max_positions=1000)
        engine.release.set()
        scorer = StreamScorer(engine, admission, LIMITS)
        stream = scorer.run(_finished_client(["a", "b", "c"]))
        answered = []
        async for chunk in stream:  # consume until the first answer, then drain with the rest queued
            answered += [chunk.request_id] if chunk.last else []
            if admission.requests == 0:
                admission.draining = True
                admission.close_streams()
        return answered, admission

    answered, admission = asyncio.run(run())
    assert sorted(answered) == ["a", "b", "c"] and admission.streams == set()


def test_a_request_read_while_draining_is_refused_by_name():
    async def run():
        admission = Admission(max_positions=1000)
        admission.draining = True
        return await _consume(StreamScorer(GatedEngine(), admission, LIMITS), _client(["late"], asyncio.Event()))

    answered, error = asyncio.run(run())
    assert answered == [] and "'late' not admitted" in str(error)
