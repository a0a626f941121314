"""Run records: a log line per step, ``log.jsonl`` and wandb on rank 0, and on every rank the
trajectory ids of each trained micro-batch (to prove that no batch is skipped or repeated)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from hyperdistill.common.config import config_to_dict

logger = logging.getLogger(__name__)


class RunLog:
    def __init__(self, config, rank: int):
        self.rank = rank
        self.dir = Path(config.run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._trajectories = open(self.dir / f"trajectories_rank{rank}.jsonl", "a")
        self._log = open(self.dir / "log.jsonl", "a") if rank == 0 else None
        self._wandb = _start_wandb(config) if rank == 0 else None

    def batch(self, step: int, trajectory_ids: list[str]) -> None:
        """Record the trajectories of a micro-batch trained at optimizer step ``step``."""
        self._trajectories.write(json.dumps({"step": step, "ids": trajectory_ids}) + "\n")
        self._trajectories.flush()

    def step(self, record: dict, lora_norms: dict[str, dict[str, float]]) -> None:
        if self.rank != 0:
            return
        logger.info(
            "step %d [%s] loss %.4f | lr %.2e | grad %.3f | %.0f tok/s | step %.2fs | teacher wait %.3fs",
            record["step"],
            record["phase"],
            record["loss"],
            record["lr"],
            record["grad_norm"],
            record["tokens_per_s"],
            record["step_s"],
            record["teacher_wait_s"],
        )
        self._write(record)
        if self._wandb is not None:
            flat = {f"lora/{m}/{f}": v for m, norms in lora_norms.items() for f, v in norms.items()}
            self._wandb.log({**{k: v for k, v in record.items() if k != "phase"}, **flat}, step=record["step"])

    def eval(self, step: int, record: dict, scalars: dict[str, float]) -> None:
        """An evaluation (``trainer/eval.py``): ``record`` (``held_out_kl`` and the arms) to log.jsonl,
        the flat ``scalars`` to wandb."""
        if self.rank != 0:
            return
        logger.info(
            "step %d held-out KL %.4f (%s)",
            step,
            record["held_out_kl"],
            ", ".join(f"{arm} {values['kl']:.4f}" for arm, values in record["arms"].items()),
        )
        self._write({"step": step, **record})
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def _write(self, record: dict) -> None:
        self._log.write(json.dumps(record) + "\n")
        self._log.flush()

    def close(self) -> None:
        self._trajectories.close()
        if self._log is not None:
            self._log.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(config):
    mode = config.wandb.mode
    if mode == "disabled":
        return None
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    import wandb

    logger.info("wandb %s (project %s)", mode, config.wandb.project)
    return wandb.init(
        project=config.wandb.project,
        name=config.wandb.run_name,
        dir=str(config.run_dir),
        mode=mode,
        config=config_to_dict(config),
        resume="allow",
    )
