"""The teacher top-K cache: each distinct sequence scored once, read back every epoch from disk.

A phase's sequences do not change between epochs and the teacher is deterministic, so
``python -m hyperdistill.trainer.precompute`` scores every sequence once into this cache and the
trainer reads it (`CachedTeacher`) instead of asking the teacher again.

Layout (numpy with an index; no parsing on the read path)::

    <dir>/cache.json                       what produced it: `CacheKey` (teacher model and
                                           revision, tokenizer fingerprint, K, wire dtype,
                                           encoding), checked before any use
    <dir>/shards/<name>/data.bin           the records, one per sequence, back to back
    <dir>/shards/<name>/index.npy          structured [N]: hash (16 B), offset, positions
    <dir>/shards/<name>/shard.json         sha256 of data.bin, sequences, positions, bytes

A shard is written under ``<dir>/.tmp-<name>/``, fsynced and renamed into ``shards/``: a
rename is atomic, so a reader sees a whole shard or none, and a killed writer leaves only a
``.tmp-`` directory (removed by a later writer once an hour old). Several writers (precompute,
write-through on every rank) can add to one cache at once: each commits its own shards.
``index.npy`` and ``data.bin`` are memory-mapped; a shard's checksum is verified the first
time a process reads from it (about 0.2 s per 256 MiB). Sequences are keyed by a 128-bit
BLAKE2b of their int32 token ids, so any phase, epoch, rank or run that scores the same tokens finds the same entry.

Why not Arrow/Parquet or safetensors: a record is read whole by its hash, never scanned by
column, and the compact encoding is bit-packed bytes that neither format could compress or
slice further; a raw file plus an ``.npy`` index is read by a memory map and ``np.frombuffer``
with no dependency beyond numpy, and stays readable as long as numpy is.

Encodings (``teacher.cache.encoding``), bytes per position at K = 20:

- ``fp16`` (122 B): ids int32, log-probs and target log-prob float16; exactly what the wire
  carries at ``server.logprob_dtype: float16``.
- ``packed`` (64 B): ids in 18 bits (vocabularies up to 262,144; Qwen's is 151,936), the top-1
  and target log-probs in float16, and the other K - 1 log-probs as 6-bit codes of their gap
  below the top-1, log-companded (fine where probabilities are large, coarse in the tail, where
  an error weighs by its small probability). The top-1 is stored shifted so that the decoded
  top-K keeps the teacher's top-K mass exactly (to float16). ``python -m tests.bench.cache_encoding`` measures
  the relative error of the top-K KL and its gradient against float32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hyperdistill.common.codec import TopK

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ENCODINGS = ("fp16", "packed")
INDEX_DTYPE = np.dtype([("hash", "V16"), ("offset", "<u8"), ("positions", "<u4")])
# A ``.tmp-`` shard this old was left by a killed writer (a commit takes seconds).
STALE_TMP_SECONDS = 3600
ID_BITS = 18
GAP_BITS = 6
# Gap codes: g(c) = GAP_KNEE * (exp(c / a) - 1), with g(2^GAP_BITS - 1) = GAP_MAX nats; gaps past
# GAP_MAX (probabilities below e^-30 of the top-1's) get the last code.
GAP_MAX = 30.0
GAP_KNEE = 0.25  # nats: P7a's sweep (0.1-1) found 0.25 best across both teacher temperatures
_LEVELS = (1 << GAP_BITS) - 1
_GAP_A = _LEVELS / math.log1p(GAP_MAX / GAP_KNEE)
_GAP_TABLE = (GAP_KNEE * np.expm1(np.arange(_LEVELS + 1) / _GAP_A)).astype(np.float32)


class CacheMismatchError(ValueError):
    """A cache made by another teacher, tokenizer, K, dtype or encoding than this run's."""


class CacheMissError(LookupError):
    """A sequence is not in the cache and no teacher is configured to score it."""


@dataclass(frozen=True)
class CacheKey:
    """What produced a cache's entries; a cache is used only under an equal key."""

    teacher_model: str
    teacher_revision: str
    tokenizer_fingerprint: str
    top_k: int
    dtype: str | None
    """The teacher's wire dtype (``server.logprob_dtype``)."""
    encoding: str

    def mismatches(self, other: CacheKey) -> list[str]:
        """``field: <cache's> (cache) vs <this run's> (run)`` for every field that differs; a
        field this run does not know (None: the wire dtype when no teacher is up) is not compared."""
        return [
            f"{f.name}: {getattr(other, f.name)!r} (cache) vs {getattr(self, f.name)!r} (run)"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None and getattr(self, f.name) != getattr(other, f.name)
        ]


@dataclass(kw_only=True)
class CacheConfig:
    """``teacher.cache:`` in the trainer config."""

    dir: str | None = None
    """The cache directory; unset: no cache, every sequence goes to the teacher."""
    teacher_model: str | None = None
    """The teacher model the cache must hold (its ``GetInfo`` name). Required when
    ``teacher.addresses`` is empty (training from the cache alone); with live teachers it is
    checked against theirs when set."""
    teacher_revision: str = ""
    """The teacher checkpoint's revision (e.g. its hub commit), part of the cache's key: the
    service does not report it, so precompute and training must be told the same one."""
    encoding: str = "packed"
    """How new entries are stored: ``packed`` (64 B/position at K = 20) or ``fp16`` (122 B)."""
    write_through: bool = False
    """Store what the live teacher scores for sequences the cache lacks (the next epoch reads it)."""
    shard_mib: int = 256
    """A writer commits a shard once its records reach this size (and when it closes)."""

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if self.shard_mib < 1:
            raise ValueError(f"shard_mib must be >= 1, got {self.shard_mib}")


def sequence_hash(ids: np.ndarray) -> bytes:
    """128-bit BLAKE2b of the token ids as int32 little-endian: the cache key of one sequence."""
    return hashlib.blake2b(np.ascontiguousarray(ids, dtype="<i4").tobytes(), digest_size=16).digest()


def bytes_per_position(encoding: str, top_k: int) -> int:
    if encoding == "fp16":
        return top_k * 6 + 2
    return -(-(ID_BITS * top_k + GAP_BITS * (top_k - 1)) // 8) + 4


def encode(topk: TopK, encoding: str) -> bytes:
    """One sequence's ``TopK`` [P, K] as a record (see the module docstring)."""
    ids = np.ascontiguousarray(topk.ids, dtype="<i4")
    logprobs = np.asarray(topk.logprobs, dtype=np.float32)
    target = np.asarray(topk.target, dtype="<f2")
    if encoding == "fp16":
        return ids.tobytes() + logprobs.astype("<f2").tobytes() + target.tobytes()
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << ID_BITS):
        raise ValueError(f"packed encoding holds token ids below {1 << ID_BITS}, got {int(ids.max())}")
    gaps = np.maximum(logprobs[:, :1] - logprobs[:, 1:], 0.0)
    codes = np.minimum(np.rint(_GAP_A * np.log1p(gaps / GAP_KNEE)), _LEVELS).astype(np.uint32)
    # The stored top-1 is chosen so that the decoded top-K holds the teacher's top-K mass: the
    # tail bucket of the loss, 1 - that mass, then stays exact instead of absorbing every
    # rounding (without this the KL's relative error is 2-6e-3, with it 2-3e-4; bench P7a).
    decoded_gaps = np.concatenate([np.zeros((len(codes), 1), np.float32), _GAP_TABLE[codes]], axis=1)
    top1 = _logsumexp(logprobs.astype(np.float64)) - _logsumexp(-decoded_gaps.astype(np.float64))
    bits = np.concatenate([_bits(ids.astype(np.uint32), ID_BITS), _bits(codes, GAP_BITS)], axis=1)
    packed = np.packbits(bits, axis=1, bitorder="little")  # [P, ceil(bits / 8)]
    return packed.tobytes() + top1.astype("<f2").tobytes() + target.tobytes()


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """log sum exp over the last axis ([P, K] -> [P]); rows of -inf give -inf."""
    top = np.max(x, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(x - top).sum(-1)) + top[:, 0]).astype(np.float32)


def decode(record: memoryview | bytes, positions: int, top_k: int, encoding: str) -> TopK:
    """A record back to float32 ``TopK`` [positions, top_k]."""
    p, k = positions, top_k
    buf = np.frombuffer(record, dtype=np.uint8)
    if encoding == "fp16":
        ids = buf[: p * k * 4].view("<i4").reshape(p, k)
        logprobs = buf[p * k * 4 : p * k * 6].view("<f2").reshape(p, k).astype(np.float32)
        target = buf[p * k * 6 :].view("<f2").astype(np.float32)
        return TopK(ids.copy(), logprobs, target)
    width = -(-(ID_BITS * k + GAP_BITS * (k - 1)) // 8)
    bits = np.unpackbits(buf[: p * width].reshape(p, width), axis=1, bitorder="little")
    ids = _ints(bits[:, : ID_BITS * k], ID_BITS).astype(np.int32)
    codes = _ints(bits[:, ID_BITS * k : ID_BITS * k + GAP_BITS * (k - 1)], GAP_BITS)
    top1 = buf[p * width : p * width + 2 * p].view("<f2").astype(np.float32)
    target = buf[p * width + 2 * p :].view("<f2").astype(np.float32)
    logprobs = np.empty((p, k), dtype=np.float32)
    logprobs[:, 0] = top1
    logprobs[:, 1:] = top1[:, None] - _GAP_TABLE[codes]
    return TopK(ids, logprobs, target)


def _bits(values: np.ndarray, width: int) -> np.ndarray:
    """uint [P, n] -> bits uint8 [P, n * width], least significant first."""
    return ((values[..., None] >> np.arange(width, dtype=np.uint32)) & 1).astype(np.uint8).reshape(len(values), -1)


def _ints(bits: np.ndarray, width: int) -> np.ndarray:
    """bits uint8 [P, n * width] -> uint32 [P, n] (inverse of `_bits`)."""
    weights = (1 << np.arange(width, dtype=np.uint32)).astype(np.uint32)
    return (bits.reshape(len(bits), -1, width).astype(np.uint32) * weights).sum(-1, dtype=np.uint32)


class TeacherCache:
    """Reads (and, with `writer`, adds to) one cache directory.

    ``key`` is this run's `CacheKey`: a new directory is created with it; an existing one must
    have been made with the same key (`CacheMismatchError` names every difference). A cache
    made under another encoding is refused too: entries are decoded by the cache's own
    encoding, which must be this run's so write-through entries match the rest.
    """

    def __init__(self, root: str | Path, key: CacheKey):
        self.root, self.key = Path(root), key
        meta = self.root / "cache.json"
        if meta.exists():
            stored = json.loads(meta.read_text())
            if stored.get("format_version") != FORMAT_VERSION:
                raise CacheMismatchError(
                    f"teacher cache {self.root}: format_version {stored.get('format_version')} (cache) "
                    f"vs {FORMAT_VERSION} (this code)"
                )
            theirs = CacheKey(**stored["key"])
            if diff := key.mismatches(theirs):
                raise CacheMismatchError(
                    f"teacher cache {self.root} was made for another teacher set-up: {'; '.join(diff)}. "
                    "Point teacher.cache.dir at a cache of this teacher, or precompute a new one."
                )
        elif key.dtype is None:
            raise CacheMissError(f"teacher cache {self.root} does not exist (no cache.json): run precompute first")
        else:
            (self.root / "shards").mkdir(parents=True, exist_ok=True)
            body = json.dumps({"format_version": FORMAT_VERSION, "key": dataclasses.asdict(key)}, indent=2)
            _atomic_write(meta, body + "\n")
        self._shards: dict[str, _Shard] = {}
        self._entries: dict[bytes, tuple[_Shard, int, int]] = {}
        self.refresh()

    def refresh(self) -> int:
        """Pick up shards committed since the last look (by other writers); returns the count."""
        new = 0
        for path in sorted((self.root / "shards").iterdir()):
            if path.name in self._shards or not (path / "shard.json").exists():
                continue
            shard = _Shard(path)
            self._shards[path.name] = shard
            for row, entry in enumerate(shard.index):
                self._entries.setdefault(bytes(entry["hash"]), (shard, row, int(entry["positions"])))
            new += 1
        return new

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, sequence_key: bytes) -> bool:
        return sequence_key in self._entries

    @property
    def positions(self) -> int:
        return sum(positions for _, _, positions in self._entries.values())

    @property
    def nbytes(self) -> int:
        return sum(shard.nbytes for shard in self._shards.values())

    def get(self, ids: np.ndarray) -> TopK | None:
        """The cached ``TopK`` [T - 1, K] of sequence ``ids`` int [T], or None."""
        found = self._entries.get(sequence_hash(ids))
        if found is None:
            return None
        shard, row, positions = found
        if positions != len(ids) - 1:  # a hash collision would have to keep the length too
            raise RuntimeError(f"teacher cache {shard.path}: entry of {positions} positions for {len(ids)} tokens")
        return decode(shard.record(row), positions, self.key.top_k, self.key.encoding)

    def entries(self) -> Iterator[tuple[bytes, TopK]]:
        """Every (sequence hash, decoded ``TopK``) of the cache, shard by shard."""
        for key, (shard, row, positions) in self._entries.items():
            yield key, decode(shard.record(row), positions, self.key.top_k, self.key.encoding)

    def writer(self, shard_bytes: int) -> CacheWriter:
        return CacheWriter(self, shard_bytes)


class _Shard:
    def __init__(self, path: Path):
        self.path = path
        self.meta = json.loads((path / "shard.json").read_text())
        self.index = np.load(path / "index.npy", mmap_mode="r")
        self.nbytes = int(self.meta["bytes"])
        self._data: np.memmap | None = None

    def record(self, row: int) -> memoryview:
        if self._data is None:
            self._data = self._open_verified()
        start = int(self.index[row]["offset"])
        end = int(self.index[row + 1]["offset"]) if row + 1 < len(self.index) else self.nbytes
        return memoryview(self._data[start:end])

    def _open_verified(self) -> np.ndarray:
        data_path = self.path / "data.bin"
        if self.nbytes == 0:
            return np.zeros(0, dtype=np.uint8)
        data = np.memmap(data_path, dtype=np.uint8, mode="r")
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.meta["sha256"] or data.size != self.nbytes:
            raise RuntimeError(
                f"teacher cache shard {self.path} is corrupt: sha256 {digest[:16]}... of {data.size} bytes, "
                f"shard.json records {self.meta['sha256'][:16]}... of {self.nbytes}. Delete the shard "
                "directory and run precompute again (it scores only what is missing)."
            )
        return data


class CacheWriter:
    """Buffers records and commits them as shards of about ``shard_bytes`` (atomically; see the
    module docstring). ``close`` commits the rest. Entries already in the cache are skipped."""

    def __init__(self, cache: TeacherCache, shard_bytes: int):
        self.cache, self.shard_bytes = cache, shard_bytes
        self._records: list[bytes] = []
        self._index: list[tuple[bytes, int, int]] = []
        self._size = 0
        self._pending: set[bytes] = set()
        self.bytes_written = 0
        """Bytes of the records this writer committed."""
        for stale in cache.root.glob(".tmp-*"):
            # A killed writer's partial shard (old enough not to be another writer's, mid-commit).
            if time.time() - stale.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)

    def add(self, ids: np.ndarray, topk: TopK) -> TopK:
        """Store the teacher's answer for ``ids``; returns it as the cache will give it back (for
        ``packed``, quantised), so a run that reads it later sees the same numbers."""
        key = sequence_hash(ids)
        record = encode(topk, self.cache.key.encoding)
        stored = decode(record, topk.num_positions, self.cache.key.top_k, self.cache.key.encoding)
        if key in self.cache or key in self._pending:
            return stored
        self._pending.add(key)
        self._index.append((key, self._size, topk.num_positions))
        self._records.append(record)
        self._size += len(record)
        if self._size >= self.shard_bytes:
            self.flush()
        return stored

    def flush(self) -> None:
        """Commit the buffered records as one shard (nothing when empty)."""
        if not self._records:
            return
        name = f"{uuid.uuid4().hex}"
        tmp = self.cache.root / f".tmp-{name}"
        tmp.mkdir()
        data = b"".join(self._records)
        with open(tmp / "data.bin", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        index = np.array(self._index, dtype=INDEX_DTYPE)
        with open(tmp / "index.npy", "wb") as f:
            np.save(f, index)
            f.flush()
            os.fsync(f.fileno())
        meta = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "sequences": len(index),
            "positions": int(index["positions"].sum()),
            "bytes": len(data),
        }
        _atomic_write(tmp / "shard.json", json.dumps(meta) + "\n")
        os.rename(tmp, self.cache.root / "shards" / name)
        _fsync_dir(self.cache.root / "shards")
        self.bytes_written += len(data)
        logger.info("teacher cache: committed shard %s (%d sequences, %.1f MiB)", name, len(index), len(data) / 2**20)
        self._records, self._index, self._size, self._pending = [], [], 0, set()
        self.cache.refresh()

    def close(self) -> None:
        self.flush()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
