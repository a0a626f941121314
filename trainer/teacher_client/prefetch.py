"""`Prefetcher`: the next batches kept submitted to the teachers while the current one trains."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np

from hyperdistill.common.codec import TopK

if TYPE_CHECKING:
    from hyperdistill.trainer.teacher_client.client import TeacherClient


B = TypeVar("B")


class Prefetcher(Generic[B]):
    """Keeps the next ``prefetch_batches`` batches submitted while the current one trains.

    Made by ``TeacherClient.prefetch``. Iterating yields every batch of ``batches`` once, in
    order, with its ``list[TopK]`` (one per sequence of ``to_sequences(batch)``, int [T_i]
    each) and the seconds spent waiting for it. Leaving the loop early cancels the batches
    already submitted. A batch's priority is its position in ``batches``: ranks that step
    together share a teacher fairly, each rank's next batch ahead of anyone's prefetch (without
    it, one rank's first batch queues behind another rank's whole prefetch window). Keys are
    generated here, so several prefetchers (training and evaluation) can share one client.
    """

    def __init__(self, client: TeacherClient, batches: Iterable[B], to_sequences: Callable[[B], Sequence[np.ndarray]]):
        self.client = client
        self._batches = batches
        self._to_sequences = to_sequences
        self._prefix = f"p{next(_PREFETCHER_SERIALS)}"
        self._queue: deque[tuple[B, str]] = deque()
        self._iterated = False

    def __iter__(self) -> Iterator[tuple[B, list[TopK], float]]:
        if self._iterated:
            raise RuntimeError("a Prefetcher can be iterated only once")
        self._iterated = True
        batches = enumerate(self._batches)
        depth = self.client.config.prefetch_batches
        try:
            while True:
                self._fill(batches, depth + 1)  # the batch to train on next + `depth` ahead
                if not self._queue:
                    return
                batch, key = self._queue.popleft()
                topk = self.client.result(key)
                yield batch, topk, self.client.stats().last_wait_seconds
        finally:
            for _, key in self._queue:
                self.client.cancel(key)
            self._queue.clear()

    def _fill(self, batches: Iterator[tuple[int, B]], size: int) -> None:
        while len(self._queue) < size and (item := next(batches, None)) is not None:
            index, batch = item
            key = f"{self._prefix}.{index}"
            self.client.submit(key, self._to_sequences(batch), priority=index)
            self._queue.append((batch, key))


_PREFETCHER_SERIALS = itertools.count()
