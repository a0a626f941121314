"""Loop-thread records of the teacher client: batches (jobs), sequence attempts (requests),
Score streams and teacher addresses (links). Touched on the client's event-loop thread only."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, field

import grpc

from common.codec import TopK, TopKAssembler
from common.stubs import teacher_pb2 as pb
from common.stubs import teacher_pb2_grpc as pb_grpc

# Codes with which a teacher refuses this client's credentials: no retry helps, so `start` fails at once.
AUTH_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


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
