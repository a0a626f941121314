"""`CachedTeacher`: the teacher client behind the top-K cache (``teacher.cache``).

Same API as `TeacherClient` for the training loop and evaluation (``submit``, ``result``,
``cancel``, ``prefetch``, ``stats``, ``close``). A batch's sequences are looked up in the cache
(`trainer.teacher_cache`) when submitted; only the missing ones go to the live teachers, and
with ``write_through`` their answers are stored, returned as the cache will give them back so
that a resumed run sees the same numbers. With ``teacher.addresses`` empty there is no live
teacher: a missing sequence fails its batch with `CacheMissError` naming it (run precompute).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from hyperdistill.common.codec import WIRE_DTYPES, TopK
from hyperdistill.trainer.teacher_cache import CacheKey, CacheMismatchError, CacheMissError, TeacherCache
from hyperdistill.trainer.teacher_client.client import TeacherClient
from hyperdistill.trainer.teacher_client.config import TeacherClientConfig, TeacherClientStats
from hyperdistill.trainer.teacher_client.prefetch import B, Prefetcher

_DTYPE_NAMES = {enum: name for name, (enum, _) in WIRE_DTYPES.items()}


@dataclass
class _Pending:
    results: list[TopK | None]
    missing: list[int]
    sequences: Sequence[np.ndarray] = field(repr=False)


@dataclass
class CacheStats:
    """Sequences and positions answered from the cache (hits) and by the live teachers (misses)."""

    hit_sequences: int = 0
    hit_positions: int = 0
    miss_sequences: int = 0
    miss_positions: int = 0


class CachedTeacher:
    """The top-K cache in front of an optional `TeacherClient` (see the module docstring)."""

    def __init__(self, config: TeacherClientConfig):
        self.config = config
        self.cache: TeacherCache | None = None
        self.live = TeacherClient(config) if config.addresses else None
        self.cache_stats = CacheStats()
        self._writer = None
        self._pending: dict[Hashable, _Pending] = {}
        self._last_wait = 0.0

    def start(self, expected_vocab_size: int, expected_fingerprint: str) -> None:
        """Start the live client (if any) and open the cache under this run's key: the teachers'
        model and wire dtype, the tokenizer fingerprint, K and the encoding."""
        cache = self.config.cache
        dtype = None
        model = cache.teacher_model
        if self.live is not None:
            self.live.start(expected_vocab_size, expected_fingerprint)
            served = {(info.model, _DTYPE_NAMES.get(info.dtype, str(info.dtype))) for info in self.live.infos.values()}
            if len(served) > 1:
                raise CacheMismatchError(f"teacher.cache needs one teacher set-up; the teachers serve {sorted(served)}")
            ((live_model, dtype),) = served
            if model is not None and model != live_model:
                raise CacheMismatchError(
                    f"teacher.cache.teacher_model is {model!r} but the teachers serve {live_model!r}"
                )
            model = live_model
        key = CacheKey(model, cache.teacher_revision, expected_fingerprint, self.config.top_k, dtype, cache.encoding)
        self.cache = TeacherCache(cache.dir, key)
        if cache.write_through and self.live is not None:
            self._writer = self.cache.writer(cache.shard_mib << 20)

    def submit(self, key: Hashable, sequences: Sequence[np.ndarray], priority: int = 0) -> None:
        """Queue one batch: cached sequences are answered now, the rest submitted to the teachers."""
        if key in self._pending:
            raise ValueError(f"batch key {key!r} is already submitted and not yet collected")
        results = [self.cache.get(ids) for ids in sequences]
        missing = [i for i, r in enumerate(results) if r is None]
        if missing and self.cache.refresh():  # shards other writers committed since
            results = [r if r is not None else self.cache.get(ids) for r, ids in zip(results, sequences, strict=True)]
            missing = [i for i, r in enumerate(results) if r is None]
        if missing and self.live is None:
            first = sequences[missing[0]]
            raise CacheMissError(
                f"batch {key!r}: {len(missing)} of {len(sequences)} sequences are not in the teacher cache "
                f"{self.cache.root} (e.g. sequence {missing[0]}, {len(first)} tokens) and teacher.addresses is "
                "empty: run precompute for every phase of this config, or give the trainer a teacher"
            )
        if missing:
            self.live.submit(key, [sequences[i] for i in missing], priority)
        self._pending[key] = _Pending(results, missing, sequences)

    def result(self, key: Hashable) -> list[TopK]:
        """The batch's ``TopK`` per sequence, blocking for the live teachers' part."""
        pending = self._pending.pop(key, None)
        if pending is None:
            raise KeyError(f"no submitted batch with key {key!r}")
        start = time.perf_counter()
        if pending.missing:
            for i, topk in zip(pending.missing, self.live.result(key), strict=True):
                ids = pending.sequences[i]
                pending.results[i] = self._writer.add(ids, topk) if self._writer is not None else topk
        self._last_wait = time.perf_counter() - start
        stats, hits = self.cache_stats, [r for i, r in enumerate(pending.results) if i not in pending.missing]
        stats.hit_sequences += len(hits)
        stats.hit_positions += sum(r.num_positions for r in hits)
        stats.miss_sequences += len(pending.missing)
        stats.miss_positions += sum(pending.results[i].num_positions for i in pending.missing)
        return pending.results

    def cancel(self, key: Hashable) -> None:
        pending = self._pending.pop(key, None)
        if pending is not None and pending.missing:
            self.live.cancel(key)

    def prefetch(self, batches: Iterable[B], to_sequences: Callable[[B], Sequence[np.ndarray]]) -> Prefetcher[B]:
        """As `TeacherClient.prefetch`."""
        return Prefetcher(self, batches, to_sequences)

    @property
    def prefetch_depth(self) -> int:
        return len(self._pending)

    def stats(self) -> TeacherClientStats:
        stats = self.live.stats() if self.live is not None else TeacherClientStats()
        return replace(
            stats,
            last_wait_seconds=self._last_wait,
            cache_hit_positions=self.cache_stats.hit_positions,
            cache_miss_positions=self.cache_stats.miss_positions,
        )

    def close(self) -> None:
        """Commit what write-through holds and close the live client. Idempotent."""
        if self._writer is not None:
            self._writer.close()
        if self.live is not None:
            self.live.close()

    def __enter__(self) -> CachedTeacher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect_teacher(config: TeacherClientConfig) -> TeacherClient | CachedTeacher:
    """The teacher the trainer reads top-K from: the cache in front of the live teachers when
    ``teacher.cache.dir`` is set, else the live teachers alone (not yet started)."""
    return CachedTeacher(config) if config.cache.dir else TeacherClient(config)
