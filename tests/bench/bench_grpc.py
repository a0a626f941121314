"""Our side of P1-P3: score sequences on the teacher service over S concurrent Score streams.

``score_streams`` runs `ProbeClient.score`: sequences spread round robin over S streams, every
request of a stream written at once, chunks assembled with ``TopKAssembler`` as they arrive. It
keeps the received ``ScoreChunk`` messages, so their serialized sizes (P1) and the bytes
themselves (P2's decode input, P4's replay server) are taken after the timed window.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from hyperdistill.common.codec import TopK, TopKAssembler
from hyperdistill.common.stubs import teacher_pb2 as pb
from hyperdistill.teacher_service.probe_client import ProbeClient

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
    async with ProbeClient(address) as client:
        info = await client.info(timeout=60, wait_for_ready=True)
        chunks: list[list[pb.ScoreChunk]] = [[] for _ in sequences]
        start = time.perf_counter()
        results = await client.score(sequences, top_k, timeout=3600, streams=streams, chunks=chunks)
        seconds = time.perf_counter() - start
    return Scored(results=results, chunks=chunks, seconds=seconds, info=info)


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
