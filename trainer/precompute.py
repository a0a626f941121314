"""Score every sequence of a training config once into the teacher top-K cache.

    python -m hyperdistill.trainer.precompute --config deploy/configs/trainer.yaml [key=value ...]

Every phase's training examples and the held-out set, deduplicated by their token hash (phases
share examples; ``teacher.cache`` keys entries by it), minus what the cache already holds, are
sent through the teacher service: all ``teacher.addresses`` (round robin), ``--in-flight``
batches outstanding, at a priority below any live training's, so a trainer sharing the teachers
(the warmup phase on GPUs 4-7) is served first. Answers are committed to the cache in shards
(``teacher.cache.shard_mib``); a kill or SIGTERM loses at most the shard being filled (SIGTERM
commits it), and the next run scores only what is missing. Prints a progress bar (positions/s,
ETA), serves Prometheus metrics on ``--metrics-port`` and ends with a summary (JSON on stdout and
in ``<cache>/precompute-<time>.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
from prometheus_client import Counter, Gauge
from tqdm import tqdm
from transformers import AutoConfig

from hyperdistill.common.codec import WIRE_DTYPES
from hyperdistill.common.config import load_config
from hyperdistill.common.log import setup_logging
from hyperdistill.common.metrics import start_metrics_server
from hyperdistill.common.tokenizer import load_tokenizer, tokenizer_fingerprint
from hyperdistill.trainer.config import TrainerConfig
from hyperdistill.trainer.data.phase import load_phase_data
from hyperdistill.trainer.distributed import DistInfo
from hyperdistill.trainer.teacher_cache import CacheKey, TeacherCache, sequence_hash
from hyperdistill.trainer.teacher_client import TeacherClient

logger = logging.getLogger(__name__)

# Below any live trainer's batch priorities (their batch index in the run): started last.
PRECOMPUTE_PRIORITY = 1 << 40

POSITIONS = Counter("precompute_positions_total", "Teacher positions added to the cache by this run.")
SEQUENCES = Counter("precompute_sequences_total", "Distinct sequences, by where they came from.", ["source"])
BYTES = Counter("precompute_cache_bytes_total", "Bytes of cache records written by this run.")
REMAINING = Gauge("precompute_remaining_positions", "Positions still to score.")
ETA = Gauge("precompute_eta_seconds", "Estimated seconds to finish, at this run's rate so far.")


def phase_sequences(config: TrainerConfig, tokenizer) -> list[np.ndarray]:
    """Every distinct sequence the trainer will ask the teacher for: each phase's training
    examples and held-out set, as the trainer sends them (int32 [T]), deduplicated by hash."""
    single = DistInfo(rank=0, world_size=1, local_rank=0, device=None)
    seen: dict[bytes, np.ndarray] = {}
    for phase in config.phases:
        data = load_phase_data(config, phase, tokenizer, single)
        for split in (data.train, data.held_out):
            for ids in split["input_ids"]:
                ids = np.asarray(ids, dtype=np.int32)
                seen.setdefault(sequence_hash(ids), ids)
    return list(seen.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the training run's YAML config (data, phases, teacher)")
    parser.add_argument("--in-flight", type=int, default=8, help="batches outstanding at the teachers (default 8)")
    parser.add_argument("--batch-sequences", type=int, default=4, help="sequences per batch (default 4)")
    parser.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics here (0: off)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. teacher.cache.dir=/cache/teacher")
    args = parser.parse_args(argv)
    config = load_config(TrainerConfig, args.config, args.overrides)
    setup_logging(config.log_level)
    if not config.teacher.cache.dir or not config.teacher.addresses:
        parser.error("precompute needs teacher.cache.dir and teacher.addresses (the teachers to score with)")
    if args.in_flight < 1 or args.batch_sequences < 1:
        parser.error("--in-flight and --batch-sequences must be >= 1")
    if args.metrics_port:
        start_metrics_server(config.metrics.host, args.metrics_port)
    summary = precompute(config, args.in_flight, args.batch_sequences)
    print(json.dumps(summary))
    return 0 if summary["complete"] else 1


def precompute(config: TrainerConfig, in_flight: int, batch_sequences: int) -> dict:
    """Fill the cache; returns the summary (see `main`)."""
    started = time.monotonic()
    tokenizer = load_tokenizer(config.student.path, config.student.chat_template)
    fingerprint = tokenizer_fingerprint(tokenizer)
    sequences = phase_sequences(config, tokenizer)
    stopping = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    client = TeacherClient(config.teacher)
    try:
        client.start(AutoConfig.from_pretrained(config.student.path).vocab_size, fingerprint)
        info = next(iter(client.infos.values()))
        dtype = next(name for name, (enum, _) in WIRE_DTYPES.items() if enum == info.dtype)
        cache_config = config.teacher.cache
        key = CacheKey(
            info.model, cache_config.teacher_revision, fingerprint, config.teacher.top_k, dtype, cache_config.encoding
        )
        cache = TeacherCache(cache_config.dir, key)
        todo = [ids for ids in sequences if sequence_hash(ids) not in cache]
        cached = len(sequences) - len(todo)
        SEQUENCES.labels(source="cache").inc(cached)
        total = sum(len(ids) - 1 for ids in todo)
        logger.info(
            "precompute: %d distinct sequences, %d already cached, %d positions to score into %s",
            len(sequences),
            cached,
            total,
            cache.root,
        )
        options = (in_flight, batch_sequences, cache_config.shard_mib << 20)
        scored, nbytes = _score_into(client, cache, todo, total, options, stopping, started)
    finally:
        client.close()
        signal.signal(signal.SIGTERM, previous)
    seconds = time.monotonic() - started
    summary = {
        "complete": scored == total,
        "sequences": len(sequences),
        "already_cached_sequences": cached,
        "positions_scored": scored,
        "positions_to_score": total,
        "cache_positions": cache.positions,
        "cache_bytes": cache.nbytes,
        "bytes_written": nbytes,
        "seconds": round(seconds, 1),
        "positions_per_second": round(scored / seconds, 1) if seconds else None,
        "cache": str(cache.root),
        "key": key.__dict__,
    }
    Path(cache.root, f"precompute-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(summary) + "\n")
    return summary


def _score_into(
    client: TeacherClient,
    cache: TeacherCache,
    todo: list[np.ndarray],
    total: int,
    options: tuple[int, int, int],
    stopping: list,
    started: float,
) -> tuple[int, int]:
    """Score ``todo`` into the cache, ``options`` = (batches in flight, sequences per batch, shard
    bytes); returns (positions scored, bytes written)."""
    in_flight, batch_sequences, shard_bytes = options
    writer = cache.writer(shard_bytes)
    batches = iter(enumerate(todo[i : i + batch_sequences] for i in range(0, len(todo), batch_sequences)))
    window: deque[tuple[int, list[np.ndarray]]] = deque()
    scored = 0
    bar = tqdm(total=total, unit="pos", unit_scale=True, desc="precompute", file=sys.stderr, smoothing=0.05)

    def fill() -> None:
        while len(window) < in_flight and (item := next(batches, None)) is not None:
            client.submit(item[0], item[1], priority=PRECOMPUTE_PRIORITY)
            window.append(item)

    try:
        fill()
        while window:
            index, batch = window.popleft()
            for ids, topk in zip(batch, client.result(index), strict=True):
                writer.add(ids, topk)
                scored += topk.num_positions
                POSITIONS.inc(topk.num_positions)
                bar.update(topk.num_positions)
            SEQUENCES.labels(source="teacher").inc(len(batch))
            rate = scored / max(time.monotonic() - started, 1e-9)
            REMAINING.set(total - scored)
            ETA.set((total - scored) / rate if rate else 0)
            if stopping:
                logger.warning("SIGTERM: committing what is scored (%d of %d positions) and stopping", scored, total)
                break
            fill()
    finally:
        bar.close()
        for index, _ in window:
            client.cancel(index)
        writer.close()
        BYTES.inc(writer.bytes_written)
    return scored, writer.bytes_written


if __name__ == "__main__":
    raise SystemExit(main())
