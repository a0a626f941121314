"""Local demo: start the teacher on the tiny model, score sample sequences, stop it.

``python -m tests.devtools.teacher_demo --config deploy/configs/teacher.cpu.yaml``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from pathlib import Path

import numpy as np

from hyperdistill.common.codec import bytes_per_position
from hyperdistill.common.log import setup_logging
from hyperdistill.common.tokenizer import load_tokenizer
from hyperdistill.teacher_service.probe_client import ProbeClient
from tests.devtools.teacher_process import TeacherProcess
from tests.devtools.tiny_models import ensure_tiny_models

logger = logging.getLogger(__name__)

SAMPLE = [
    {"role": "system", "content": "You are a helpful coding agent."},
    {"role": "user", "content": "Fix the off-by-one error in utils/range.py: `range(1, n)` skips n."},
    {"role": "assistant", "content": "The loop must include n, so the upper bound becomes `n + 1`."},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="teacher YAML config")
    parser.add_argument("--top-k", type=int, default=20, help="top-K to request")
    parser.add_argument("--sequences", type=int, default=16, help="sample sequences to score")
    parser.add_argument("--length", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--log", default=".cache/demo-teacher.log", help="teacher log file")
    parser.add_argument("overrides", nargs="*", help="teacher config overrides, e.g. engine.kind=hf")
    args = parser.parse_args()
    setup_logging()
    models = ensure_tiny_models()
    tokenizer = load_tokenizer(models.teacher)
    chat = tokenizer.apply_chat_template(SAMPLE, tokenize=True, return_dict=True)["input_ids"]
    rng = np.random.default_rng(0)
    # Random ids over the real BPE range make up the bulk; the chat sample shows real tokens.
    sequences = [np.array(chat, dtype=np.int32)] + [
        rng.integers(0, len(tokenizer), args.length, dtype=np.int32) for _ in range(args.sequences - 1)
    ]
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    with TeacherProcess(args.config, args.overrides, log_path=args.log) as teacher:
        asyncio.run(_score(teacher.address, sequences, args.top_k, tokenizer))
        logger.info("stopping the teacher (SIGTERM)")
    logger.info("teacher exited with %d; its log is %s", teacher.proc.returncode, args.log)


async def _score(address: str, sequences, top_k: int, tokenizer) -> None:
    async with ProbeClient(address) as client:
        info = await client.info()
        logger.info(
            "teacher: engine=%s model=%s vocab=%d max_len=%d max_k=%d tokenizer=%s",
            info.engine,
            info.model,
            info.vocab_size,
            info.max_model_len,
            info.max_top_k,
            info.tokenizer_fingerprint[:12],
        )
        await client.score(sequences[:1], top_k)  # warm-up
        client.bytes_received = 0
        start = time.perf_counter()
        results = await client.score(sequences, top_k)
        seconds = time.perf_counter() - start
    positions = sum(r.num_positions for r in results)
    print(
        f"scored {len(sequences)} sequences, {positions} positions at K={top_k} in {seconds:.2f} s: "
        f"{positions / seconds:,.0f} positions/s"
    )
    print(
        f"wire: {client.bytes_received / positions:.1f} B/position "
        f"(packed payload {bytes_per_position(top_k, 'float16')} B)"
    )
    chat = results[0]
    tokens = tokenizer.convert_ids_to_tokens(sequences[0].tolist())
    print("teacher's top-3 next tokens at the last positions of the chat sample:")
    for i in range(chat.num_positions - 5, chat.num_positions):
        top = ", ".join(
            f"{tokenizer.convert_ids_to_tokens(int(t))!r} {p:.2f}"
            for t, p in zip(chat.ids[i, :3], chat.logprobs[i, :3], strict=True)
        )
        print(f"  after {tokens[i]!r:>14} -> actual {tokens[i + 1]!r} ({chat.target[i]:.2f}); top: {top}")


if __name__ == "__main__":
    main()
