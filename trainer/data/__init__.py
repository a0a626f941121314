"""Training data: SWE-rebench-openhands trajectories -> tokenized, masked examples on disk -> batches.

    rows      load the source (`datasets`: a hub name, or local parquet/jsonl) and decode rows
    render    render a trajectory with the student's chat template: ids, loss mask, prompt
    prepare   the gold set rendered and saved once per source, settings and tokenizer
    sampler   token-budget batches bucketed by length, sharded over ranks, resumable
    phase     one training phase's data: this rank's batches and the held-out split
    __main__  `python -m hyperdistill.trainer.data`: prepare ahead of training

`DataConfig` (``data:`` in the trainer config) is defined here.
"""

from __future__ import annotations

from dataclasses import dataclass

HUB_DATASET = "nebius/SWE-rebench-openhands-trajectories"


@dataclass(kw_only=True)
class DataConfig:
    """Where the trajectories come from and how they become batches."""

    source: str = HUB_DATASET
    """Hub dataset name, or a local .parquet/.jsonl file or a directory of them."""
    split: str = "train"
    """Split to load; local files are loaded as this split."""
    subset: str = "gold"
    """`gold`: resolved trajectories only (`resolved == 1`); `all`: every trajectory."""
    max_length: int = 32768
    """Tokens per example: longer trajectories keep their start; one whose prompt alone is
    longer is skipped. Each value gets its own prepared dataset."""
    token_budget: int = 32768
    """Padded tokens per micro-batch on one rank (batch size x longest example)."""
    seed: int = 0
    """Seed of the per-epoch shuffle."""
    cache_dir: str = ".cache/data"
    """Root of the prepared datasets (one directory per source, settings and tokenizer) and
    of `datasets`' own download and Arrow cache."""
    num_proc: int = 1
    """Processes that render and tokenize in parallel (`datasets.Dataset.map`)."""

    def __post_init__(self) -> None:
        if self.subset not in ("gold", "all"):
            raise ValueError(f"subset must be 'gold' or 'all', got {self.subset!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.token_budget < self.max_length:
            raise ValueError(
                f"token_budget ({self.token_budget}) must be >= max_length "
                f"({self.max_length}): a full-length example must fit in a batch"
            )
        if self.num_proc < 1:
            raise ValueError(f"num_proc must be >= 1, got {self.num_proc}")
