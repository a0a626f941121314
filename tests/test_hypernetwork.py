"""The hypernetwork on the tiny Qwen3-Next student: shapes, init, prompts, targets, config."""

from __future__ import annotations

import pytest
import torch

from hyperdistill.common.config import ConfigError, load_config
from hyperdistill.trainer.hypernetwork import (
    HyperLoRAConfig,
    StaticLoRA,
    build_hyper_lora,
    find_targets,
    truncate_prompts,
)
from hyperdistill.trainer.lora import hyper_lora
from hyperdistill.trainer.param_table import build_meta, render, table_rows

SMALL = dict(
    rank=4,
    alpha=8.0,
    encoder_dim=64,
    encoder_heads=4,
    encoder_layers=1,
    trunk_dim=64,
    trunk_layers=1,
    max_prompt_tokens=24,
)


@pytest.fixture(scope="module")
def student(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models.student, dtype=torch.float32)


@pytest.fixture(scope="module")
def hyper(student):
    torch.manual_seed(0)
    return build_hyper_lora(HyperLoRAConfig(**SMALL), student).eval()


def prompts(lengths: list[int], width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random prompts: ids int64 [B, width], mask bool [B, width]."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 151_000, (len(lengths), width), generator=gen)
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    return ids, mask


def test_batch_first_factors_for_every_target(student, hyper):
    lora = hyper(*prompts([10, 6], 12))
    targets = find_targets(student, HyperLoRAConfig().targets)
    assert list(lora.weights) == [t.name for t in targets] and len(targets) == 13
    for t in targets:
        w = lora.weights[t.name]
        assert w.kind == t.kind and w.A.dtype == torch.float32
        assert w.A.shape == (2, 4, t.in_features) and w.B.shape == (2, t.out_features, 4)
    assert lora.batch_size == 2 and lora.scale == 2.0


def test_zero_init_b_exact_and_a_like_lora(hyper):
    lora = hyper(*prompts([12] * 8, 12))
    assert all(bool((w.B == 0).all()) for w in lora.weights.values())
    a = torch.cat([w.A.flatten() for w in lora.weights.values()])  # every target has in = 128 here
    lora_std = (1 / (3 * 128)) ** 0.5  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
    assert abs(a.mean()) < 0.1 * lora_std and 0.75 < a.std() / lora_std < 1.33


def test_unit_gates_at_init_so_every_prompt_starts_from_the_bank(hyper):
    lora = hyper(*prompts([10, 6], 12))
    for w in lora.weights.values():
        assert torch.equal(w.A[0], w.A[1]) and torch.equal(w.B[0], w.B[1])


def test_per_sample_and_independent_of_padding(student):
    torch.manual_seed(0)
    hyper = build_hyper_lora(HyperLoRAConfig(**SMALL), student).eval()
    for head in hyper.generator.heads.values():  # as after training: the gates depend on the prompt
        torch.nn.init.normal_(head.weight, std=1.0)
    ids, mask = prompts([10, 6], 12)
    with torch.no_grad():
        batched = hyper(ids, mask)
        alone = hyper(ids[1:, :6], mask[1:, :6])
        left_padded = hyper(torch.roll(ids[1:], 6, dims=1), torch.roll(mask[1:], 6, dims=1))
    name = next(iter(batched.weights))
    a = batched.weights[name].A
    assert not torch.allclose(a[0], a[1])
    torch.testing.assert_close(a[1], alone.weights[name].A[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a[1], left_padded.weights[name].A[0], rtol=1e-4, atol=1e-6)


def test_gates_weight_the_experts_and_never_scale_the_update(student):
    """Whatever the heads, each target's gates are constant over an expert's rank directions and
    sum to r (n experts x r / n directions x mean gate 1): a prompt can move the update between the
    bank's experts, not make it larger (a free mixing matrix learned a large constant, issue 12)."""
    torch.manual_seed(0)
    hyper = build_hyper_lora(HyperLoRAConfig(**SMALL, experts=2), student).eval()
    for head in hyper.generator.heads.values():
        torch.nn.init.normal_(head.weight, std=1.0)
        torch.nn.init.normal_(head.bias, std=1.0)
    with torch.no_grad():
        gates = hyper.generator(hyper.encoder(*prompts([10, 6, 12], 12)))
    for g in gates.values():  # [B, L, r]: experts of r / n = 2 directions
        torch.testing.assert_close(g.sum(-1), torch.full(g.shape[:2], 4.0))
        assert torch.equal(g[..., 0], g[..., 1]) and torch.equal(g[..., 2], g[..., 3])
        assert not torch.allclose(g[0], g[1])


def test_truncation_keeps_the_last_tokens():
    ids = torch.tensor([[1, 2, 3, 4, 5, 0, 0], [0, 0, 6, 7, 8, 9, 10]])
    mask = ids != 0
    got_ids, got_mask = truncate_prompts(ids, mask, 3)
    assert got_ids.tolist() == [[3, 4, 5], [8, 9, 10]] and got_mask.all()
    got_ids, got_mask = truncate_prompts(ids, mask, 10)
    assert got_ids[got_mask].tolist() == ids[mask].tolist() and got_ids.shape == (2, 5)


def test_prompt_cap(hyper):
    ids, mask = prompts([40], 40)
    with torch.no_grad():
        long = hyper(ids, mask)
        tail = hyper(ids[:, -24:], mask[:, -24:])
    name = next(iter(long.weights))
    torch.testing.assert_close(long.weights[name].A, tail.weights[name].A)


def test_uses_the_students_frozen_embedding(student, hyper):
    embed = student.get_input_embeddings()
    assert hyper.encoder._embed is embed and not embed.weight.requires_grad
    owned = {p.data_ptr() for p in hyper.parameters()} | {t.data_ptr() for t in hyper.state_dict().values()}
    assert embed.weight.data_ptr() not in owned
    assert sum(p.numel() for p in hyper.parameters()) < embed.weight.numel() / 50


def test_empty_prompt_is_an_error(hyper):
    ids, mask = prompts([5, 0], 6)
    with pytest.raises(ValueError, match="at least one token"):
        hyper(ids, mask)


def test_generated_lora_applies_to_the_student(student, hyper):
    ids, mask = prompts([8, 8], 8)
    lora = hyper(ids, mask)
    with hyper_lora(student, lora, seq_len=8), torch.no_grad():
        student(ids, use_cache=False)


def test_target_errors(student):
    with pytest.raises(ValueError, match="'self_attn.qq_proj' matches no module"):
        find_targets(student, ["self_attn.qq_proj"])
    with pytest.raises(TypeError, match="mlp.experts.*not an nn.Linear"):
        find_targets(student, ["mlp.experts"])
    assert [t.layer for t in find_targets(student, ["self_attn.q_proj"])] == [3]


def test_static_kind_is_the_bank_for_every_prompt(student):
    static = build_hyper_lora(HyperLoRAConfig(**SMALL, kind="static"), student)
    assert isinstance(static, StaticLoRA) and list(static.parameter_groups()) == ["bank"]
    with torch.no_grad():
        static.bank.B["self_attn_q_proj"].normal_()
    lora = static(*prompts([10, 6], 12))
    w = lora.weights["model.layers.3.self_attn.q_proj"]
    assert torch.equal(w.B[0], static.bank.B["self_attn_q_proj"][0]) and torch.equal(w.A[0], w.A[1])
    assert w.A.shape == (2, 4, 128) and w.B.shape[0::2] == (2, 4)


def test_parameter_groups_partition_the_parameters(hyper):
    groups = hyper.parameter_groups()
    assert list(groups)[:2] == ["encoder", "trunk"] and len(groups) == 2 + 7 + 1 and "bank" in groups
    grouped = [id(p) for params in groups.values() for p in params]
    assert sorted(grouped) == sorted(id(p) for p in hyper.parameters())


def test_config_loading_and_validation():
    config = load_config(HyperLoRAConfig, overrides=["rank=8", "alpha=16", "targets=[self_attn.q_proj]"])
    assert (config.rank, config.targets, config.scale) == (8, ["self_attn.q_proj"], 2.0)
    assert HyperLoRAConfig(rank=16, alpha=32, rslora=True).scale == 8.0
    with pytest.raises(ConfigError, match="unknown"):
        load_config(HyperLoRAConfig, overrides=["ranks=8"])
    for bad in (
        dict(rank=0),
        dict(targets=[]),
        dict(alpha=0.0),
        dict(encoder_dim=30, encoder_heads=4),
        dict(kind="mixed"),
        dict(rank=16, experts=3),
        dict(experts=0),
    ):
        with pytest.raises(ValueError):
            HyperLoRAConfig(**bad)


def test_param_table_for_the_real_shapes():
    config = HyperLoRAConfig()
    student, hyper = build_meta(config)
    rows = {row[0]: row for row in table_rows(config, hyper)}
    assert rows["linear_attn.in_proj_qkvz"][1:3] == (36, "2048 -> 12288")
    assert rows["self_attn.q_proj"][1:3] == (12, "2048 -> 8192")
    assert rows["self_attn.o_proj"][2] == "4096 -> 2048" and rows["linear_attn.in_proj_ba"][2] == "2048 -> 64"
    assert rows["total"][1] == 156 and rows["total"][6] == 17_141_760
    assert 5e6 < sum(p.numel() for p in hyper.parameters()) < 50e6
    assert "trainable" in render(config, student, hyper)
