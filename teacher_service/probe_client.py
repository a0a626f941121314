"""ProbeClient: a small async client of the teacher service for tests, the teacher demo and
benchmarks (the trainer's production client is `trainer.teacher_client.TeacherClient`).

``score`` sends every sequence on one Score stream and assembles the interleaved chunks into
``TopK`` arrays by request id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hyperdistill.common.codec import TopK, TopKAssembler, pack_token_ids
from hyperdistill.common.stubs import teacher_pb2 as pb
from hyperdistill.common.stubs import teacher_pb2_grpc as pb_grpc

MAX_RECEIVE_BYTES = 64 * 1024 * 1024


class ProbeClient:
    def __init__(self, address: str):
        self.address = address
        self.channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                ("grpc.max_send_message_length", MAX_RECEIVE_BYTES),
            ],
        )
        self.stub = pb_grpc.TeacherServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.bytes_received = 0

    async def __aenter__(self) -> ProbeClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def info(self, timeout: float = 10.0, wait_for_ready: bool = False) -> pb.TeacherInfo:
        return await self.stub.GetInfo(pb.GetInfoRequest(), timeout=timeout, wait_for_ready=wait_for_ready)

    async def serving(self, timeout: float = 2.0) -> bool:
        """True when the server's overall health is SERVING."""
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def wait_serving(self, timeout: float) -> None:
        """Poll health until SERVING; raises TimeoutError naming the address."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await self.serving():
            if loop.time() > deadline:
                raise TimeoutError(f"teacher at {self.address} not SERVING after {timeout:.0f} s")
            await asyncio.sleep(0.5)

    async def score(
        self,
        sequences: Sequence[np.ndarray],
        top_k: int,
        timeout: float | None = None,
        streams: int = 1,
        chunks: list[list[pb.ScoreChunk]] | None = None,
    ) -> list[TopK]:
        """Score ``sequences`` (each int [T_i]); returns TopK [T_i - 1, K] in order.

        The sequences are spread round robin over ``streams`` concurrent Score streams, every
        request of a stream written at once. ``chunks``, when given (one list per sequence),
        receives the ScoreChunk messages as they arrive (the benchmarks size and replay them).
        """
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        results: list[TopK | None] = [None] * len(sequences)
        shares = [list(range(s, len(sequences), streams)) for s in range(streams)]
        await asyncio.gather(
            *(self._one_stream(sequences, share, top_k, timeout, results, chunks) for share in shares if share)
        )
        return results

    async def _one_stream(self, sequences, indices: list[int], top_k: int, timeout, results: list, chunks) -> None:
        requests = [
            pb.ScoreRequest(request_id=f"seq-{i}", token_ids=pack_token_ids(sequences[i]), top_k=top_k) for i in indices
        ]
        assemblers = {f"seq-{i}": TopKAssembler(len(sequences[i]) - 1, top_k) for i in indices}
        async for chunk in self.stub.Score(iter(requests), timeout=timeout):
            self.bytes_received += chunk.ByteSize()
            index = int(chunk.request_id.removeprefix("seq-"))
            if chunks is not None:
                chunks[index].append(chunk)
            if assemblers[chunk.request_id].add(chunk):
                results[index] = assemblers.pop(chunk.request_id).result()
        if assemblers:
            raise RuntimeError(f"stream ended without results for {sorted(assemblers)}")
