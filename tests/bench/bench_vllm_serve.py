"""vLLM's own OpenAI server as the peer of P1-P3: start it, score over HTTP, parse its JSON.

``vllm serve`` runs from the same venv on a free loopback port with the tiny teacher and the
engine settings of ``deploy/configs/teacher.cpu.yaml`` (dtype, max length, batch token budget,
sequences, KV bytes, eager, no prefix caching), so both servers drive the same engine the same
way. A sequence is one ``POST /v1/completions`` with ``prompt`` = the token ids,
``max_tokens=1`` and ``prompt_logprobs=K``: what a user would script against it.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from tests.bench.bench_common import ROOT, TEACHER_CPU_CONFIG

logger = logging.getLogger(__name__)

SERVED_NAME = "teacher"


class VllmServe:
    """``python -m vllm.entrypoints.openai.api_server`` as a child; ``with`` waits for /health and stops it."""

    def __init__(self, model: Path, port: int, log_path: Path, max_top_k: int = 20, startup_timeout: float = 600):
        engine = yaml.safe_load(TEACHER_CPU_CONFIG.read_text())["engine"]
        self.port = port
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--served-model-name",
            SERVED_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            str(engine["dtype"]),
            "--max-logprobs",
            str(max_top_k),
            "--max-model-len",
            str(engine["max_model_len"]),
            "--max-num-batched-tokens",
            str(engine["max_num_batched_tokens"]),
            "--max-num-seqs",
            str(engine["max_num_seqs"]),
            "--kv-cache-memory-bytes",
            str(engine["kv_cache_memory_bytes"]),
            "--no-enable-prefix-caching",
            "--disable-uvicorn-access-log",
            "--disable-log-stats",
            *(["--enforce-eager"] if engine.get("enforce_eager") else []),
        ]
        self.proc: subprocess.Popen | None = None

    def start(self) -> VllmServe:
        """Start without waiting (``__enter__`` then waits), so other servers can load meanwhile."""
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
            )
        return self

    def __enter__(self) -> VllmServe:
        if self.proc is None:
            self.start()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"vllm serve not healthy after {self.startup_timeout:.0f} s; log: {self.log_path}")

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (it stops its engine core), then SIGKILL to its own process group past ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def complete(port: int, token_ids: np.ndarray, top_k: int) -> bytes:
    """One sequence's prompt log-probs: the raw HTTP response body (JSON)."""
    body = json.dumps({"model": SERVED_NAME, "prompt": token_ids.tolist(), "max_tokens": 1, "prompt_logprobs": top_k})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"vllm serve answered {response.status}: {data[:500]!r}")
    return data


def score_http(port: int, sequences: list[np.ndarray], top_k: int, workers: int = 4) -> tuple[list[bytes], float]:
    """All sequences over ``workers`` concurrent connections; returns the bodies in order and the wall time."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        bodies = list(pool.map(lambda ids: complete(port, ids, top_k), sequences))
    return bodies, time.perf_counter() - start


def parse_body(body: bytes, token_ids: np.ndarray, top_k: int):
    """P2, JSON: a response body -> ids int32 [P, K], logprobs float32 [P, K] (by rank), target float32 [P].

    Entry j of ``prompt_logprobs`` is the distribution of token j (entry 0 is null): our position
    i is entry i + 1. Each entry maps token id (a string) to {logprob, rank, decoded_token} for
    the top-K and, when it is not among them, the actual token.
    """
    entries = json.loads(body)["choices"][0]["prompt_logprobs"][1:]
    num = len(entries)
    ids = np.empty((num, top_k), dtype=np.int32)
    logprobs = np.empty((num, top_k), dtype=np.float32)
    target = np.empty(num, dtype=np.float32)
    for i, entry in enumerate(entries):
        actual = str(int(token_ids[i + 1]))
        for token, item in entry.items():
            rank = item["rank"]
            if rank <= top_k:
                ids[i, rank - 1] = int(token)
                logprobs[i, rank - 1] = item["logprob"]
        target[i] = entry[actual]["logprob"]
    return ids, logprobs, target


def decode_bodies(bodies: list[bytes], sequences: list[np.ndarray], top_k: int) -> list:
    """P2, JSON: bodies -> the same torch tensors as ``bench_grpc.decode_chunks``."""
    import torch

    out = []
    for body, ids in zip(bodies, sequences, strict=True):
        arrays = parse_body(body, ids, top_k)
        out.append(tuple(torch.from_numpy(a) for a in arrays))
    return out
