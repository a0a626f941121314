"""Our side of P1-P3: score sequences on the teacher service over S concurrent Score streams.

``score_streams`` is the client our users run: sequences spread round robin over S streams,
every request of a stream written at once, chunks assembled with ``TopKAssembler`` as they
arrive. It keeps the received ``ScoreChunk`` messages, so their serialized sizes (P1) and the
bytes themselves (P2's decode input, P4's replay server) are taken after the timed window.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
import numpy as np

from hyperdistill.common.codec import TopK, TopKAssembler, pack_token_ids
from hyperdistill.common.stubs import teacher_pb2 as pb
from hyperdistill.common.stubs import teacher_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# gRPC's length-prefixed message framing: 1 flag byte + 4 length bytes per message.
GRPC_FRAME_BYTES = 5


@dataclass
class Scored:
    """One pass over the sequences: results and chunks in sequence order, and the wall time."""

    results: list[TopK]
    chunks: list[list[pb.ScoreChunk]]
    seconds: float
    info: pb.TeacherInfo

    @property
    def positions(self) -> int:
        return sum(r.num_positions for r in self.results)

    def wire_bytes(self) -> dict:
        """Serialized ScoreChunk bytes (+ gRPC framing) and the packed arrays inside them."""
        chunks = [c for per_seq in self.chunks for c in per_seq]
        payload = sum(len(c.topk_ids) + len(c.topk_logprobs) + len(c.target_logprobs) for c in chunks)
        messages = sum(c.ByteSize() for c in chunks)
        return {
            "chunks": len(chunks),
            "payload": payload,
            "messages": messages,
            "messages_framed": messages + GRPC_FRAME_BYTES * len(chunks),
        }


def score_streams(address: str, sequences: list[np.ndarray], top_k: int, streams: int = 4) -> Scored:
    return asyncio.run(_score_streams(address, sequences, top_k, streams))


async def _score_streams(address: str, sequences: list[np.ndarray], top_k: int, streams: int) -> Scored:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.TeacherServiceStub(channel)
        info = await stub.GetInfo(pb.GetInfoRequest(), timeout=60, wait_for_ready=True)
        shares = [list(range(s, len(sequences), streams)) for s in range(streams)]
        results: list[TopK | None] = [None] * len(sequences)
        chunks: list[list[pb.ScoreChunk]] = [[] for _ in sequences]
        start = time.perf_counter()
        await asyncio.gather(
            *(_one_stream(stub, sequences, share, top_k, results, chunks) for share in shares if share)
        )
        seconds = time.perf_counter() - start
    return Scored(results=results, chunks=chunks, seconds=seconds, info=info)


async def _one_stream(stub, sequences, indices: list[int], top_k: int, results: list, chunks: list) -> None:
    requests = [
        pb.ScoreRequest(request_id=str(i), token_ids=pack_token_ids(sequences[i]), top_k=top_k) for i in indices
    ]
    assemblers = {str(i): TopKAssembler(len(sequences[i]) - 1, top_k) for i in indices}
    async for chunk in stub.Score(iter(requests), timeout=3600):
        index = int(chunk.request_id)
        chunks[index].append(chunk)
        if assemblers[chunk.request_id].add(chunk):
            results[index] = assemblers.pop(chunk.request_id).result()
    if assemblers:
        raise RuntimeError(f"stream ended without results for requests {sorted(assemblers)}")


def decode_chunks(serialized: list[list[bytes]], top_k: int) -> list:
    """P2, ours: serialized ScoreChunks per sequence -> (ids int32, logprobs float32 [P, K],
    target float32 [P]) torch tensors per sequence, the way a client receives them."""
    import torch

    out = []
    for per_seq in serialized:
        chunks = [pb.ScoreChunk.FromString(b) for b in per_seq]
        total = sum(c.num_positions for c in chunks)
        assembler = TopKAssembler(total, top_k)
        for chunk in chunks:
            assembler.add(chunk)
        topk = assembler.result()
        out.append((torch.from_numpy(topk.ids), torch.from_numpy(topk.logprobs), torch.from_numpy(topk.target)))
    return out
