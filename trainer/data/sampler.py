"""Batches of prepared examples: length-bucketed under a token budget, sharded across
data-parallel ranks, reshuffled every epoch, resumable to the exact batch.

The training loop reads batches with `iterate_batches(dataset, sampler, pad_id)`, which
yields each padded `Batch` with the sampler state to checkpoint once that batch has been
trained on; `LengthBucketSampler.load_state_dict` on restart continues with exactly the
batches the uninterrupted run would have seen next, in the same order.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


class LengthBucketSampler:
    """Yields lists of example indices, one list per micro-batch of this rank.

    Bucketing: an example of length L goes to the bucket of batch size k = budget // L,
    the most examples of its length that fit the budget. A batch holds up to k examples of
    bucket k, each at most budget / k long, so its padded size (batch size x longest) is at
    most the budget, and it shares the batch with examples of similar length (within a
    factor (k+1)/k).
    The number of batches per epoch depends only on the bucket sizes, so it is the same
    in every epoch.

    Epoch e: a generator seeded with (seed, e) shuffles each bucket, cuts it into batches
    and shuffles the batch order; every rank computes the same global order. The last
    `num_batches % world_size` batches of that order are dropped (different ones each
    epoch), so every rank gets `steps_per_epoch` disjoint batches: rank r takes batches
    r, r + world_size, ...

    The iterator yields the rest of the current epoch and moves the position as it goes;
    `state_dict()` is the position after the last batch yielded. Use one iterator at a
    time.
    """

    def __init__(
        self, lengths: Sequence[int] | np.ndarray, *, token_budget: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        """lengths: int [N], the token count of each example (the dataset's `length`)."""
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.token_budget, self.seed, self.rank, self.world_size = token_budget, seed, rank, world_size
        self._check_arguments()
        sizes = token_budget // self.lengths
        self._buckets = [(int(k), np.flatnonzero(sizes == k)) for k in np.unique(sizes)]
        self.num_batches = sum(-(-len(members) // k) for k, members in self._buckets)
        self.steps_per_epoch = self.num_batches // world_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.lengths)} examples make {self.num_batches} batches: "
                f"fewer than one per rank for {world_size} ranks"
            )
        self._lengths_digest = hashlib.sha256(self.lengths.tobytes()).hexdigest()
        self._epoch = 0
        self._step = 0
        log.info(
            "%d examples in %d buckets -> %d batches per epoch, %d steps per rank (%d dropped)",
            len(self.lengths),
            len(self._buckets),
            self.num_batches,
            self.steps_per_epoch,
            self.num_batches % world_size,
        )

    def _check_arguments(self) -> None:
        if self.lengths.ndim != 1 or len(self.lengths) == 0:
            raise ValueError("lengths must be a non-empty 1-D sequence")
        if self.lengths.min() < 1:
            raise ValueError("every example needs at least one token")
        longest = int(self.lengths.max())
        if longest > self.token_budget:
            raise ValueError(f"an example of {longest} tokens exceeds the token budget {self.token_budget}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")

    def __len__(self) -> int:
        """Steps (batches) per epoch on this rank."""
        return self.steps_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._epoch

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of `epoch` in training order, before sharding and dropping."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for k, members in self._buckets:
            shuffled = rng.permutation(members)
            batches += [shuffled[i : i + k].tolist() for i in range(0, len(shuffled), k)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's `steps_per_epoch` batches of `epoch`, in order."""
        end = self.steps_per_epoch * self.world_size
        return self.global_batches(epoch)[self.rank : end : self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, batches = self._epoch, self.rank_batches(self._epoch)
        for step in range(self._step, len(batches)):
            # Advance before yielding, so that state_dict() taken after receiving the
            # epoch's last batch already points at the start of the next epoch.
            self._epoch, self._step = (epoch + 1, 0) if step + 1 == len(batches) else (epoch, step + 1)
            yield batches[step]

    def state_dict(self) -> dict[str, Any]:
        """The position (after the last yielded batch) and what it is only valid for."""
        return {
            "epoch": self._epoch,
            "step": self._step,
            "seed": self.seed,
            "token_budget": self.token_budget,
            "world_size": self.world_size,
            "lengths_sha256": self._lengths_digest,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state`; raises ValueError if it belongs to other data or settings."""
        expected = self.state_dict()
        for key in ("seed", "token_budget", "world_size", "lengths_sha256"):
            if state[key] != expected[key]:
                raise ValueError(
                    f"sampler state has {key}={state[key]!r}, this sampler {expected[key]!r}: "
                    "resuming needs the same data and settings"
                )
        if not 0 <= state["step"] < self.steps_per_epoch:
            raise ValueError(f"sampler state step {state['step']} is outside [0, {self.steps_per_epoch})")
        self._epoch, self._step = int(state["epoch"]), int(state["step"])


@dataclass
class Batch:
    """One padded micro-batch (right padding)."""

    input_ids: torch.Tensor
    """int64 [B, T]: token ids, `pad_id` after each example's end."""
    attention_mask: torch.Tensor
    """int64 [B, T]: 1 on real tokens, 0 on padding."""
    loss_mask: torch.Tensor
    """bool [B, T]: True on assistant tokens (the targets); False on prompt, tool output
    and padding."""
    prompt_ids: torch.Tensor
    """int64 [B, P]: the hypernetwork prompt of each example, padded with `pad_id`."""
    prompt_mask: torch.Tensor
    """bool [B, P]: True on real prompt tokens."""
    trajectory_ids: list[str]
    """[B]: which trajectories the batch holds (logged to prove none is skipped or repeated)."""


def collate(examples: Sequence[Mapping[str, Any]], pad_id: int) -> Batch:
    """Pad prepared examples (`input_ids`, `loss_mask`, `prompt_ids`, `trajectory_id`)
    to the longest sequence and the longest prompt of the batch."""
    lengths = [len(e["input_ids"]) for e in examples]
    prompt_lengths = [len(e["prompt_ids"]) for e in examples]
    batch_size, longest, longest_prompt = len(examples), max(lengths), max(prompt_lengths)
    input_ids = torch.full((batch_size, longest), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros((batch_size, longest), dtype=torch.bool)
    prompt_ids = torch.full((batch_size, longest_prompt), pad_id, dtype=torch.int64)
    for row, example in enumerate(examples):
        input_ids[row, : lengths[row]] = torch.as_tensor(example["input_ids"], dtype=torch.int64)
        loss_mask[row, : lengths[row]] = torch.as_tensor(example["loss_mask"], dtype=torch.bool)
        prompt_ids[row, : prompt_lengths[row]] = torch.as_tensor(example["prompt_ids"], dtype=torch.int64)
    positions, prompt_positions = torch.arange(longest), torch.arange(longest_prompt)
    return Batch(
        input_ids=input_ids,
        attention_mask=(positions < torch.tensor(lengths)[:, None]).to(torch.int64),
        loss_mask=loss_mask,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_positions < torch.tensor(prompt_lengths)[:, None],
        trajectory_ids=[str(e["trajectory_id"]) for e in examples],
    )


def iterate_batches(dataset: Any, sampler: LengthBucketSampler, pad_id: int) -> Iterator[tuple[Batch, dict[str, Any]]]:
    """(batch, sampler state after it) for the rest of the sampler's current epoch.

    `dataset` is a prepared `datasets.Dataset` (anything with `__getitems__(indices)`
    returning rows). Checkpoint the state that came with the last batch trained on: a
    consumer that reads ahead (teacher prefetch) must not use `sampler.state_dict()`,
    which is already past the batches it holds.
    """
    for indices in sampler:
        state = sampler.state_dict()
        yield collate(dataset.__getitems__(indices), pad_id), state


def batch_sequences(batch: Batch) -> list[np.ndarray]:
    """The unpadded token ids of each row, int32 [T_i] (what the teacher scores)."""
    lengths = batch.attention_mask.sum(1).tolist()
    return [batch.input_ids[row, :n].numpy().astype(np.int32) for row, n in enumerate(lengths)]


def teacher_tensors(
    batch: Batch, topk: Sequence[Any], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-K per row (``common.codec.TopK``) padded to the batch: ids int64
    [B, T-1, K], logprobs float32 [B, T-1, K] and mask bool [B, T-1] (position t counts when
    token t+1 is an assistant token)."""
    rows, width = batch.input_ids.shape
    k = topk[0].top_k
    ids = torch.zeros(rows, width - 1, k, dtype=torch.int64)
    logprobs = torch.zeros(rows, width - 1, k, dtype=torch.float32)
    for row, result in enumerate(topk):
        n = result.num_positions
        ids[row, :n] = torch.from_numpy(result.ids.astype(np.int64))
        logprobs[row, :n] = torch.from_numpy(result.logprobs)
    mask = batch.loss_mask[:, 1:].clone()
    return ids.to(device), logprobs.to(device), mask.to(device)
