"""R1 bad input: seeded generated requests against a running teacher; every one gets its documented
status with a message naming the field and the limit; the server stays up and answers a reference
request bit-identically afterwards.

Documented answers (teacher.proto, `teacher_service.scoring.validate`):

| input                                            | status              | message names        |
|--------------------------------------------------|---------------------|----------------------|
| id >= vocab, negative id, garbage / ragged bytes | INVALID_ARGUMENT    | token_ids + limit    |
| fewer than 2 tokens, more than max_model_len     | INVALID_ARGUMENT    | token_ids + limit    |
| message over max_request_bytes                   | RESOURCE_EXHAUSTED  | gRPC's size message  |
| top_k 0, > max_top_k, 2^32-1                     | INVALID_ARGUMENT    | top_k + [1, max]     |
| empty / over-long / duplicate request_id         | INVALID_ARGUMENT    | request_id           |
| bytes that are not protobuf (each method)        | INVALID_ARGUMENT    | message type         |
| unknown fields, any priority                     | OK                  |                      |
| half-closed stream                               | OK, every answer    |                      |
| client cancel / tiny deadline                    | CANCELLED / DEADLINE_EXCEEDED (client side) |  |
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from hyperdistill.common.codec import TopKAssembler, pack_token_ids
from hyperdistill.common.stubs import teacher_pb2 as pb
from tests.chaos.load import CLIENT_MASKED

SERVICE = "/hyperdistill.teacher.v1.TeacherService/"
OK = grpc.StatusCode.OK


@dataclass
class Outcome:
    """Per case: how many were sent, how many got the documented answer, and the others."""

    sent: int = 0
    expected: int = 0
    masked: int = 0
    """Client-side INTERNAL from grpc.aio (grpc/grpc#36066), not the server's answer."""
    unexpected: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_model_len: int
    max_top_k: int
    max_request_bytes: int


@dataclass(frozen=True)
class Case:
    name: str
    status: grpc.StatusCode
    words: tuple[str, ...]
    run: Callable  # async (channel, rng, limits) -> (status, details)


def _ids(rng: random.Random, limits: Limits, n: int | None = None) -> np.ndarray:
    n = n or rng.randint(2, 64)
    return np.array([rng.randrange(limits.vocab_size) for _ in range(n)], dtype=np.int32)


async def _score(channel, requests: list, timeout: float = 30.0) -> tuple[grpc.StatusCode, str]:
    """Send ``requests`` (messages or raw bytes) on one stream, read it to the end."""
    call = channel.stream_stream(SERVICE + "Score")(iter([_raw(r) for r in requests]), timeout=timeout)
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    except asyncio.CancelledError:
        # grpc.aio raises this for a call it ended locally (a deadline that ran out before the
        # call started); the status says which.
        if asyncio.current_task().cancelling():
            raise
        return await call.code(), await call.details() or ""
    return OK, ""


def _raw(request) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def _request(rng, limits, ids=None, **fields) -> pb.ScoreRequest:
    values = dict(request_id=f"r{rng.randrange(10**9)}", top_k=rng.randint(1, limits.max_top_k))
    values.update(fields)
    return pb.ScoreRequest(token_ids=pack_token_ids(_ids(rng, limits) if ids is None else ids), **values)


def _with_id(rng, limits, bad: int) -> pb.ScoreRequest:
    ids = _ids(rng, limits)
    ids[rng.randrange(len(ids))] = bad
    return _request(rng, limits, ids)


def _cases() -> list[Case]:
    inv = grpc.StatusCode.INVALID_ARGUMENT

    def one(build):
        return lambda ch, rng, lim: _score(ch, [build(rng, lim)])

    async def duplicate(ch, rng, lim):
        first = _request(rng, lim, _ids(rng, lim, 64))
        return await _score(ch, [first, _request(rng, lim, request_id=first.request_id)])

    async def raw_getinfo(ch, rng, lim):
        try:
            await ch.unary_unary(SERVICE + "GetInfo")(_garbage(rng), timeout=30)
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or ""
        return OK, ""

    return [
        Case(
            "id >= vocab",
            inv,
            ("token_ids", "vocabulary"),
            one(lambda r, lim: _with_id(r, lim, r.randint(lim.vocab_size, 2**31 - 1))),
        ),
        Case(
            "negative id", inv, ("token_ids", "vocabulary"), one(lambda r, lim: _with_id(r, lim, -r.randint(1, 2**31)))
        ),
        Case(
            "ragged bytes",
            inv,
            ("token_ids",),
            one(lambda r, lim: pb.ScoreRequest(request_id="x", top_k=1, token_ids=_garbage(r, ragged=True))),
        ),
        Case(
            "garbage id bytes",
            inv,
            ("token_ids",),
            one(lambda r, lim: pb.ScoreRequest(request_id="x", top_k=1, token_ids=_garbage(r, vocab=lim.vocab_size))),
        ),
        Case(
            "empty token_ids",
            inv,
            ("token_ids", "at least 2"),
            one(lambda r, lim: _request(r, lim, np.zeros(0, np.int32))),
        ),
        Case("one token", inv, ("token_ids", "at least 2"), one(lambda r, lim: _request(r, lim, _ids(r, lim, 1)))),
        Case(
            "over max_model_len",
            inv,
            ("token_ids", "max_model_len"),
            one(lambda r, lim: _request(r, lim, np.ones(lim.max_model_len + r.randint(1, 200), np.int32))),
        ),
        Case(
            "over max_request_bytes",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            ("larger than max",),
            one(lambda r, lim: _request(r, lim, np.ones(lim.max_request_bytes // 4 + r.randint(300, 5000), np.int32))),
        ),
        Case("top_k 0", inv, ("top_k", "[1,"), one(lambda r, lim: _request(r, lim, top_k=0))),
        Case(
            "top_k > max",
            inv,
            ("top_k", "[1,"),
            one(lambda r, lim: _request(r, lim, top_k=r.randint(lim.max_top_k + 1, 10**6))),
        ),
        Case("top_k uint32 max", inv, ("top_k", "[1,"), one(lambda r, lim: _request(r, lim, top_k=2**32 - 1))),
        Case("empty request_id", inv, ("request_id", "256"), one(lambda r, lim: _request(r, lim, request_id=""))),
        Case(
            "huge request_id",
            inv,
            ("request_id", "256"),
            one(lambda r, lim: _request(r, lim, request_id="x" * r.randint(257, 20000))),
        ),
        Case("duplicate id in flight", inv, ("request_id", "already in flight"), duplicate),
        Case("raw bytes to Score", inv, ("not a valid", "ScoreRequest"), lambda ch, r, lim: _score(ch, [_garbage(r)])),
        Case("raw bytes to GetInfo", inv, ("not a valid", "GetInfoRequest"), raw_getinfo),
        Case("unknown fields", OK, (), one(lambda r, lim: _raw(_request(r, lim)) + _unknown_field(r))),
        # Strict priority: a request with a large value waits for every lower one admitted meanwhile.
        Case(
            "any priority",
            OK,
            (),
            lambda ch, r, lim: _score(ch, [_request(r, lim, priority=r.randint(-(2**63), 2**63 - 1))], timeout=600),
        ),
        Case("half-closed stream", OK, (), _half_closed),
        Case("cancel mid-stream", grpc.StatusCode.CANCELLED, (), _cancel_mid_stream),
        Case(
            "tiny deadline",
            grpc.StatusCode.DEADLINE_EXCEEDED,
            (),
            lambda ch, r, lim: _score(ch, [_request(r, lim, _ids(r, lim, 256))], timeout=r.uniform(1e-3, 0.03)),
        ),
    ]


def _garbage(rng: random.Random, ragged: bool = False, vocab: int | None = None) -> bytes:
    """Random bytes: a length not divisible by 4, or int32 words with at least one id >= vocab."""
    if ragged:
        return rng.randbytes(4 * rng.randint(0, 50) + rng.randint(1, 3))
    if vocab is None:
        # Field 1 with wire type 7 (invalid) first: never parses as a protobuf message.
        return bytes([0x0F]) + rng.randbytes(rng.randint(0, 200))
    words = np.frombuffer(rng.randbytes(4 * rng.randint(2, 100)), dtype="<i4").copy()
    words[0] = vocab + rng.randrange(2**31 - 1 - vocab)
    return words.tobytes()


def _unknown_field(rng: random.Random) -> bytes:
    number = rng.randint(100, 10000)
    tag = (number << 3) | 0  # varint
    return _varint(tag) + _varint(rng.randrange(2**63))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


async def _half_closed(channel, rng, limits):
    """Write N requests, close the sending side, read: every request answered, then OK."""
    requests = [_request(rng, limits, request_id=f"h{i}") for i in range(rng.randint(1, 6))]
    call = channel.stream_stream(
        SERVICE + "Score", request_serializer=_raw, response_deserializer=pb.ScoreChunk.FromString
    )()
    for request in requests:
        await call.write(request)
    await call.done_writing()
    finished = set()
    async for chunk in call:
        if chunk.last:
            finished.add(chunk.request_id)
    if finished != {r.request_id for r in requests}:
        return grpc.StatusCode.DATA_LOSS, f"answered {sorted(finished)} of {[r.request_id for r in requests]}"
    return await call.code(), ""


async def _cancel_mid_stream(channel, rng, limits):
    requests = [_request(rng, limits, _ids(rng, limits, 256), request_id=f"c{i}") for i in range(8)]
    call = channel.stream_stream(
        SERVICE + "Score", request_serializer=_raw, response_deserializer=pb.ScoreChunk.FromString
    )(iter(requests))
    async for _ in call:
        call.cancel()
        break
    else:
        return OK, "stream ended before a chunk"
    return await call.code(), ""


async def reference_answer(channel, limits: Limits) -> bytes:
    """The reference request's assembled answer as bytes (ids, log-probs, targets)."""
    ids = np.arange(2, 2 + min(96, limits.max_model_len), dtype=np.int32) % limits.vocab_size
    request = pb.ScoreRequest(request_id="reference", token_ids=pack_token_ids(ids), top_k=limits.max_top_k)
    call = channel.stream_stream(
        SERVICE + "Score", request_serializer=_raw, response_deserializer=pb.ScoreChunk.FromString
    )(iter([request]), timeout=60)
    assembler = TopKAssembler(len(ids) - 1, limits.max_top_k)
    async for chunk in call:
        assembler.add(chunk)
    topk = assembler.result()
    return topk.ids.tobytes() + topk.logprobs.tobytes() + topk.target.tobytes()


async def run_bad_input(address: str, total: int = 1000, seed: int = 0, concurrency: int = 8) -> dict:
    """Send ``total`` generated requests (cycling through the cases); returns per-case outcomes
    and whether the reference answer stayed bit-identical."""
    rng = random.Random(seed)
    cases = _cases()
    outcomes = {case.name: Outcome() for case in cases}
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        info = await channel.unary_unary(
            SERVICE + "GetInfo", request_serializer=_raw, response_deserializer=pb.TeacherInfo.FromString
        )(pb.GetInfoRequest())
        limits = Limits(info.vocab_size, info.max_model_len, info.max_top_k, info.max_request_bytes)
        before = await reference_answer(channel, limits)
        queue = [(cases[i % len(cases)], random.Random(rng.randrange(2**32))) for i in range(total)]
        gate = asyncio.Semaphore(concurrency)

        async def one(case: Case, case_rng: random.Random) -> None:
            async with gate:
                status, details = await case.run(channel, case_rng, limits)
            outcome = outcomes[case.name]
            outcome.sent += 1
            if status == case.status and all(w in details for w in case.words):
                outcome.expected += 1
            elif f"{status.name}: {details}" == CLIENT_MASKED:
                outcome.masked += 1
            elif len(outcome.unexpected) < 3:
                outcome.unexpected.append(f"{status.name}: {details[:160]}")

        await asyncio.gather(*(one(case, case_rng) for case, case_rng in queue))
        after = await reference_answer(channel, limits)
    statuses = Counter(case.status.name for case in cases)
    return {"outcomes": outcomes, "reference_identical": before == after, "statuses": dict(statuses)}


def format_bad_input(result: dict) -> str:
    rows = [f"{'R1 case':<26} {'sent':>5} {'as documented':>14} {'client-masked':>14}  unexpected"]
    for name, o in result["outcomes"].items():
        rows.append(f"{name:<26} {o.sent:>5} {o.expected:>14} {o.masked:>14}  {'; '.join(o.unexpected)}")
    sent = sum(o.sent for o in result["outcomes"].values())
    good = sum(o.expected for o in result["outcomes"].values())
    masked = sum(o.masked for o in result["outcomes"].values())
    rows.append(
        f"{'total':<26} {sent:>5} {good:>14} {masked:>14}  reference answer bit-identical after: "
        f"{result['reference_identical']}"
    )
    return "\n".join(rows)
