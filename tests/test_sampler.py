"""trainer.data.sampler: token budget, bucketing, DP sharding, per-epoch shuffle, exact resume,
and the padded batches."""

from __future__ import annotations

import functools

import datasets
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hyperdistill.trainer.data.render import STORED_FEATURES
from hyperdistill.trainer.data.sampler import Batch, LengthBucketSampler, collate, iterate_batches

BUDGET = 4096
PAD = 151643


@pytest.fixture(scope="module")
def lengths() -> np.ndarray:
    """Skewed like agent trajectories: many short-to-mid, a tail up to the budget."""
    rng = np.random.default_rng(7)
    return np.clip(rng.lognormal(mean=6.5, sigma=0.9, size=600).astype(np.int64), 16, BUDGET)


def sampler(lengths, **kwargs) -> LengthBucketSampler:
    return LengthBucketSampler(lengths, **{"token_budget": BUDGET, "seed": 3, **kwargs})


def take(s: LengthBucketSampler, n: int) -> list[list[int]]:
    """The next n batches, crossing epoch boundaries like a training loop does."""
    out: list[list[int]] = []
    while len(out) < n:
        for batch in s:
            out.append(batch)
            if len(out) == n:
                break
    return out


def test_batches_fit_the_budget_and_cover_the_epoch_once(lengths):
    s = sampler(lengths)
    batches = list(s)
    assert len(batches) == len(s) == s.num_batches
    for batch in batches:
        assert len(batch) * lengths[batch].max() <= BUDGET
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(len(lengths)))


def test_batches_are_length_bucketed(lengths):
    s = sampler(lengths)
    for batch in s.global_batches(0):
        # Every member has the same "examples per budget" class, so lengths differ by a bounded factor.
        assert len(set((BUDGET // lengths[batch]).tolist())) == 1
    padded = sum(len(b) * lengths[b].max() for b in s.global_batches(0))
    assert lengths.sum() / padded > 0.8  # padding stays small


@pytest.mark.parametrize("world_size", [2, 4, 7])
def test_ranks_get_disjoint_batches_and_equal_step_counts(lengths, world_size):
    ranks = [sampler(lengths, rank=r, world_size=world_size) for r in range(world_size)]
    steps = {len(s) for s in ranks}
    assert steps == {ranks[0].num_batches // world_size}
    per_rank = [list(s) for s in ranks]
    indices = np.concatenate([np.concatenate(batches) for batches in per_rank])
    assert len(indices) == len(set(indices.tolist()))  # disjoint
    dropped = ranks[0].global_batches(0)[len(ranks[0]) * world_size :]
    assert len(dropped) == ranks[0].num_batches % world_size
    assert len(indices) + sum(map(len, dropped)) == len(lengths)


def test_shuffle_is_seeded_and_changes_every_epoch(lengths):
    a, b, c = sampler(lengths), sampler(lengths), sampler(lengths, seed=4)
    epoch0, epoch1 = take(a, len(a)), take(a, len(a))
    assert epoch0 != epoch1
    assert sorted(map(sorted, epoch0)) != sorted(map(sorted, epoch1))  # new batch compositions too
    assert take(b, 2 * len(b)) == epoch0 + epoch1
    assert take(c, len(c)) != epoch0
    assert len(epoch0) == len(epoch1)  # constant steps per epoch
    assert a.epoch == 2


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("consumed", ["none", "some", "one_epoch", "past_epoch", "two_epochs_and_one"])
def test_resume_yields_exactly_the_remaining_batches(lengths, world_size, consumed):
    steps = len(sampler(lengths, world_size=world_size))
    k = {"none": 0, "some": 5, "one_epoch": steps, "past_epoch": steps + 3, "two_epochs_and_one": 2 * steps + 1}[
        consumed
    ]
    total = 3 * steps
    for rank in range(world_size):
        reference = take(sampler(lengths, rank=rank, world_size=world_size), total)
        first = sampler(lengths, rank=rank, world_size=world_size)
        head = take(first, k)
        state = dict(first.state_dict())
        resumed = sampler(lengths, rank=rank, world_size=world_size)
        resumed.load_state_dict(state)
        assert head + take(resumed, total - k) == reference


def test_resume_from_the_state_of_a_batch_read_ahead(lengths):
    """A consumer that prefetches saves the state yielded with the last batch it trained on."""
    rows = [
        {"trajectory_id": f"t{i}", "input_ids": [1] * n, "loss_mask": [True] * n, "prompt_ids": [1], "length": n}
        for i, n in enumerate(lengths.tolist())
    ]
    dataset = datasets.Dataset.from_list(rows, features=datasets.Features(STORED_FEATURES))
    reference = [b.trajectory_ids for b, _ in iterate_batches(dataset, sampler(lengths), PAD)]
    s = sampler(lengths)
    stream = iterate_batches(dataset, s, PAD)
    ahead = [next(stream) for _ in range(4)]  # four batches fetched, only the first trained on
    resumed = sampler(lengths)
    resumed.load_state_dict(ahead[0][1])
    rest = [b.trajectory_ids for b, _ in iterate_batches(dataset, resumed, PAD)]
    assert [ahead[0][0].trajectory_ids] + rest == reference


def test_state_from_other_data_or_settings_is_rejected(lengths):
    state = sampler(lengths).state_dict()
    for other in (
        sampler(lengths[:-1]),
        sampler(lengths, seed=5),
        sampler(lengths, world_size=2),
        sampler(lengths, token_budget=2 * BUDGET),
    ):
        with pytest.raises(ValueError, match="same data and settings"):
            other.load_state_dict(state)


def test_bad_arguments_raise(lengths):
    with pytest.raises(ValueError, match="exceeds the token budget"):
        sampler(np.append(lengths, BUDGET + 1))
    with pytest.raises(ValueError, match="fewer than one per rank"):
        sampler([BUDGET, BUDGET], world_size=3)
    with pytest.raises(ValueError, match="outside world size"):
        sampler(lengths, rank=2, world_size=2)


def examples() -> list[dict]:
    return [
        {
            "trajectory_id": "a",
            "input_ids": [5, 6, 7, 8, 9],
            "loss_mask": [False, False, False, True, True],
            "prompt_ids": [5, 6],
            "length": 5,
        },
        {
            "trajectory_id": "b",
            "input_ids": [1, 2, 3],
            "loss_mask": [False, True, False],
            "prompt_ids": [1, 2, 3],
            "length": 3,
        },
    ]


def test_collate_pads_and_masks():
    batch = collate(examples(), pad_id=PAD)
    assert isinstance(batch, Batch)
    assert batch.input_ids.dtype == batch.attention_mask.dtype == batch.prompt_ids.dtype == torch.int64
    assert batch.loss_mask.dtype == batch.prompt_mask.dtype == torch.bool
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, PAD, PAD]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch.loss_mask.tolist() == [[False, False, False, True, True], [False, True, False, False, False]]
    assert batch.prompt_ids.tolist() == [[5, 6, PAD], [1, 2, 3]]
    assert batch.prompt_mask.tolist() == [[True, True, False], [True, True, True]]
    assert batch.trajectory_ids == ["a", "b"]


def test_works_as_a_dataloader_batch_sampler():
    dataset = datasets.Dataset.from_list(examples() * 3, features=datasets.Features(STORED_FEATURES))
    s = LengthBucketSampler([5, 3] * 3, token_budget=10, seed=0)
    loader = DataLoader(dataset, batch_sampler=s, collate_fn=functools.partial(collate, pad_id=PAD))
    batches = list(loader)
    assert sum(len(b.trajectory_ids) for b in batches) == 6
    assert all(b.input_ids.numel() <= 10 for b in batches)
