"""``hypernetwork.kind: routed`` and its schedule (trainer/routing.py) on the tiny student: the probe,
clustering, router pre-training, the switch to hard routing, checkpoints, and the Trainer's
`RoutingSchedule` on one process (tests/test_routed_trainer.py runs it under torchrun)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from hyperdistill.trainer.config import OptimConfig
from hyperdistill.trainer.hypernetwork import HyperLoRAConfig, RoutedHyperLoRA, StaticLoRA, build_hyper_lora
from hyperdistill.trainer.lora import GeneratedLoRA, LoRAWeights, hyper_lora
from hyperdistill.trainer.routing import (
    Bootstrap,
    RoutingSchedule,
    cluster,
    expert_losses,
    pretrain_router,
    principal_components,
    probe_features,
    purity,
    relabel,
    rewarm_factor,
    route,
    set_routing,
)

SMALL = dict(
    kind="routed",
    targets=["self_attn.o_proj", "linear_attn.out_proj"],
    rank=8,
    experts=4,
    alpha=8.0,
    encoder_dim=32,
    encoder_heads=4,
    encoder_layers=1,
    max_prompt_tokens=24,
    route_after_steps=2,
    router_pretrain_steps=5,
    router_pretrain_batch=8,
    cluster_restarts=2,
)


@pytest.fixture(scope="module")
def student(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models.student, dtype=torch.float32).eval()


def routed_adapter(student, **overrides) -> RoutedHyperLoRA:
    torch.manual_seed(0)
    adapter = build_hyper_lora(HyperLoRAConfig(**{**SMALL, **overrides}), student)
    assert isinstance(adapter, RoutedHyperLoRA)
    return adapter


def prompts(n: int, width: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 151_000, (n, width), generator=gen), torch.ones(n, width, dtype=torch.bool)


def randomise_bank(adapter, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in adapter.bank.B.values():
            b.copy_(0.05 * torch.randn(b.shape, generator=gen))


EMPTY_STATE = {"features": [], "prompts": [], "scored_losses": [], "scored_prompts": [], "relabels": 0}


def schedule_for(adapter, student, run_dir) -> RoutingSchedule:
    return RoutingSchedule(adapter, 0, run_dir, student=student, optim=OptimConfig(), device=torch.device("cpu"))


def hidden(student, lora, ids) -> torch.Tensor:
    with hyper_lora(student, lora, seq_len=ids.shape[1]):
        return student.model(input_ids=ids, use_cache=False).last_hidden_state


def test_cluster_recovers_planted_balanced_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 300, generator=gen)
    truth = torch.arange(4).repeat_interleave(40)[torch.randperm(160, generator=gen)]
    scale = torch.rand(160, 1, generator=gen) * 10 + 0.1  # gradient norms vary: direction matters
    features = scale * (centres[truth] + 1.5 * torch.randn(160, 300, generator=gen))
    labels = cluster(features, 4, dims=8, restarts=4)
    assert purity(truth.tolist(), labels.tolist(), 4) == 1.0
    assert labels.bincount(minlength=4).tolist() == [40] * 4
    assert torch.equal(labels, cluster(features, 4, dims=8, restarts=4))  # deterministic given the seed
    with pytest.raises(ValueError):
        cluster(features[:3], 4)


def test_probe_gradient_is_the_per_sample_gradient_of_an_extra_b(student):
    adapter = routed_adapter(student)
    randomise_bank(adapter)
    adapter.probe = True
    ids, _ = prompts(2, 8, seed=3)
    weight = torch.randn(2, 8, student.config.hidden_size, generator=torch.Generator().manual_seed(4))

    def loss_of(lora: GeneratedLoRA) -> torch.Tensor:
        return (weight.double() * hidden(student, lora, ids).double()).sum() / 16

    lora = adapter(ids, torch.ones_like(ids, dtype=torch.bool))
    loss_of(lora).backward()
    grads = adapter.last_probe
    assert set(grads) == set(adapter.bank.kinds)
    # Finite differences along a random extra B (per sample and target) on the bank's A.
    adapter.probe = False
    base = adapter(ids, torch.ones_like(ids, dtype=torch.bool))
    gen = torch.Generator().manual_seed(5)
    for sample_only in (0, 1, None):
        direction = {k: torch.randn(p.shape, generator=gen) for k, p in grads.items()}
        if sample_only is not None:
            for d in direction.values():
                d[1 - sample_only] = 0
        predicted = sum(float((grads[k].grad * direction[k]).sum()) for k in grads)

        def shifted(eps: float, direction=direction) -> GeneratedLoRA:
            weights = {}
            for kind in adapter.bank.kinds:
                a = adapter.bank.factors(kind)[0]
                for j, t in enumerate(adapter.bank.group(kind)):
                    w = base.weights[t.name]
                    extra = eps * direction[kind][:, j]
                    weights[t.name] = LoRAWeights(
                        torch.cat([w.A, a[j].expand(2, -1, -1)], 1), torch.cat([w.B, extra], 2), kind
                    )
            return GeneratedLoRA(weights, base.scale)

        with torch.no_grad():
            eps = 1e-3  # the tiny random student is strongly curved: 1e-2 is already non-linear
            measured = float((loss_of(shifted(eps)) - loss_of(shifted(-eps))) / (2 * eps))
        assert abs(measured - predicted) <= 1e-2 * abs(predicted) + 1e-3, (sample_only, measured, predicted)
    # Sample 0's probe gradient does not depend on sample 1 (a per-sample gradient).
    adapter.probe = True
    ids2 = ids.clone()
    ids2[1] = prompts(1, 8, seed=9)[0][0]
    loss_of_other = (
        weight.double() * hidden(student, adapter(ids2, torch.ones_like(ids2, dtype=torch.bool)), ids2).double()
    ).sum() / 16
    loss_of_other.backward()
    for k in grads:
        torch.testing.assert_close(adapter.last_probe[k].grad[0], grads[k].grad[0])


def test_before_routing_it_is_the_bank_a_static_lora(student):
    adapter = routed_adapter(student)
    ids, mask = prompts(3, seed=1)
    x = torch.randint(0, 151_000, (3, 6))
    with torch.no_grad():
        assert torch.equal(
            hidden(student, adapter(ids, mask), x), student.model(input_ids=x, use_cache=False).last_hidden_state
        )
        randomise_bank(adapter)
        static = StaticLoRA(adapter.config, adapter.targets)
        static.bank.load_state_dict(adapter.bank.state_dict())
        ours, theirs = adapter(ids, mask), static(ids, mask)
        for name, w in ours.weights.items():
            assert torch.equal(w.A, theirs.weights[name].A) and torch.equal(w.B, theirs.weights[name].B)
        adapter.probe = True  # the zero probe leaves the output as it was
        torch.testing.assert_close(hidden(student, adapter(ids, mask), x), hidden(student, ours, x))


def test_switch_routes_each_prompt_to_one_expert_and_freezes_encoder_and_router(student):
    adapter = routed_adapter(student)
    randomise_bank(adapter)
    adapter.probe = True
    ids, mask = prompts(8, seed=2)
    with torch.no_grad():
        adapter.router.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0]))
        adapter.router.weight.mul_(100)  # spread the prompts over the experts
    set_routing(adapter)
    assert adapter.routed and not adapter.probe
    assert all(int(torch.count_nonzero(b)) == 0 for b in adapter.bank.B.values())
    assert not any(p.requires_grad for m in (adapter.encoder, adapter.router) for p in m.parameters())
    experts = adapter.experts(ids, mask)
    assert len(set(experts.tolist())) > 1
    randomise_bank(adapter)
    lora = adapter(ids, mask)
    block = adapter.config.rank // adapter.config.experts
    for kind in adapter.bank.kinds:
        a = adapter.bank.factors(kind)[0]
        w = lora.weights[adapter.bank.group(kind)[0].name]
        assert w.A.shape[1] == adapter.config.rank  # no probe after the switch
        for b, e in enumerate(experts.tolist()):
            keep = torch.zeros(adapter.config.rank, dtype=torch.bool)
            keep[e * block : (e + 1) * block] = True
            assert torch.equal(w.A[b][keep], adapter.config.experts * a[0][keep])
            assert int(torch.count_nonzero(w.A[b][~keep])) == 0
    hidden(student, lora, torch.randint(0, 151_000, (8, 5))).square().mean().backward()
    assert all(p.grad is None for m in (adapter.encoder, adapter.router) for p in m.parameters())
    assert all(p.grad is not None for p in adapter.bank.parameters())


def test_checkpoint_keeps_routing_set(student):
    adapter = routed_adapter(student)
    with torch.no_grad():
        adapter.router.weight.mul_(100)
    set_routing(adapter)
    randomise_bank(adapter)
    state = adapter.state_dict()
    assert "routing_set" in state
    fresh = routed_adapter(student)
    assert not fresh.routed
    fresh.load_state_dict(state)
    assert fresh.routed and not any(p.requires_grad for p in fresh.router.parameters())
    assert not any(p.requires_grad for p in fresh.encoder.parameters())
    ids, mask = prompts(6, seed=7)
    assert torch.equal(fresh.experts(ids, mask), adapter.experts(ids, mask))
    for name, w in fresh(ids, mask).weights.items():
        assert torch.equal(w.A, adapter(ids, mask).weights[name].A)


def separable_prompts(n: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Prompt i of group g: random shared tokens around group g's keyword token."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat(n // 4)
    keywords = torch.tensor([1000, 2000, 3000, 4000])
    out = []
    for g in labels.tolist():
        noise = torch.randint(5000, 150_000, (6,), generator=gen)
        out.append(torch.cat([noise[:3], keywords[g : g + 1], noise[3:]]))
    return out, labels


def test_pretrain_router_learns_separable_prompts(student):
    adapter = routed_adapter(student)
    train, labels = separable_prompts(64, seed=0)
    ce = pretrain_router(adapter, train, labels, steps=40, lr=3e-3, batch_size=16)
    assert ce < 0.5
    assert all(p.grad is None for m in (adapter.encoder, adapter.router) for p in m.parameters())
    held_out, truth = separable_prompts(32, seed=1)
    ids = torch.stack(held_out)
    accuracy = float((adapter.experts(ids, torch.ones_like(ids, dtype=torch.bool)) == truth).float().mean())
    assert accuracy >= 0.9


def test_bootstrap_and_route_end_to_end(student):
    adapter = routed_adapter(student)
    adapter.probe = True
    boot = Bootstrap()
    for step in range(2):
        ids, mask = prompts(4, seed=step)
        hidden(student, adapter(ids, mask), ids).square().mean().backward()
        boot.record(adapter, ids, mask)
    assert torch.cat(boot.features).shape[0] == len(boot.prompts) == 8
    labels = route(adapter, boot)
    assert labels.bincount(minlength=4).tolist() == [2, 2, 2, 2] and adapter.routed


def test_schedule_helpers_and_config():
    assert [rewarm_factor(s, 60, 10) for s in (59, 60, 64, 69, 70)] == [1.0, 0.1, 0.5, 1.0, 1.0]
    assert rewarm_factor(60, 60, 0) == 1.0
    assert purity([0, 0, 1, 1], [3, 3, 2, 2], 4) == 1.0 and purity([0, 0, 1, 1], [1, 1, 1, 1], 4) == 0.5
    assert HyperLoRAConfig(kind="routed").route_after_steps == 60
    for bad in (
        dict(route_after_steps=0),
        dict(router_pretrain_lr=0.0),
        dict(route_rewarm_steps=-1),
        dict(cluster_dims=0),
    ):
        with pytest.raises(ValueError):
            HyperLoRAConfig(kind="routed", **bad)


def test_trainer_schedule_on_one_process_is_route(student, tmp_path):
    """`RoutingSchedule` (what the Trainer calls) on a plain adapter: the probe and records during the
    bootstrap, a state that round-trips, and at step K the same adapter as `route` gives."""
    ref, ours = routed_adapter(student), routed_adapter(student)
    schedule = schedule_for(ours, student, tmp_path)
    assert not any(p.requires_grad for m in (ours.encoder, ours.router) for p in m.parameters())
    ref.probe, boot = True, Bootstrap()
    for step in range(2):
        assert not schedule.before_step(step) and ours.probe
        ids, mask = prompts(4, seed=step)
        for adapter in (ref, ours):
            hidden(student, adapter(ids, mask), ids).square().mean().backward()
        boot.record(ref, ids, mask)
        schedule.after_backward(SimpleNamespace(prompt_ids=ids, prompt_mask=mask), None, None, None)
    state = schedule.state_dict()
    schedule.load_state_dict(None)
    assert schedule.state_dict() == EMPTY_STATE
    schedule.load_state_dict(state)
    labels = route(ref, boot)
    assert schedule.before_step(2) and ours.routed and not ours.probe
    assert schedule.state_dict() == EMPTY_STATE
    for (name, p), q in zip(ref.state_dict().items(), ours.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    record = json.loads((tmp_path / "routing_rank0.json").read_text())
    assert record["step"] == 2 and record["cluster_sizes"] == labels.bincount(minlength=4).tolist()
    ids = torch.stack(boot.prompts)
    assert record["experts"] == ref.experts(ids, torch.ones_like(ids, dtype=torch.bool)).tolist()
    assert not schedule.before_step(3)
    assert [schedule.lr_factor(s) for s in (1, 2, 3)] == [1.0, 0.1, 0.2]  # route_rewarm_steps: 10


def test_principal_components_of_row_blocks_are_the_svds():
    # The clustering reads the Gram matrix of the blocks, summed over column chunks, never the
    # [N, D] matrix in float64: the same components as the SVD of the normalised, centred rows.
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(30, 50, generator=gen) * torch.linspace(0.1, 3, 50)
    x = rows.double() / rows.double().norm(dim=1, keepdim=True)
    u, s, _ = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    ours = principal_components([rows[:7], rows[7:19], rows[19:]], dims=5, chunk=8)
    assert torch.allclose(ours.abs(), (u[:, :5] * s[:5]).abs(), atol=1e-9)


def test_probe_features_sketch_keeps_inner_products_and_is_the_same_everywhere():
    gen = torch.Generator().manual_seed(0)
    grads = {kind: torch.randn(3, 2, 300, 8, generator=gen) for kind in ("q_proj", "out_proj")}
    probes = {kind: SimpleNamespace(grad=g) for kind, g in grads.items()}
    whole = probe_features(probes)
    assert whole.shape == (3, 2 * 2 * 300 * 8) and torch.equal(probe_features(probes, dim=whole.shape[1]), whole)
    sketch = probe_features(probes, dim=2048)
    assert sketch.shape == (3, 2048) and torch.equal(sketch, probe_features(probes, dim=2048))
    # A fixed linear map: inner products kept within ~ |x| |y| / sqrt(dim).
    mixed = whole[0] + 0.5 * whole[1]
    exact, sketched = mixed @ whole[0], (sketch[0] + 0.5 * sketch[1]) @ sketch[0]
    assert abs(float(sketched - exact)) < 4 * float(mixed.norm() * whole[0].norm()) / 2048**0.5


def test_bootstrap_records_at_most_its_share_of_samples(student, tmp_path):
    adapter = routed_adapter(student, route_bootstrap_samples=5, route_after_steps=10)
    schedule = schedule_for(adapter, student, tmp_path)
    for step in range(4):
        schedule.before_step(step)
        ids, mask = prompts(2, seed=step)
        hidden(student, adapter(ids, mask), ids).square().mean().backward()
        schedule.after_backward(SimpleNamespace(prompt_ids=ids, prompt_mask=mask), None, None, None)
    # Whole micro-batches while fewer than 5 are held: 2, 4, 6, then none.
    assert len(schedule.bootstrap.prompts) == 6 and len(schedule.bootstrap.features) == 3


def batch_of(ids: torch.Tensor) -> SimpleNamespace:
    """A `Batch` whose prompt is the whole sequence."""
    ones = torch.ones_like(ids, dtype=torch.bool)
    return SimpleNamespace(input_ids=ids, attention_mask=ones.long(), prompt_ids=ids, prompt_mask=ones)


@torch.no_grad()
def teacher_from(student, adapter, ids: torch.Tensor, experts: torch.Tensor, k: int = 8):
    """Top-K of the student's own next-token distribution with expert ``experts[b]`` for sample b."""
    lora = adapter(ids, torch.ones_like(ids, dtype=torch.bool), experts=experts)
    top = student.lm_head(hidden(student, lora, ids)[:, :-1]).log_softmax(-1).topk(k, dim=-1)
    return top.indices, top.values


def test_expert_losses_score_every_sample_under_every_expert(student):
    adapter = routed_adapter(student)
    randomise_bank(adapter)
    ids, _ = prompts(4, width=12, seed=3)
    truth = torch.tensor([2, 0, 3, 1])
    teacher_ids, teacher_lp = teacher_from(student, adapter, ids, truth)
    mask = torch.ones(4, 11, dtype=torch.bool)
    mask[1, :5] = False
    mask[3] = False  # no scored position
    losses = expert_losses(student, adapter, batch_of(ids), teacher_ids, teacher_lp, mask, OptimConfig(), "cpu")
    assert losses.shape == (4, 4) and losses.dtype == torch.float32
    for b in range(3):  # the teacher is the student with expert truth[b]: KL 0 there, not elsewhere
        assert float(losses[b, truth[b]]) < 1e-5
        assert float(losses[b].sort().values[1]) > 1e-3, losses[b]
    assert torch.equal(losses[3], torch.zeros(4))
    # Sample 1 under expert 3 (not its teacher's): the mean KL over its scored positions alone.
    from hyperdistill.trainer.loss import topk_kl_per_position

    lora = adapter(ids[1:2], torch.ones(1, 12, dtype=torch.bool), experts=torch.tensor([3]))
    h = hidden(student, lora, ids[1:2])[0, :-1][mask[1]]
    direct = topk_kl_per_position(h, student.lm_head, teacher_ids[1][mask[1]], teacher_lp[1][mask[1]]).mean()
    assert float(direct) > 1e-3 and float(losses[1, 3]) == pytest.approx(float(direct), rel=1e-4)


def test_relabel_trains_the_router_to_each_prompts_lowest_loss_expert(student):
    adapter = routed_adapter(student, router_pretrain_steps=40, router_pretrain_batch=16)
    set_routing(adapter)
    randomise_bank(adapter)
    bank = {name: t.clone() for name, t in adapter.bank.state_dict().items()}
    train, groups = separable_prompts(64, seed=0)
    losses = torch.rand(64, 4, generator=torch.Generator().manual_seed(0)) + 1.0
    losses[torch.arange(64), groups] = 0.5
    scored = Bootstrap()
    scored.add(losses, torch.stack(train), torch.ones(64, 7, dtype=torch.bool))
    rng = torch.random.get_rng_state()
    found = relabel(adapter, scored, seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the fresh router is drawn aside
    assert torch.equal(found.labels, groups) and len(found.prompts) == 64
    assert float((found.experts == groups).float().mean()) >= 0.9
    held_out, truth = separable_prompts(32, seed=1)
    ids = torch.stack(held_out)
    assert float((adapter.experts(ids, torch.ones_like(ids, dtype=torch.bool)) == truth).float().mean()) >= 0.9
    frozen = (adapter.encoder, adapter.router)
    assert adapter.routed and not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(torch.equal(bank[name], t) for name, t in adapter.bank.state_dict().items())  # experts untouched
    assert relabel(adapter, Bootstrap()) is None


def test_schedule_rerouting_windows_score_then_relabel(student, tmp_path):
    """K = 1, R = 1, W = 2, two rounds: windows at steps 2-3 and 5-6, re-routings before steps 4 and 7;
    the records are checkpointable."""
    adapter = routed_adapter(
        student, route_after_steps=1, route_relabel_after=1, route_relabel_steps=2, route_relabel_rounds=2
    )
    schedule = schedule_for(adapter, student, tmp_path)
    assert schedule.relabel_window() == range(2, 4)
    experts = torch.tensor([0, 1, 2, 3])
    held = []
    for step in range(9):
        switched = schedule.before_step(step)
        assert switched == (step == 1)
        if step == 2:
            randomise_bank(adapter)  # experts that differ (the switch zeroed B; nothing trains B here)
        ids, mask = prompts(4, seed=step)
        hidden(student, adapter(ids, mask), ids).square().mean().backward()
        teacher_ids, teacher_lp = teacher_from(student, adapter, ids, experts)
        schedule.after_backward(batch_of(ids), teacher_ids, teacher_lp, torch.ones(4, 9, dtype=torch.bool))
        held.append(len(schedule.scored))
        if step == 3:
            state = schedule.state_dict()
            assert len(state["scored_losses"]) == 2 and state["relabels"] == 0
            schedule.load_state_dict(None)
            schedule.load_state_dict(state)
        if step == 4:
            assert schedule.relabels == 1 and schedule.relabel_window() == range(5, 7)
            first = json.loads((tmp_path / "relabel_rank0.json").read_text())
    assert held == [0, 0, 4, 8, 0, 4, 8, 0, 0]  # scored in the windows only; cleared by each re-routing
    assert schedule.relabels == 2 and schedule.state_dict()["relabels"] == 2 and schedule.relabel_window() is None
    # The lowest KL is where each sample's teacher is: experts 0..3 in every scored batch.
    assert torch.equal(schedule.events["relabel"].labels, experts.repeat(2))
    assert first["step"] == 4 and first["round"] == 1 and first["cluster_sizes"] == [2, 2, 2, 2]
    record = json.loads((tmp_path / "relabel_rank0.json").read_text())
    assert record["step"] == 7 and record["round"] == 2 and record["prompts"] == 8
