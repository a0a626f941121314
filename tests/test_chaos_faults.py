"""The reduced R2 and R3 of `make chaos` (tests/chaos/faults.py): 6 steps, 2 kills each, against
one uninterrupted reference run; then two crash windows of the checkpointer too short to hit by
timing a SIGKILL, crashed into in-process instead (~4 min in all on a busy 2-core machine)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hyperdistill.trainer import checkpoint as trainer_checkpoint
from hyperdistill.trainer.checkpoint import CheckpointConfig, Checkpointer, resolve_resume
from tests.chaos.faults import (
    FaultBench,
    fault_ok,
    format_faults,
    run_reference,
    run_teacher_faults,
    run_trainer_crashes,
)


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_models) -> FaultBench:
    return FaultBench(work=tmp_path_factory.mktemp("faults"), models=tiny_models, steps=6)


@pytest.fixture(scope="module")
def stable_teacher(bench):
    teacher = bench.teacher("stable-teacher").start()  # the reference trainer waits for it to serve
    yield teacher
    teacher.stop()


@pytest.fixture(scope="module")
def reference(bench, stable_teacher) -> Path:
    return run_reference(bench, stable_teacher.address)


def test_r2_a_replica_lost_then_the_other_killed_and_restarted(bench, reference):
    """Two replicas: one killed for good, then the other killed and restarted on its port (the
    trainer waits for it: no teacher is up meanwhile)."""
    result = run_teacher_faults(bench, reference, "replica-lost+restart", replicas=2, restarts=1, lost=True, seed=1)
    assert fault_ok(result), format_faults([result])
    assert result["kills"] == 2 and result["restarts"] == 1 and result["batches"] == 2 * bench.steps


def test_r3_trainer_killed_twice_once_mid_checkpoint(bench, reference, stable_teacher):
    result = run_trainer_crashes(bench, reference, stable_teacher.address, kills=2, mid_checkpoint=1, seed=2)
    assert fault_ok(result), format_faults([result])
    assert result["restarts"] == 2 and len(result["resumed"]) == 2 and result["max_dirs"] <= bench.keep_last + 1


class Crash(BaseException):
    """Stands for a SIGKILL: nothing after the point it is raised at runs."""


@pytest.fixture
def checkpointer(tmp_path):
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path / "checkpoints"), keep_last=2), rank=0)

    def save(step: int) -> None:
        model(torch.ones(1, 4)).sum().backward()
        optimizer.step()
        ckpt.save(step, model, optimizer, {"step": step}, {})

    return ckpt, model, optimizer, save


def test_r3_a_checkpoint_killed_while_being_replaced_is_never_loaded(checkpointer, monkeypatch):
    """Training ends by saving its last step again when that step was just saved periodically, and
    the old copy is deleted file by file: killed before its data is gone, it must not stay complete."""
    ckpt, model, optimizer, save = checkpointer
    save(1)
    save(2)
    replacement = Path(ckpt.config.dir) / "step_000002.tmp" / "config.json"
    unlink = os.unlink

    def killed_once_data_is_gone(path, *args, **kwargs):
        unlink(path, *args, **kwargs)
        if replacement.exists() and os.path.basename(path) != ".metadata":
            raise Crash

    monkeypatch.setattr(os, "unlink", killed_once_data_is_gone)
    with pytest.raises(Crash):
        save(2)
    monkeypatch.undo()
    resume = resolve_resume(ckpt.config)
    assert resume is not None
    assert ckpt.load(resume, model, optimizer)["step"] == int(resume.name.removeprefix("step_"))


def test_r3_killed_after_a_save_before_pruning_then_at_most_keep_last_plus_1(checkpointer, monkeypatch):
    ckpt, _, _, save = checkpointer
    root = Path(ckpt.config.dir)
    save(1)
    save(2)
    prune = Checkpointer._prune

    def killed_after_rename(self, directory):
        if (root / "step_000003").exists():
            raise Crash
        prune(self, directory)

    monkeypatch.setattr(Checkpointer, "_prune", killed_after_rename)
    with pytest.raises(Crash):
        save(3)
    monkeypatch.undo()
    assert len(list(root.iterdir())) == 3  # keep_last + 1 complete: nothing pruned
    seen = []
    dcp_save = trainer_checkpoint.dcp.save

    def counting_save(*args, **kwargs):
        seen.append(sorted(p.name for p in root.iterdir()))
        return dcp_save(*args, **kwargs)

    monkeypatch.setattr(trainer_checkpoint.dcp, "save", counting_save)
    save(4)
    assert all(len(names) <= ckpt.config.keep_last + 1 for names in seen), seen
    assert sorted(p.name for p in root.iterdir()) == ["step_000003", "step_000004"]
