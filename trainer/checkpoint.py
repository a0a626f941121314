"""Checkpoints with ``torch.distributed.checkpoint``: atomic, keep-last-N, ``resume: auto``.

Layout of ``<dir>/step_000120/``: the DCP files of the sharded state (hypernetwork and
optimizer), ``train_state_rank{r}.pt`` per rank (scheduler, data position, RNG, step) and
``config.json`` (the resolved config). A checkpoint is written into ``step_000120.tmp/`` and
renamed once every rank has finished, so a crash mid-write leaves only a ``.tmp`` directory,
which is never loaded (and is removed by the next save).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
# The train state is plain data and tensors plus numpy's RNG state (a uint32 ndarray): loading it
# weights_only allows what rebuilding that array needs and nothing else (no arbitrary pickles).
_TRAIN_STATE_GLOBALS = (np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType)


@dataclass(kw_only=True)
class CheckpointConfig:
    dir: str = "runs/checkpoints"
    """Directory holding the checkpoints, one ``step_000200/``-style directory each (step zero-padded to 6)."""
    every_steps: int = 100
    """Save every N optimizer steps (and at the end of training)."""
    keep_last: int = 3
    """Complete checkpoints to keep; older ones are deleted after a successful save."""
    resume: str = "auto"
    """``auto``: latest complete checkpoint in ``dir`` if any; ``none``: start fresh; or a path."""

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.keep_last < 1:
            raise ValueError("every_steps and keep_last must be >= 1")


def complete_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (``.tmp`` dirs are never complete)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / ".metadata").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def resolve_resume(config: CheckpointConfig) -> Path | None:
    if config.resume == "none":
        return None
    if config.resume == "auto":
        found = complete_checkpoints(config.dir)
        return found[-1] if found else None
    path = Path(config.resume)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"checkpoint.resume={config.resume!r} is not a complete checkpoint (no .metadata)")
    return path


def checkpoint_path(path: str | Path) -> Path:
    """``path`` if it is a complete checkpoint, else the latest complete checkpoint inside it."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    found = complete_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path} is neither a complete checkpoint (no .metadata) nor a directory holding one")
    return found[-1]


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Collective: restore only ``model``'s state from checkpoint ``path`` (evaluation: no optimizer,
    any world size)."""
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    logger.info("weights loaded from %s", path)


def read_train_state(path: Path, rank: int = 0) -> dict[str, Any]:
    """Rank ``rank``'s train state (step, phase, data position, RNG) of checkpoint ``path``."""
    with torch.serialization.safe_globals(list(_TRAIN_STATE_GLOBALS)):
        return torch.load(path / f"train_state_rank{rank}.pt", weights_only=True)


class Checkpointer:
    def __init__(self, config: CheckpointConfig, rank: int):
        self.config = config
        self.rank = rank
        self.last_save_time: float | None = None

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        train_state: dict[str, Any],
        resolved_config: dict[str, Any],
    ) -> Path:
        """Collective: every rank calls it. Returns the final checkpoint path."""
        root = Path(self.config.dir)
        final = root / f"step_{step:06d}"
        tmp = root / f"step_{step:06d}.tmp"
        if self.rank == 0:
            # Before the new directory: a crash may have left a .tmp or (after the rename, before
            # the pruning) keep_last + 1 complete ones; never more than keep_last + 1 on disk.
            self._prune(root)
            tmp.mkdir(parents=True)
        _barrier()
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
        }
        dcp.save(state, checkpoint_id=str(tmp))
        torch.save(train_state, tmp / f"train_state_rank{self.rank}.pt")
        if self.rank == 0:
            (tmp / "config.json").write_text(json.dumps(resolved_config, indent=2))
        _barrier()
        if self.rank == 0:
            _remove(final)  # the same step saved again (end of training, stop after a periodic save)
            tmp.rename(final)
            self._prune(root)
            logger.info("saved checkpoint %s", final)
        _barrier()
        self.last_save_time = time.time()
        return final

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Collective: restores model and optimizer in place; returns this rank's train state."""
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
        }
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
        set_optimizer_state_dict(model, optimizer, state["optim"])
        own = path / f"train_state_rank{self.rank}.pt"
        if not own.is_file():
            raise FileNotFoundError(f"{own} missing: checkpoint {path} was written with a different world size")
        # The checkpoint-age metric and alert count from the checkpoint we resumed from.
        self.last_save_time = (path / ".metadata").stat().st_mtime
        logger.info("resumed from %s", path)
        return read_train_state(path, self.rank)

    def _prune(self, root: Path) -> None:
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        for old in complete_checkpoints(root)[: -self.config.keep_last]:
            _remove(old)
            logger.info("removed old checkpoint %s", old)


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint directory, ``.metadata`` first: a crash midway leaves it incomplete
    (never resumed from), not a ``.metadata`` beside missing shards."""
    (checkpoint / ".metadata").unlink(missing_ok=True)
    shutil.rmtree(checkpoint, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
