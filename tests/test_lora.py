"""LoRA injection: exact base forward outside the context, per-sample deltas, errors, checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hyperdistill.trainer.hypernetwork import DEFAULT_TARGETS, find_targets
from hyperdistill.trainer.lora import (
    GeneratedLoRA,
    LoRALinear,
    LoRAWeights,
    enable_gradient_checkpointing,
    hyper_lora,
    lora_norms,
    wrap_targets,
)

B, T, IN, OUT, R = 3, 5, 6, 7, 2


class Toy(nn.Module):
    """One 'decoder layer' whose projection sees [B, T, in], or [B*T, in] when `flatten`."""

    def __init__(self, flatten: bool):
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].proj = nn.Linear(IN, OUT)
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.layers[0].proj
        return proj(x.reshape(-1, IN)).reshape(*x.shape[:2], OUT) if self.flatten else proj(x)


def random_lora(specs: dict[str, tuple[int, int]], batch: int, rank: int = R, scale: float = 0.5, seed: int = 0):
    """Random non-zero factors (leaf tensors requiring grad) for {name: (in, out)}."""
    gen = torch.Generator().manual_seed(seed)
    weights = {
        name: LoRAWeights(
            torch.randn(batch, rank, i, generator=gen).requires_grad_(),
            torch.randn(batch, o, rank, generator=gen).requires_grad_(),
            name.split(".")[-1],
        )
        for name, (i, o) in specs.items()
    }
    return GeneratedLoRA(weights=weights, scale=scale)


@pytest.fixture
def toy():
    torch.manual_seed(0)
    model = Toy(flatten=False)
    reference = nn.Linear(IN, OUT)
    reference.load_state_dict(model.layers[0].proj.state_dict())
    wrap_targets(model, ["layers.0.proj"])
    return model, reference


def test_outside_context_is_the_base_forward_bitwise(toy):
    model, reference = toy
    x = torch.randn(B, T, IN)
    assert torch.equal(model(x), reference(x))
    with hyper_lora(model, random_lora({"layers.0.proj": (IN, OUT)}, B), seq_len=T):
        assert not torch.equal(model(x), reference(x))
    assert torch.equal(model(x), reference(x))


def test_wrapping_keeps_parameters_and_names(toy):
    model, reference = toy
    proj = model.layers[0].proj
    assert isinstance(proj, LoRALinear) and isinstance(proj, nn.Linear)
    assert set(model.state_dict()) == {"layers.0.proj.weight", "layers.0.proj.bias"}
    assert not any(p.requires_grad for p in proj.parameters())
    assert wrap_targets(model, ["layers.0.proj"]) == [proj]  # wrapping again is a no-op


@pytest.mark.parametrize("flatten", [False, True])
def test_per_sample_delta(flatten):
    torch.manual_seed(0)
    model = Toy(flatten)
    base = model.layers[0].proj
    wrap_targets(model, ["layers.0.proj"])
    lora = random_lora({"layers.0.proj": (IN, OUT)}, B)
    x = torch.randn(B, T, IN)
    with hyper_lora(model, lora, seq_len=T):
        out = model(x)
    w = lora.weights["layers.0.proj"]
    for b in range(B):
        want = nn.functional.linear(x[b], base.weight, base.bias) + lora.scale * x[b] @ w.A[b].T @ w.B[b].T
        torch.testing.assert_close(out[b], want)


def test_gradients_reach_lora_not_base(toy):
    model, _ = toy
    lora = random_lora({"layers.0.proj": (IN, OUT)}, B)
    with hyper_lora(model, lora, seq_len=T):
        model(torch.randn(B, T, IN)).square().sum().backward()
    w = lora.weights["layers.0.proj"]
    assert w.A.grad.abs().sum() > 0 and w.B.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_leading_dims_that_do_not_fit(toy):
    model, _ = toy
    with hyper_lora(model, random_lora({"layers.0.proj": (IN, OUT)}, B), seq_len=T + 1):
        with pytest.raises(ValueError, match=r"layers\.0\.proj.*fit neither"):
            model(torch.randn(B, T, IN))


def test_shape_and_name_errors_name_the_target(toy):
    model, _ = toy
    name = "layers.0.proj"
    with pytest.raises(ValueError, match=rf"{name}.*in_features=6"):
        hyper_lora(model, random_lora({name: (IN + 1, OUT)}, B), seq_len=T).__enter__()
    with pytest.raises(ValueError, match=rf"{name}.*out_features=7"):
        hyper_lora(model, random_lora({name: (IN, OUT + 1)}, B), seq_len=T).__enter__()
    with pytest.raises(KeyError, match="layers.1.proj"):
        hyper_lora(model, random_lora({name: (IN, OUT), "layers.1.proj": (IN, OUT)}, B), seq_len=T).__enter__()
    with pytest.raises(KeyError, match="without a generated LoRA"):
        hyper_lora(model, GeneratedLoRA(weights={}, scale=1.0), seq_len=T).__enter__()
    mixed = random_lora({name: (IN, OUT)}, B)
    bad = LoRAWeights(mixed.weights[name].A, mixed.weights[name].B[:1], "proj")
    with pytest.raises(ValueError, match=rf"{name}.*not \[B=3, r, in\]"):
        hyper_lora(model, GeneratedLoRA(weights={name: bad}, scale=1.0), seq_len=T).__enter__()
    with pytest.raises(TypeError, match="not an nn.Linear"):
        wrap_targets(model, ["layers.0"])


def test_context_does_not_nest_and_always_clears(toy):
    model, reference = toy
    lora = random_lora({"layers.0.proj": (IN, OUT)}, B)
    with hyper_lora(model, lora, seq_len=T):
        with pytest.raises(RuntimeError, match="already active"):
            hyper_lora(model, lora, seq_len=T).__enter__()
    with pytest.raises(ZeroDivisionError):
        with hyper_lora(model, lora, seq_len=T):
            raise ZeroDivisionError
    x = torch.randn(B, T, IN)
    assert model.layers[0].proj.active is None and torch.equal(model(x), reference(x))


def test_lora_norms_match_explicit_products():
    lora = random_lora({"layers.0.a.proj": (IN, OUT), "layers.1.a.proj": (IN, OUT)}, B, scale=0.25)
    norms = lora_norms(lora)
    ws = list(lora.weights.values())
    delta = torch.stack([(lora.scale * w.B[b] @ w.A[b]).norm() for w in ws for b in range(B)]).mean()
    assert set(norms) == {"proj"}
    assert norms["proj"]["delta"] == pytest.approx(delta.item(), rel=1e-5)
    assert norms["proj"]["A"] == pytest.approx(torch.stack([w.A.norm(dim=(1, 2)) for w in ws]).mean().item(), rel=1e-5)


@pytest.fixture(scope="module")
def student(tiny_models):
    """The tiny Qwen3-Next student, its logits before wrapping, and its targets wrapped."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models.student, dtype=torch.float32).requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    targets = find_targets(model, DEFAULT_TARGETS)
    wrap_targets(model, [t.name for t in targets])
    return model, ids, before, {t.name: (t.in_features, t.out_features) for t in targets}


def test_student_outside_context_is_bitwise_unchanged(student):
    model, ids, before, specs = student
    assert len(specs) == 13  # 3 DeltaNet layers x 3 + 1 attention layer x 4
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, before)
        with hyper_lora(model, random_lora(specs, 2, scale=0.01), seq_len=ids.shape[1]):
            assert not torch.equal(model(ids, use_cache=False).logits, before)
        assert torch.equal(model(ids, use_cache=False).logits, before)


def _lora_grads(model, ids, specs, checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Loss, LoRA gradients and forward calls of one target, with backward after the context exits."""
    lora = random_lora(specs, 2, scale=0.01)
    calls = []
    hook = model.get_submodule(next(iter(specs))).register_forward_hook(lambda *_: calls.append(1))
    model.train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    try:
        with hyper_lora(model, lora, seq_len=ids.shape[1]):
            loss = model.model(ids, use_cache=False).last_hidden_state.square().mean()
        loss.backward()
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
        hook.remove()
    return loss.detach(), [t.grad for w in lora.weights.values() for t in (w.A, w.B)], len(calls)


def test_gradient_checkpointing_recomputes_with_the_lora(student):
    model, ids, _, specs = student
    loss, grads, calls = _lora_grads(model, ids, specs, checkpointing=False)
    loss_ckpt, grads_ckpt, calls_ckpt = _lora_grads(model, ids, specs, checkpointing=True)
    assert (calls, calls_ckpt) == (1, 2)  # the checkpointed run recomputed the layer in backward
    torch.testing.assert_close(loss_ckpt, loss)
    assert all(g.abs().sum() > 0 for g in grads)
    for g, g_ckpt in zip(grads, grads_ckpt, strict=True):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-4, atol=1e-7)


def test_plain_checkpointing_without_the_context_fn_fails_loudly(student):
    """Why `enable_gradient_checkpointing` exists: transformers' default recompute runs after the
    context has exited, without the LoRA, and torch refuses the mismatched recomputation."""
    model, ids, _, specs = student
    model.train()
    model.gradient_checkpointing_enable()
    try:
        with hyper_lora(model, random_lora(specs, 2, scale=0.01), seq_len=ids.shape[1]):
            loss = model.model(ids, use_cache=False).last_hidden_state.square().mean()
        with pytest.raises(torch.utils.checkpoint.CheckpointError):
            loss.backward()
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
