"""R2 teacher faults and R3 trainer crashes: a training run disturbed by SIGKILLs at seeded random
points must train exactly what an uninterrupted run of the same config trains.

Every run is torchrun x2 (gloo, CPU) on the tiny student against transformers teachers that run
one request per forward, so that their answers are bitwise reproducible across processes
(tests/test_trainer_e2e.py). The data are the fixture's resolved trajectories without their tool
schemas (prompts of ~280 tokens instead of ~1,030, sequences cut at 384 tokens): a step takes
seconds, not a minute. A disturbed run is compared with the reference run step by step: each
rank's micro-batches (trajectory ids, ``trajectories_rank{r}.jsonl``), each step's loss
(``log.jsonl``) and, with ``torch.equal``, the hypernetwork weights of the final checkpoint.

R2: teachers are SIGKILLed at random steps (at a random moment inside the step) and restarted on
their port; with two replicas one can be killed for good. The trainer never restarts, so its logs
must equal the reference's line for line.

R3: the whole trainer (torchrun and its ranks) is SIGKILLed at random moments, some while a
checkpoint is being written (as soon as a file appears in its ``step_N.tmp`` directory), and
restarted with ``checkpoint.resume: auto``. Every restart must resume from the newest complete
checkpoint on disk at the kill, never from a ``.tmp`` one; steps trained again after a restart must
repeat the reference exactly; the checkpoint directory is polled every few milliseconds for the
most step directories (complete and ``.tmp``) it ever holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from hyperdistill.trainer.checkpoint import complete_checkpoints
from tests.devtools.teacher_process import TeacherProcess
from tests.devtools.tiny_models import TinyModels
from tests.test_trainer_e2e import TEACHER_OVERRIDES, losses, trained_batches, trainer_command

ROOT = Path(__file__).resolve().parents[2]
TEACHER_CONFIG = ROOT / "deploy/configs/teacher.cpu.yaml"
SOURCE = ROOT / "tests/fixtures/swe_rebench_sample.jsonl"
RANKS = 2
STEP_SECONDS = 3.0
"""About one training step here: a kill lands up to this long after the step that arms it."""
POLL_SECONDS = 0.005
RUN_TIMEOUT = 900.0
_RESUMED = re.compile(r"\[rank (\d+)\]: resumed from (\S+)")


def short_trajectories(out: Path) -> Path:
    """The fixture's resolved rows with an empty tool list (the tool schemas are ~750 of a prompt's ~1,030 tokens)."""
    rows = [json.loads(line) for line in SOURCE.read_text().splitlines()]
    out.write_text("".join(json.dumps({**row, "tools": []}) + "\n" for row in rows if row.get("resolved") == 1))
    return out


@dataclass(kw_only=True)
class FaultBench:
    """What a reference run and its disturbed copies share: the work directory, models, data, schedule."""

    work: Path
    models: TinyModels
    steps: int = 12
    """Optimizer steps of every run (8 examples, 1 per micro-batch: 4 steps per epoch)."""
    every_steps: int = 2
    """checkpoint.every_steps."""
    keep_last: int = 2
    """checkpoint.keep_last."""
    source: Path = field(init=False)

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.source = short_trajectories(self.work / "short_trajectories.jsonl")

    def teacher(self, name: str, port: int | None = None) -> TeacherProcess:
        """A (not yet started) bitwise-reproducible teacher, its log in ``work/<name>.log``."""
        return TeacherProcess(
            TEACHER_CONFIG,
            [f"engine.model={self.models.teacher}", *TEACHER_OVERRIDES],
            log_path=self.work / f"{name}.log",
            port=port,
        )

    def launch(self, run_dir: Path, addresses: list[str], name: str) -> Launch:
        """Start torchrun, its output in ``work/<name>.log``."""
        phases = (
            f"phases=[{{name: main, lr: 0.002, epochs: {self.steps}, max_samples: 8, max_steps: {self.steps}, "
            "warmup_steps: 1, min_lr_ratio: 0.1}]"
        )
        command = trainer_command(
            run_dir,
            ", ".join(addresses),
            self.models,
            self.work / "data",
            phases,
            f"data.source={self.source}",
            "data.max_length=384",
            "data.token_budget=384",
            f"checkpoint.every_steps={self.every_steps}",
            f"checkpoint.keep_last={self.keep_last}",
            # One batch ahead: a teacher killed mid-step is usually scoring; short backoff: restarts cost less.
            "teacher.prefetch_batches=1",
            "teacher.backoff_max_seconds=2",
        )
        log = self.work / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        return Launch(proc, log, run_dir)


class Launch:
    """One torchrun invocation and what it has logged so far."""

    def __init__(self, proc: subprocess.Popen, log: Path, run_dir: Path):
        self.proc, self.log, self.run_dir = proc, log, run_dir
        self.started = time.time()
        self._base = self._loss_lines()
        self._size, self._steps = -1, 0

    def _loss_lines(self) -> int:
        path = self.run_dir / "log.jsonl"
        return path.read_text().count('"loss"') if path.exists() else 0

    def steps(self) -> int:
        """Steps logged by this invocation (log.jsonl is re-read only when it grew)."""
        path = self.run_dir / "log.jsonl"
        size = path.stat().st_size if path.exists() else 0
        if size != self._size:
            self._size, self._steps = size, self._loss_lines() - self._base
        return self._steps

    def resumed_from(self) -> dict[int, str]:
        """rank -> the checkpoint it logged ``resumed from``."""
        return {int(rank): path for rank, path in _RESUMED.findall(self.log.read_text())}

    def resubmitted(self) -> int:
        """Teacher requests the ranks' clients resubmitted after a stream failed."""
        return sum(int(n) for n in re.findall(r"resubmitting (\d+) requests", self.log.read_text()))

    def tail(self, lines: int = 40) -> str:
        return f"--- {self.log} ---\n" + "\n".join(self.log.read_text().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL torchrun and every rank at once (each rank runs in a session of its own)."""
        if self.proc.poll() is not None:
            return
        victims = []
        with contextlib.suppress(psutil.NoSuchProcess):
            parent = psutil.Process(self.proc.pid)
            parent.suspend()  # it can no longer start or signal anyone
            victims = [parent, *parent.children(recursive=True)]
        for victim in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.send_signal(signal.SIGKILL)
        self.proc.wait()
        psutil.wait_procs(victims, timeout=30)

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        """The exit code; past ``timeout`` the trainer is killed and TimeoutError raised."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"trainer still running after {timeout:.0f} s\n{self.tail()}") from None

    def drive(self, tick: Callable[[], bool], timeout: float = RUN_TIMEOUT) -> bool:
        """Call ``tick`` every few ms until it returns True (the trainer still runs: True) or the
        trainer exits (False)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if tick():
                return True
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"trainer still running after {timeout:.0f} s\n{self.tail()}")
            time.sleep(POLL_SECONDS)
        return False


class CheckpointWatch:
    """Polls a checkpoint directory: the most ``step_*`` directories (complete or ``.tmp``) seen."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.most = 0
        self.polls = 0

    def _steps(self) -> list[os.DirEntry]:
        with contextlib.suppress(FileNotFoundError):
            return [e for e in os.scandir(self.dir) if e.name.startswith("step_") and e.is_dir()]
        return []

    def poll(self) -> None:
        self.most = max(self.most, len(self._steps()))
        self.polls += 1

    def partial(self) -> list[str]:
        """The ``.tmp`` directories now, with `` (.metadata)`` when DCP had finished writing into one."""
        return sorted(
            e.name + (" (.metadata)" if os.path.exists(os.path.join(e.path, ".metadata")) else "")
            for e in self._steps()
            if e.name.endswith(".tmp")
        )

    def writing_since(self, since: float) -> bool:
        """A ``.tmp`` directory holds a file written at or after ``since`` (time.time()): a save
        is in progress (a ``.tmp`` left by an earlier kill holds only older files)."""
        for entry in self._steps():
            if entry.name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    if any(f.stat().st_mtime >= since for f in os.scandir(entry.path)):
                        return True
        return False


def run_reference(bench: FaultBench, address: str) -> Path:
    """The uninterrupted run every disturbed run is compared with."""
    run_dir = bench.work / "reference"
    launch = bench.launch(run_dir, [address], "reference-trainer")
    if launch.wait() != 0:
        raise RuntimeError(f"the reference run failed\n{launch.tail()}")
    return run_dir


def _records(run_dir: Path) -> dict[str, list[tuple[int, object]]]:
    """(step, value) in logged order: each step's loss, each rank's micro-batch trajectory ids."""
    return {"loss": losses(run_dir), **{f"rank {r}": trained_batches(run_dir, r) for r in range(RANKS)}}


def compare_logs(run_dir: Path, reference: Path, resumed: list[int], ends: list[dict[str, int]]) -> dict:
    """Every record of ``run_dir`` against the reference's record of its step.

    ``resumed[i]``: the step invocation i resumed at (0: fresh); ``ends[i]``: the number of records
    of each log once it had ended. Invocation i must log steps resumed[i] + 1, + 2, ... (nothing
    skipped, nothing repeated but the steps after its checkpoint) and the last must end at the
    reference's last step. Returns micro-batches compared, how many of them were trained again,
    and a list of problems (empty: identical)."""
    want = {name: dict(records) for name, records in _records(reference).items()}
    problems, batches, distinct = [], 0, 0
    for name, records in _records(run_dir).items():
        start = 0
        for first, end in zip(resumed, ends, strict=True):
            steps = [step for step, _ in records[start : end[name]]]
            if steps != list(range(first + 1, first + 1 + len(steps))):
                problems.append(f"{name}: resumed at step {first}, then logged steps {steps}")
            start = end[name]
        if not records or records[-1][0] != max(want[name]):
            problems.append(f"{name}: the last step logged is {records[-1:]}, not {max(want[name])}")
        problems += [
            f"{name}: step {step} differs from the reference"
            for step, value in records
            if value != want[name].get(step)
        ]
        if name.startswith("rank"):
            batches += len(records)
            distinct += len({step for step, _ in records})
    return {"batches": distinct, "retrained": batches - distinct, "problems": problems}


def final_weights_equal(run_dir: Path, reference: Path, steps: int) -> bool:
    """The hypernetwork of both final checkpoints, tensor by tensor (``torch.equal``)."""
    expected, got = (_final_model(d, steps) for d in (reference, run_dir))
    return expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def _final_model(run_dir: Path, steps: int) -> dict[str, torch.Tensor]:
    out = run_dir / "final_checkpoint.pt"
    if not out.exists():
        dcp_to_torch_save(run_dir / "checkpoints" / f"step_{steps:06d}", out)
    return torch.load(out, weights_only=True)["model"]


@dataclass
class TeacherKill:
    """SIGKILL replica ``replica`` ``delay`` s after the trainer logged step ``after_step`` (and
    the replica, if restarted before, serves again)."""

    after_step: int
    delay: float
    replica: int
    restart: bool
    """Start a new teacher on its port at once (False: killed for good)."""


def teacher_kill_plan(rng: random.Random, steps: int, restarts: int, lost: bool) -> list[TeacherKill]:
    """``restarts`` kills of replica 0, each restarted; first, if ``lost``, replica 1 killed for good.
    Kills arm at steps 1 .. steps - 3, so the trainer still asks the teacher for batches after each."""
    points = sorted(rng.randint(1, steps - 3) for _ in range(restarts + lost))
    replicas = [1] * lost + [0] * restarts
    return [
        TeacherKill(step, rng.uniform(0, STEP_SECONDS), replica, replica == 0)
        for step, replica in zip(points, replicas, strict=True)
    ]


def run_teacher_faults(
    bench: FaultBench, reference: Path, name: str, replicas: int, restarts: int, lost: bool, seed: int
) -> dict:
    """R2: one training run while teachers are killed as planned; compared with ``reference``.
    ``name`` (no spaces) names the scenario, its run directory and logs."""
    plan = teacher_kill_plan(random.Random(seed), bench.steps, restarts, lost)
    teachers = [bench.teacher(f"{name}-teacher{i}").start() for i in range(replicas)]
    everyone = list(teachers)
    run_dir, done = bench.work / name, []
    launch = bench.launch(run_dir, [t.address for t in teachers], f"{name}-trainer")

    def tick() -> bool:
        kill = plan[len(done)] if len(done) < len(plan) else None
        if kill is not None and launch.steps() >= kill.after_step:
            victim = teachers[kill.replica]
            victim.wait_serving()  # a restarted teacher is killed once it serves again
            time.sleep(kill.delay)
            victim.proc.kill()
            victim.proc.wait()
            if kill.restart:
                teachers[kill.replica] = bench.teacher(f"{name}-teacher{kill.replica}-{len(done)}", victim.port).start()
                everyone.append(teachers[kill.replica])
            done.append(kill)
        return False

    try:
        launch.drive(tick)
        code = launch.wait()
    finally:
        launch.kill()
        for teacher in everyone:
            teacher.stop()
    ends = {key: len(records) for key, records in _records(run_dir).items()}
    points = [
        f"step {k.after_step} +{k.delay:.1f} s" + ("" if k.restart else f" (replica {k.replica}, for good)")
        for k in done
    ]
    return {
        "scenario": f"R2 {name}",
        "planned": len(plan),
        "kills": len(done),
        "points": points,
        "restarts": sum(k.restart for k in done),
        "exit_code": code,
        "resubmitted": launch.resubmitted(),
        **compare_logs(run_dir, reference, [0], [ends]),
        "weights_equal": code == 0 and final_weights_equal(run_dir, reference, bench.steps),
        "log": str(launch.log),
    }


def _kill_trigger(
    kind: str, rng: random.Random, bench: FaultBench, launch: Launch, watch: CheckpointWatch
) -> Callable[[], bool]:
    """When to kill, once a complete checkpoint exists (so that the restart has one to resume from):
    ``checkpoint``: as soon as this invocation has written a file of a checkpoint; ``random``: a
    random time (up to STEP_SECONDS) after its 1st .. (every_steps + 1)-th step."""
    directory = watch.dir
    if kind == "checkpoint":
        return lambda: watch.writing_since(launch.started) and bool(complete_checkpoints(directory))
    after_steps, delay, armed = rng.randint(1, bench.every_steps + 1), rng.uniform(0, STEP_SECONDS), []

    def fire() -> bool:
        if not armed and launch.steps() >= after_steps and complete_checkpoints(directory):
            armed.append(time.monotonic())
        return bool(armed) and time.monotonic() - armed[0] >= delay

    return fire


def run_trainer_crashes(
    bench: FaultBench, reference: Path, address: str, kills: int, mid_checkpoint: int, seed: int
) -> dict:
    """R3: SIGKILL the trainer ``kills`` times (``mid_checkpoint`` of them while it writes a
    checkpoint), restarting it each time; compared with ``reference``."""
    rng = random.Random(seed)
    kinds = ["checkpoint"] * mid_checkpoint + ["random"] * (kills - mid_checkpoint)
    rng.shuffle(kinds)
    run_dir = bench.work / "trainer-kills"
    watch = CheckpointWatch(run_dir / "checkpoints")
    launches, events, ends = [], [], []
    for index, kind in enumerate([*kinds, None]):
        launch = bench.launch(run_dir, [address], f"trainer-kills-{index}")
        launches.append(launch)
        fire = _kill_trigger(kind, rng, bench, launch, watch) if kind else lambda: False
        killed = launch.drive(lambda fire=fire: watch.poll() or fire())
        if killed:
            launch.kill()
            watch.poll()
            newest = complete_checkpoints(watch.dir)
            logged, partial = losses(run_dir), watch.partial()
            point = f"step {logged[-1][0] if logged else 0} ({kind}" + "".join(f", left {p}" for p in partial) + ")"
            events.append({"point": point, "partial": partial, "newest": str(newest[-1]) if newest else None})
        ends.append({key: len(records) for key, records in _records(run_dir).items()})
        if not killed:
            break
    code = launches[-1].wait()
    resumed, problems = _check_resumes(launches, events)
    logs = compare_logs(run_dir, reference, resumed, ends)
    return {
        "scenario": "R3 trainer-kills",
        "planned": kills,
        "kills": len(events),
        "restarts": len(launches) - 1,
        "exit_code": code,
        "points": [e["point"] for e in events],
        "mid_checkpoint": sum(bool(e["partial"]) for e in events),
        "planned_mid_checkpoint": mid_checkpoint,
        "resumed": resumed[1:],
        **logs,
        "problems": logs["problems"] + problems,
        "weights_equal": code == 0 and final_weights_equal(run_dir, reference, bench.steps),
        "max_dirs": watch.most,
        "keep_last": bench.keep_last,
        "polls": watch.polls,
        "log": str(launches[-1].log),
    }


def _check_resumes(launches: list[Launch], events: list[dict]) -> tuple[list[int], list[str]]:
    """The step each invocation resumed at (0: fresh), and problems: a restart that did not
    resume on every rank from the newest complete checkpoint on disk when it was started."""
    resumed, problems = [0], []
    if launches[0].resumed_from():
        problems.append(f"the first invocation resumed: {launches[0].resumed_from()}")
    for index, (launch, event) in enumerate(zip(launches[1:], events, strict=True), start=1):
        paths = set(launch.resumed_from().values())
        if len(launch.resumed_from()) != RANKS or paths != {event["newest"]}:
            problems.append(
                f"restart {index} resumed from {launch.resumed_from()} (newest complete "
                f"checkpoint at the kill: {event['newest']}, partial: {event['partial']})"
            )
        resumed.append(int(Path(event["newest"] or "step_0").name.removeprefix("step_")))
    return resumed, problems


def fault_ok(result: dict) -> bool:
    """Every planned kill happened, the run ended well and trained exactly the reference's batches
    into bit-equal weights; for R3 also: each restart resumed from the newest complete checkpoint,
    a save was interrupted as often as planned, never more than keep_last + 1 step directories."""
    ok = (
        result["kills"] == result["planned"]
        and result["exit_code"] == 0
        and not result["problems"]
        and result["weights_equal"]
    )
    if "max_dirs" in result:
        ok = (
            ok
            and result["mid_checkpoint"] >= result["planned_mid_checkpoint"]
            and result["max_dirs"] <= result["keep_last"] + 1
        )
    return ok


def format_faults(results: list[dict]) -> str:
    """The table of counts, one row per scenario (problems found under it), then a legend."""
    rows = [
        f"{'scenario':<30} {'kills':>5} {'restarts':>8} {'mid-ckpt':>8} {'retried':>7}  {'resumed from steps':<18} "
        f"{'batches (again)':>15} {'weights equal':>13} {'max ckpt dirs':>13}"
    ]
    for r in results:
        r3 = "max_dirs" in r
        dirs = f"{r['max_dirs']} (<= {r['keep_last'] + 1})" if r3 else "-"
        batches, resumed = f"{r['batches']} ({r['retrained']})", ",".join(map(str, r.get("resumed", []))) or "-"
        rows.append(
            f"{r['scenario']:<30} {r['kills']:>5} {r['restarts']:>8} {r['mid_checkpoint'] if r3 else '-':>8} "
            f"{r.get('resubmitted', '-'):>7}  {resumed:<18} {batches:>15} "
            f"{'yes' if r['weights_equal'] else 'NO':>13} {dirs:>13}  -> {'ok' if fault_ok(r) else 'FAILED'}"
        )
        rows.append(f"    kills after: {', '.join(r['points'])}")
        rows += [f"    {problem}" for problem in r["problems"][:10]]
        if r["exit_code"] != 0:
            rows.append(f"    trainer exit code {r['exit_code']}: {r['log']}")
    rows.append(
        "mid-ckpt: kills that left a step_N.tmp; retried: teacher requests the trainer resubmitted; batches: "
        "micro-batches compared with the uninterrupted run (again: trained again after a restart)"
    )
    return "\n".join(rows)


def run_faults(bench: FaultBench, kills: int, seed: int) -> list[dict]:
    """The full R2 and R3: a reference run, the teacher killed ``kills`` times and restarted, one
    of two replicas killed for good, the trainer killed ``kills`` times (half of them mid-checkpoint)."""
    teacher = bench.teacher("stable-teacher").start()  # the reference trainer waits for it to serve
    try:
        reference = run_reference(bench, teacher.address)
        return [
            run_teacher_faults(bench, reference, "teacher-restarts", 1, kills, lost=False, seed=seed),
            run_teacher_faults(bench, reference, "replica-lost", 2, 0, lost=True, seed=seed + 1),
            run_trainer_crashes(bench, reference, teacher.address, kills, max(1, kills // 2), seed=seed + 2),
        ]
    finally:
        teacher.stop()
