"""The teacher top-K cache: encodings, shards, keys, faults, and `CachedTeacher` in front of a client."""

from __future__ import annotations

import concurrent.futures
import json
import os
import time

import numpy as np
import pytest

from hyperdistill.common.codec import TopK
from hyperdistill.common.config import load_config
from hyperdistill.trainer.teacher_cache import (
    _GAP_A,
    ENCODINGS,
    GAP_KNEE,
    GAP_MAX,
    CacheKey,
    CacheMismatchError,
    CacheMissError,
    TeacherCache,
    bytes_per_position,
    decode,
    encode,
)
from hyperdistill.trainer.teacher_client import CachedTeacher, TeacherClientConfig, TeacherClientStats

K = 20
KEY = CacheKey("teacher-480b", "abc123", "fp" * 32, K, "float16", "packed")


def _topk(positions: int, seed: int = 0, vocab: int = 151936) -> TopK:
    """A realistic top-K: distinct ids, log-probs sorted descending from a peaked softmax."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((positions, 512)) * 3
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    order = np.argsort(-logprobs, axis=1)[:, :K]
    ids = np.stack([rng.choice(vocab, K, replace=False) for _ in range(positions)]).astype(np.int32)
    top = np.take_along_axis(logprobs, order, 1).astype(np.float16).astype(np.float32)  # as the wire sends it
    return TopK(ids, top, top[:, 3].copy())


def _sequence(length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 151936, length).astype(np.int32)


def test_fp16_encoding_is_exact_for_what_the_fp16_wire_carries():
    topk = _topk(300)
    record = encode(topk, "fp16")
    assert len(record) == 300 * bytes_per_position("fp16", K) == 300 * 122
    back = decode(record, 300, K, "fp16")
    for field in ("ids", "logprobs", "target"):
        assert np.array_equal(getattr(back, field), getattr(topk, field)), field


def test_packed_encoding_is_64_bytes_keeps_ids_order_and_the_top_k_mass():
    topk = _topk(500, seed=1)
    record = encode(topk, "packed")
    assert len(record) == 500 * bytes_per_position("packed", K) == 500 * 64
    back = decode(record, 500, K, "packed")
    assert np.array_equal(back.ids, topk.ids)
    assert (np.diff(back.logprobs, axis=1) <= 0).all()  # still sorted
    mass = np.log(np.exp(topk.logprobs.astype(np.float64)).sum(1))
    back_mass = np.log(np.exp(back.logprobs.astype(np.float64)).sum(1))
    np.testing.assert_allclose(back_mass, mass, atol=2e-3)  # the top-1 is stored in float16
    # Each gap below the top-1 within half a code step of the log-companded scale: 0.005 nats
    # at the top, 0.04 one nat below it, wider in the tail where probabilities are small.
    gap, back_gap = topk.logprobs[:, :1] - topk.logprobs, back.logprobs[:, :1] - back.logprobs
    half_step = (GAP_KNEE + gap) * np.expm1(0.5 / _GAP_A)
    assert (np.abs(back_gap - gap) <= half_step + 1e-5)[gap < GAP_MAX].all()
    np.testing.assert_allclose(back.target, topk.target, rtol=1e-3)


def test_packed_encoding_refuses_ids_beyond_18_bits():
    topk = _topk(2, vocab=1 << 19)
    topk.ids[0, 0] = (1 << 18) + 5
    with pytest.raises(ValueError, match="below 262144"):
        encode(topk, "packed")


def test_gaps_past_the_last_code_decode_to_it():
    topk = _topk(3)
    topk.logprobs[:, -1] = topk.logprobs[:, 0] - 80  # a probability e^-80 below the top-1
    back = decode(encode(topk, "packed"), 3, K, "packed")
    assert np.allclose(back.logprobs[:, 0] - back.logprobs[:, -1], GAP_MAX, atol=0.01)


def _fill(root, key=KEY, count=6, shard_bytes=1, seed=0) -> list[tuple[np.ndarray, TopK]]:
    cache = TeacherCache(root, key)
    writer = cache.writer(shard_bytes)
    entries = []
    for i in range(count):
        ids = _sequence(10 + i, seed * 100 + i)
        entries.append((ids, writer.add(ids, _topk(len(ids) - 1, seed=i))))
    writer.close()
    return entries


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_entries_read_back_as_written_after_a_reopen(tmp_path, encoding):
    key = CacheKey("t", "", "fp", K, "float16", encoding)
    entries = _fill(tmp_path, key)
    cache = TeacherCache(tmp_path, key)
    assert len(cache) == 6 and len(list((tmp_path / "shards").iterdir())) == 6  # shard_bytes=1: one each
    for ids, stored in entries:
        got = cache.get(ids)
        assert np.array_equal(got.ids, stored.ids) and np.array_equal(got.logprobs, stored.logprobs)
    assert cache.get(_sequence(12, 999)) is None
    assert cache.positions == sum(len(ids) - 1 for ids, _ in entries)


def test_another_teacher_tokenizer_k_or_encoding_is_refused_naming_both_sides(tmp_path):
    _fill(tmp_path)
    other = CacheKey("teacher-30b", "abc123", "fp" * 32, 16, "float16", "packed")
    with pytest.raises(CacheMismatchError) as err:
        TeacherCache(tmp_path, other)
    message = str(err.value)
    assert "teacher_model: 'teacher-480b' (cache) vs 'teacher-30b' (run)" in message
    assert "top_k: 20 (cache) vs 16 (run)" in message
    assert "tokenizer_fingerprint" not in message  # equal fields are not listed


def test_a_killed_writers_partial_shard_is_never_read_and_is_cleaned_up_once_stale(tmp_path):
    entries = _fill(tmp_path, count=2)
    partial = tmp_path / ".tmp-deadbeef"
    partial.mkdir()
    (partial / "data.bin").write_bytes(b"half a shard")
    cache = TeacherCache(tmp_path, KEY)
    assert len(cache) == 2
    cache.writer(1 << 20).close()
    assert partial.exists()  # young: may be another writer's shard being committed
    os.utime(partial, (time.time() - 7200, time.time() - 7200))
    cache.writer(1 << 20).close()
    assert not partial.exists()
    assert cache.get(entries[0][0]) is not None


def test_a_corrupt_shard_is_refused_by_name_on_first_read(tmp_path):
    (ids, _), *_ = _fill(tmp_path, count=1)
    (shard,) = (tmp_path / "shards").iterdir()
    data = bytearray((shard / "data.bin").read_bytes())
    data[7] ^= 0xFF
    (shard / "data.bin").write_bytes(bytes(data))
    cache = TeacherCache(tmp_path, KEY)
    with pytest.raises(RuntimeError, match=f"shard {shard} is corrupt.*Delete the shard"):
        cache.get(ids)


def test_shards_of_another_writer_appear_after_refresh_and_duplicates_are_not_stored(tmp_path):
    reader = TeacherCache(tmp_path, KEY)
    entries = _fill(tmp_path, count=3)
    assert len(reader) == 0
    assert reader.refresh() == 3 and len(reader) == 3
    writer = reader.writer(1 << 20)
    writer.add(entries[0][0], _topk(len(entries[0][0]) - 1))
    writer.close()
    assert writer.bytes_written == 0 and reader.refresh() == 0


class _FakeLive:
    """The part of `TeacherClient` that `CachedTeacher` uses; answers with `_topk` per sequence."""

    def __init__(self):
        self.asked: list[int] = []
        self._futures = {}

    def submit(self, key, sequences, priority=0):
        self.asked += [len(s) for s in sequences]
        future = concurrent.futures.Future()
        future.set_result([_topk(len(s) - 1, seed=len(s)) for s in sequences])
        self._futures[key] = future

    def result(self, key):
        return self._futures.pop(key).result()

    def cancel(self, key):
        self._futures.pop(key, None)

    def stats(self):
        return TeacherClientStats()

    def close(self):
        pass


def _cached_teacher(tmp_path, *overrides: str, live: bool) -> CachedTeacher:
    config = load_config(
        TeacherClientConfig,
        None,
        [f"cache.dir={tmp_path}", "cache.teacher_model=teacher-480b", "cache.teacher_revision=abc123", *overrides],
    )
    teacher = CachedTeacher(config)
    teacher.live = _FakeLive() if live else None
    return teacher


def _open(teacher: CachedTeacher, dtype: str | None) -> None:
    """`start` without a real client: the cache under this run's key."""
    key = CacheKey("teacher-480b", "abc123", "fp" * 32, K, dtype, teacher.config.cache.encoding)
    teacher.cache = TeacherCache(teacher.config.cache.dir, key)
    if teacher.config.cache.write_through and teacher.live is not None:
        teacher._writer = teacher.cache.writer(teacher.config.cache.shard_mib << 20)


def test_write_through_stores_misses_as_the_cache_returns_them(tmp_path):
    teacher = _cached_teacher(tmp_path, "cache.write_through=true", "addresses=[h:1]", live=True)
    _open(teacher, "float16")
    batch = [_sequence(30, 1), _sequence(40, 2)]
    teacher.submit("b0", batch)
    first = teacher.result("b0")
    teacher.close()  # commits the write-through shard
    assert teacher.live.asked == [30, 40]
    again = _cached_teacher(tmp_path, "addresses=[]", live=False)
    _open(again, None)  # no teacher: the wire dtype is not known, and not compared
    again.submit("b0", batch)
    second = again.result("b0")
    for a, b in zip(first, second, strict=True):  # a resumed run sees the same numbers
        assert np.array_equal(a.logprobs, b.logprobs) and np.array_equal(a.ids, b.ids)
    assert again.cache_stats.hit_sequences == 2 and again.cache_stats.miss_sequences == 0


def test_cache_only_miss_fails_clearly_and_hits_need_no_teacher(tmp_path):
    entries = _fill(tmp_path, count=2)
    teacher = _cached_teacher(tmp_path, "addresses=[]", live=False)
    _open(teacher, None)
    teacher.submit("ok", [ids for ids, _ in entries])
    assert [t.num_positions for t in teacher.result("ok")] == [len(ids) - 1 for ids, _ in entries]
    with pytest.raises(CacheMissError, match="1 of 2 sequences are not in the teacher cache.*run precompute"):
        teacher.submit("miss", [entries[0][0], _sequence(50, 77)])


def test_only_the_missing_sequences_of_a_batch_go_to_the_teacher(tmp_path):
    entries = _fill(tmp_path, count=1)
    teacher = _cached_teacher(tmp_path, "addresses=[h:1]", live=True)
    _open(teacher, "float16")
    teacher.submit("b", [entries[0][0], _sequence(25, 5)])
    results = teacher.result("b")
    assert teacher.live.asked == [25] and [r.num_positions for r in results] == [len(entries[0][0]) - 1, 24]
    assert (teacher.cache_stats.hit_sequences, teacher.cache_stats.miss_sequences) == (1, 1)


def test_no_addresses_needs_a_cache_and_its_teacher_model():
    with pytest.raises(ValueError, match="addresses is empty: set cache.dir and cache.teacher_model"):
        TeacherClientConfig(addresses=[])


def test_cache_json_records_the_key(tmp_path):
    _fill(tmp_path, count=1)
    meta = json.loads((tmp_path / "cache.json").read_text())
    assert meta["key"]["teacher_model"] == "teacher-480b" and meta["key"]["encoding"] == "packed"


def test_precompute_stopped_by_sigterm_commits_what_it_scored_and_cancels_the_rest(tmp_path):
    from hyperdistill.trainer.precompute import _score_into

    class Client(_FakeLive):
        def __init__(self, stopping):
            super().__init__()
            self.stopping, self.cancelled = stopping, []

        def result(self, key):
            self.stopping.append(True)  # SIGTERM arrives while the first batch is awaited
            return super().result(key)

        def cancel(self, key):
            self.cancelled.append(key)
            super().cancel(key)

    stopping: list = []
    client = Client(stopping)
    todo = [_sequence(20 + i, i) for i in range(8)]
    cache = TeacherCache(tmp_path, KEY)
    scored, nbytes = _score_into(client, cache, todo, sum(len(s) - 1 for s in todo), (3, 2, 1 << 20), stopping, 0.0)
    assert scored == 19 + 20 and nbytes == 39 * 64  # the first batch (2 sequences), committed
    assert client.cancelled == [1, 2]  # the batches still in flight
    assert len(TeacherCache(tmp_path, KEY)) == 2
