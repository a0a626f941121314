"""Packed little-endian tensors on the wire, shared by the teacher server and its clients.

Encoding is one ``tobytes`` per array and decoding one ``np.frombuffer`` per array: no
per-position Python objects on either side.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from hyperdistill.common.stubs import teacher_pb2 as pb

IDS_DTYPE = np.dtype("<i4")
WIRE_DTYPES = {
    "float16": (pb.LOGPROB_DTYPE_FLOAT16, np.dtype("<f2")),
    "float32": (pb.LOGPROB_DTYPE_FLOAT32, np.dtype("<f4")),
}
_NUMPY_BY_ENUM = {enum: np_dtype for enum, np_dtype in WIRE_DTYPES.values()}


@dataclass(frozen=True)
class TopK:
    """A teacher's top-K next-token distribution over P positions.

    ids: int32 [P, K], sorted by descending log-prob.
    logprobs: float [P, K], log-softmax over the full vocabulary.
    target: float [P], log-prob of the actual next token (token i+1 at position i).
    """

    ids: np.ndarray
    logprobs: np.ndarray
    target: np.ndarray

    @property
    def num_positions(self) -> int:
        return self.ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.ids.shape[1]


def pack_token_ids(token_ids) -> bytes:
    """token_ids: int [T] (any int array-like) -> int32 little-endian bytes."""
    return np.ascontiguousarray(token_ids, dtype=IDS_DTYPE).tobytes()


def unpack_token_ids(data: bytes) -> np.ndarray:
    """int32 little-endian bytes -> int32 [T]; raises ValueError on a ragged buffer."""
    if len(data) % IDS_DTYPE.itemsize:
        raise ValueError(f"token_ids: {len(data)} bytes is not a whole number of int32 values")
    return np.frombuffer(data, dtype=IDS_DTYPE)


def bytes_per_position(top_k: int, dtype: str) -> int:
    """Wire bytes of one scored position: K ids, K log-probs and one target log-prob."""
    itemsize = WIRE_DTYPES[dtype][1].itemsize
    return top_k * (IDS_DTYPE.itemsize + itemsize) + itemsize


def encode_chunks(request_id: str, topk: TopK, dtype: str, max_positions: int) -> Iterator[pb.ScoreChunk]:
    """Split ``topk`` into ScoreChunks of at most ``max_positions`` positions each."""
    enum, np_dtype = WIRE_DTYPES[dtype]
    ids = np.ascontiguousarray(topk.ids, dtype=IDS_DTYPE)
    logprobs = np.ascontiguousarray(topk.logprobs, dtype=np_dtype)
    target = np.ascontiguousarray(topk.target, dtype=np_dtype)
    total = topk.num_positions
    for start in range(0, total, max_positions):
        stop = min(start + max_positions, total)
        yield pb.ScoreChunk(
            request_id=request_id,
            start=start,
            num_positions=stop - start,
            top_k=topk.top_k,
            dtype=enum,
            topk_ids=ids[start:stop].tobytes(),
            topk_logprobs=logprobs[start:stop].tobytes(),
            target_logprobs=target[start:stop].tobytes(),
            last=stop == total,
        )


class TopKAssembler:
    """Collects one request's chunks into preallocated float32 ``TopK`` arrays."""

    def __init__(self, num_positions: int, top_k: int):
        self.ids = np.empty((num_positions, top_k), dtype=np.int32)
        self.logprobs = np.empty((num_positions, top_k), dtype=np.float32)
        self.target = np.empty((num_positions,), dtype=np.float32)
        self._filled = 0

    def add(self, chunk: pb.ScoreChunk) -> bool:
        """Decode ``chunk`` into place; returns True once the request's last chunk is in."""
        num, k = chunk.num_positions, chunk.top_k
        if k != self.ids.shape[1] or chunk.start + num > self.ids.shape[0]:
            raise ValueError(
                f"chunk of request {chunk.request_id!r} [start={chunk.start}, P={num}, K={k}] "
                f"does not fit the expected [P={self.ids.shape[0]}, K={self.ids.shape[1]}]"
            )
        np_dtype = _NUMPY_BY_ENUM[chunk.dtype]
        rows = slice(chunk.start, chunk.start + num)
        self.ids[rows] = np.frombuffer(chunk.topk_ids, dtype=IDS_DTYPE).reshape(num, k)
        self.logprobs[rows] = np.frombuffer(chunk.topk_logprobs, dtype=np_dtype).reshape(num, k)
        self.target[rows] = np.frombuffer(chunk.target_logprobs, dtype=np_dtype)
        self._filled += num
        if chunk.last and self._filled != self.ids.shape[0]:
            raise ValueError(
                f"request {chunk.request_id!r} ended after {self._filled} of {self.ids.shape[0]} positions"
            )
        return chunk.last

    def result(self) -> TopK:
        return TopK(ids=self.ids, logprobs=self.logprobs, target=self.target)
