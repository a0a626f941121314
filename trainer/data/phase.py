"""A phase's view of the prepared data: its training examples, sampler and held-out set."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import datasets

from hyperdistill.trainer.config import PhaseConfig, TrainerConfig
from hyperdistill.trainer.data.prepare import load_prepared
from hyperdistill.trainer.data.sampler import Batch, LengthBucketSampler, collate, iterate_batches
from hyperdistill.trainer.distributed import DistInfo

logger = logging.getLogger(__name__)


@dataclass
class PhaseData:
    train: datasets.Dataset
    held_out: datasets.Dataset
    sampler: LengthBucketSampler
    pad_id: int
    max_length: int
    dist: DistInfo

    def total_steps(self, phase: PhaseConfig, accumulation: int) -> int:
        """Optimizer steps in this phase: ``epochs`` passes, capped by ``max_steps``."""
        steps = phase.epochs * len(self.sampler) // accumulation
        if steps == 0:
            raise ValueError(
                f"phase {phase.name!r}: {len(self.sampler)} micro-batches per epoch per rank "
                f"x {phase.epochs} epochs is less than one step of {accumulation} micro-batches"
            )
        return min(steps, phase.max_steps) if phase.max_steps else steps

    def batches(self, micro_batches: int) -> Iterator[tuple[Batch, dict]]:
        """The next ``micro_batches`` (batch, sampler state after it), across epoch boundaries."""
        remaining = micro_batches
        while remaining:
            for item in iterate_batches(self.train, self.sampler, self.pad_id):
                yield item
                remaining -= 1
                if not remaining:
                    return

    def held_out_batches(self) -> Iterator[tuple[Batch, float, int]]:
        """(one-example batch, weight, its index in ``held_out``): this rank's share of the held-out
        set. Every rank yields the same number (FSDP forwards are collective); padding repeats
        (of example 0) have weight 0."""
        rank, world = self.dist.rank, self.dist.world_size
        count = len(self.held_out)
        for i in range(-(-count // world)):
            index = i * world + rank
            weight = 1.0 if index < count else 0.0
            index = index if weight else 0
            yield collate([self.held_out[index]], self.pad_id), weight, index


def load_phase_data(config: TrainerConfig, phase: PhaseConfig, tokenizer, dist: DistInfo) -> PhaseData:
    """Prepare (once, under a file lock) and load this phase's examples; split off the held-out set."""
    max_length = phase.max_length or config.data.max_length
    data_config = dataclasses.replace(
        config.data, max_length=max_length, token_budget=phase.token_budget or config.data.token_budget
    )
    dataset = load_prepared(data_config, tokenizer)
    held = config.eval.held_out
    if held >= len(dataset):
        raise ValueError(f"eval.held_out={held} leaves no training examples out of {len(dataset)}")
    train = dataset.select(range(len(dataset) - held))
    held_out = dataset.select(list(range(len(dataset) - held, len(dataset))))  # a list: empty ranges fail
    if phase.max_samples:
        train = train.select(range(min(phase.max_samples, len(train))))
    sampler = LengthBucketSampler(
        train["length"],
        token_budget=data_config.token_budget,
        seed=data_config.seed,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    logger.info("phase %r: %d training examples, %d held out, max_length %d", phase.name, len(train), held, max_length)
    return PhaseData(train, held_out, sampler, tokenizer.pad_token_id, max_length, dist)
