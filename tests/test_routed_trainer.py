"""``hypernetwork.kind: routed`` in the distributed trainer: torchrun x2 (gloo, CPU), the real
entry point, with the set-up, run length and comparisons of tests/test_trainer_e2e.py. The
teacher scores the 4 sequences once into a teacher cache (precompute) and every run trains from
the cache alone (a live teacher would score each epoch anew: ~20 s a step here). K = 2: the
bootstrap is steps 1-2, routing is set before step 3 and re-warmed over steps 3-5; step 4 scores
its samples under every expert (the re-routing window, R = 1, W = 1) and the router is re-trained on
them before step 5; a checkpoint every step."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyperdistill.trainer.checkpoint import read_train_state
from tests.conftest import ROOT, start_teacher
from tests.devtools.teacher_process import free_port
from tests.test_trainer_e2e import (
    STEPS,
    TEACHER_OVERRIDES,
    final_weights,
    losses,
    precompute_command,
    run_trainer,
    trained_batches,
)

K, REWARM, LR = 2, 3, 1e-3  # LR: tests/test_trainer_e2e.PHASES
RELABEL = K + 2  # re-routing before the step that checkpoint step_{RELABEL + 1} ends
ROUTED = (
    "hypernetwork.kind=routed",
    f"hypernetwork.route_after_steps={K}",
    "hypernetwork.route_relabel_after=1",
    "hypernetwork.route_relabel_steps=1",
    "hypernetwork.route_relabel_rounds=1",
    f"hypernetwork.route_rewarm_steps={REWARM}",
    "hypernetwork.router_pretrain_steps=5",
    "hypernetwork.router_pretrain_batch=4",
    "hypernetwork.cluster_restarts=2",
    "checkpoint.every_steps=1",
    "checkpoint.keep_last=10",
)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def from_cache(tmp_path_factory, tiny_models, data_cache) -> tuple[str, ...]:
    """The overrides that train from a teacher cache holding every sequence of the runs."""
    cache = tmp_path_factory.mktemp("teacher-cache")
    with start_teacher(tmp_path_factory, "routed-teacher", tiny_models, *TEACHER_OVERRIDES) as teacher:
        command = precompute_command(cache, teacher.address, tiny_models, data_cache)
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["complete"]
    return (
        "teacher.addresses=[]",
        f"teacher.cache.dir={cache}",
        "teacher.cache.encoding=fp16",
        f"teacher.cache.teacher_model={summary['key']['teacher_model']}",
    )


def run_routed(run_dir: Path, tiny_models, data_cache: Path, from_cache: tuple[str, ...], *overrides: str):
    result = run_trainer(run_dir, "unused", tiny_models, data_cache, *ROUTED, *from_cache, *overrides)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_models, data_cache, from_cache):
    """An uninterrupted routed run of STEPS steps."""
    run_dir = tmp_path_factory.mktemp("routed-baseline")
    result = run_routed(run_dir, tiny_models, data_cache, from_cache)
    assert result.stderr.count(f"routing set after step {K}:") == 1, result.stderr[-4000:]  # logged by rank 0
    assert result.stderr.count(f"re-routed after step {RELABEL}:") == 1, result.stderr[-4000:]
    return run_dir


def test_switch_at_step_k_with_the_same_routing_on_both_ranks(baseline):
    records = [json.loads((baseline / f"routing_rank{rank}.json").read_text()) for rank in (0, 1)]
    # Every bootstrap sample of both ranks: K steps x 2 ranks x 2 sequences (4 examples per epoch).
    assert records[0]["step"] == K and records[0]["prompts"] == 2 * 2 * K
    assert sum(records[0]["cluster_sizes"]) == records[0]["prompts"]
    assert math.isfinite(records[0]["router_cross_entropy"])
    # Each rank routed every bootstrap prompt with its own weights (its shards all-gathered): the same experts.
    assert records[0]["experts"] == records[1]["experts"]
    assert records[0] == records[1]
    # The re-routing: step K + 1's samples of both ranks, each labelled by its lowest-KL expert.
    relabels = [json.loads((baseline / f"relabel_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert relabels[0] == relabels[1] and relabels[0]["step"] == RELABEL and relabels[0]["prompts"] == 2 * 2
    assert math.isfinite(relabels[0]["router_cross_entropy"])


def test_b_zeroed_at_the_switch_then_encoder_and_router_frozen(baseline, tmp_path):
    state = {step: final_weights(baseline, tmp_path, step) for step in (K, K + 1, STEPS)}
    assert not bool(state[K]["routing_set"]) and bool(state[K + 1]["routing_set"]) and bool(state[STEPS]["routing_set"])
    frozen = [name for name in state[K] if name.startswith(("encoder.", "router."))]
    bank = [name for name in state[K] if name.startswith("bank.B.")]
    assert frozen and bank
    # The router pre-training moved encoder + router at the switch, the re-routing before step
    # RELABEL + 1; the main optimizer never did.
    state.update({step: final_weights(baseline, tmp_path, step) for step in (RELABEL, RELABEL + 1)})
    for before, after, moved in ((K, K + 1, True), (K + 1, RELABEL, False), (RELABEL, RELABEL + 1, True)):
        assert any(not torch.equal(state[before][n], state[after][n]) for n in frozen) == moved, (before, after)
    assert all(torch.equal(state[RELABEL + 1][n], state[STEPS][n]) for n in frozen)
    # B restarted from zero with a fresh AdamW: its first step moves each entry by at most the
    # step's learning rate (re-warmed: LR / REWARM); the bootstrap's two steps had moved it further.
    first_lr = LR / REWARM
    assert max(float(state[K + 1][n].abs().max()) for n in bank) <= first_lr * (1 + 1e-4)
    assert max(float(state[K][n].abs().max()) for n in bank) > 1.5 * first_lr
    curve = dict(losses(baseline))
    # B = 0 again: step K+1 sees the student unchanged, as step 1 did (the same 4 examples every epoch).
    assert curve[K + 1] == pytest.approx(curve[1], rel=1e-5)
    assert all(math.isfinite(v) for v in curve.values())
    assert curve[STEPS] < curve[K + 1], curve  # the experts learn after the switch


def test_bootstrap_records_are_checkpointed_per_rank(baseline):
    for rank in (0, 1):
        features = read_train_state(baseline / "checkpoints" / "step_000001", rank)["routing"]["features"]
        assert len(features) == 1 and features[0].shape[0] == 2  # one micro-batch of 2 sequences
        assert torch.isfinite(features[0]).all() and features[0].abs().sum() > 0  # a real gradient
        after = read_train_state(baseline / "checkpoints" / f"step_{K + 1:06d}", rank)["routing"]
        assert after["features"] == after["prompts"] == [] and after["relabels"] == 0
        # The re-routing window's scores (step RELABEL: 2 samples x 4 experts), then cleared.
        window = read_train_state(baseline / "checkpoints" / f"step_{RELABEL:06d}", rank)["routing"]
        assert [t.shape for t in window["scored_losses"]] == [(2, 4)] and len(window["scored_prompts"]) == 2
        assert torch.isfinite(window["scored_losses"][0]).all() and window["relabels"] == 0
        done = read_train_state(baseline / "checkpoints" / f"step_{RELABEL + 1:06d}", rank)["routing"]
        assert done["relabels"] == 1 and done["scored_losses"] == []
    first = [read_train_state(baseline / "checkpoints" / "step_000001", r)["routing"]["features"][0] for r in (0, 1)]
    assert not torch.equal(first[0], first[1])  # each rank records its own samples


def test_stopped_before_and_after_the_switch_and_resumed_reproduces_the_uninterrupted_run(
    tmp_path, baseline, tiny_models, data_cache, from_cache
):
    """Stopped after step 1 (the bootstrap's records in the train state), resumed and stopped after
    step K + 2 (routing set, the fresh optimizer, mid re-warm, the re-routing window's scores in
    the train state), resumed to the end (the re-routing first): bit for bit."""
    run_dir = tmp_path / "resumed"
    run_routed(run_dir, tiny_models, data_cache, from_cache, "stop_after_steps=1")
    assert not (run_dir / "routing_rank0.json").exists()
    second = run_routed(run_dir, tiny_models, data_cache, from_cache, f"stop_after_steps={K + 1}")  # steps 2-4
    assert "resumed from" in second.stderr and f"routing set after step {K}:" in second.stderr
    assert "re-routed" not in second.stderr
    assert [step for step, _ in losses(run_dir)] == list(range(1, RELABEL + 1))
    last = run_routed(run_dir, tiny_models, data_cache, from_cache)
    assert "resumed from" in last.stderr and "routing set" not in last.stderr
    assert f"re-routed after step {RELABEL}:" in last.stderr
    assert losses(run_dir) == losses(baseline)  # exactly, step by step
    for rank in (0, 1):
        assert trained_batches(run_dir, rank) == trained_batches(baseline, rank)
        for event in ("routing", "relabel"):
            path = f"{event}_rank{rank}.json"
            assert (run_dir / path).read_text() == (baseline / path).read_text()
    expected, got = final_weights(baseline, tmp_path), final_weights(run_dir, tmp_path)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_fsdp_sharded_switch_equals_route_on_a_plain_adapter(tiny_models):
    """torchrun x2, the adapter sharded by FSDP2 over both ranks beside a plain copy on each:
    each rank's probe gradients are its samples' own (the plain adapter's for the same batch), and
    after an evaluation-style forward (no backward: the root stays unsharded) `route_distributed`
    gives what `route` gives on one process over every rank's records, rank 0's first."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(free_port()), "-m", "tests.test_routed_trainer", str(tiny_models.student)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("fsdp switch ok") == 2, result.stdout[-2000:]


def _fsdp_worker(student_path: str) -> None:
    """One rank of `test_fsdp_sharded_switch_equals_route_on_a_plain_adapter`."""
    from transformers import AutoModelForCausalLM

    from hyperdistill.trainer.distributed import close_distributed, init_distributed
    from hyperdistill.trainer.hypernetwork import HyperLoRAConfig, build_hyper_lora
    from hyperdistill.trainer.model import shard_adapter
    from hyperdistill.trainer.routing import Bootstrap, RouterCopy, probe_features, route, route_distributed
    from tests.test_routing import SMALL, hidden, prompts

    info = init_distributed()
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32).eval()
    adapters = []
    for _ in range(2):
        torch.manual_seed(0)
        adapters.append(build_hyper_lora(HyperLoRAConfig(**SMALL), student))
    plain, sharded = adapters[0], shard_adapter(adapters[1], info.device)
    plain.probe = sharded.probe = True
    mine, every = Bootstrap(), [Bootstrap() for _ in range(info.world_size)]
    for step in range(2):
        for rank, boot in enumerate(every):  # the reference sees every rank's batches
            ids, mask = prompts(2, seed=10 * step + rank)
            hidden(student, plain(ids, mask), ids).square().mean().backward()
            boot.record(plain, ids, mask)
        ids, mask = prompts(2, seed=10 * step + info.rank)
        hidden(student, sharded(ids, mask), ids).square().mean().backward()
        assert torch.equal(probe_features(sharded.last_probe), every[info.rank].features[-1])
        mine.record(sharded, ids, mask)
    with torch.no_grad():
        sharded(ids, mask)  # as an evaluation does: the root keeps its parameters unsharded
    routed = route_distributed(sharded, mine, seed=0)
    merged = Bootstrap([f for b in every for f in b.features], [p for b in every for p in b.prompts])
    assert torch.equal(routed.labels, route(plain, merged, seed=0))
    gathered = RouterCopy(sharded)
    for name, param in gathered.named_parameters():
        assert torch.equal(param, plain.get_parameter(name)), name
    for b in sharded.bank.B.values():
        assert int(torch.count_nonzero(b.full_tensor())) == 0
    ids = torch.stack(merged.prompts)
    assert torch.equal(routed.experts, plain.experts(ids, torch.ones_like(ids, dtype=torch.bool)))
    assert sharded.routed and not sharded.probe
    print("fsdp switch ok", info.rank, routed.record(2, plain.config.experts), flush=True)
    close_distributed()


if __name__ == "__main__":
    _fsdp_worker(sys.argv[1])
