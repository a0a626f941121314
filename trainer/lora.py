"""Per-sample LoRA injection into a frozen student: the one mechanism.

At set-up, `wrap_targets` swaps each target `nn.Linear` for a `LoRALinear` that shares the
same weight and bias Parameters (so state-dict keys, `isinstance(m, nn.Linear)` and FSDP
plans keep working). Inside

    with hyper_lora(student, lora, seq_len=T):
        hidden = student.model(input_ids, attention_mask=mask).last_hidden_state

every wrapped module computes ``base(x) + scale * (x @ A_b^T) @ B_b^T`` with the A, B of
sample ``b``; outside the context it runs `nn.Linear.forward` alone, exactly as unwrapped.

Gradient checkpointing recomputes layers during backward, usually after the context has
exited. `enable_gradient_checkpointing` hands torch's checkpoint a `context_fn` that
re-activates, for the recompute, the LoRA that was active when the layer first ran.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LoRAWeights:
    """Generated LoRA factors of one target module for a batch of prompts.

    A: float [B, r, in]; B: float [B, out, r]; kind: the module type (the configured
    target name, e.g. ``linear_attn.in_proj_qkvz``).
    """

    A: torch.Tensor
    B: torch.Tensor
    kind: str


@dataclass(frozen=True, eq=False)
class GeneratedLoRA:
    """Per-sample LoRA for every target: full module name -> factors, and the LoRA scale."""

    weights: dict[str, LoRAWeights]
    scale: float

    @property
    def batch_size(self) -> int:
        """B, the number of prompts (every factor's leading dimension)."""
        return next(iter(self.weights.values())).A.shape[0]


@dataclass(frozen=True, eq=False)
class _Active:
    """What one wrapped module applies while a `hyper_lora` context is active."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    seq_len: int | None
    """T of every input, checked; None: any T (KV-cache decoding feeds the prompt, then 1 token a step)."""


class LoRALinear(nn.Linear):
    """An `nn.Linear` (same Parameters) that adds a per-sample LoRA while one is active."""

    def __init__(self, base: nn.Linear, name: str):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.target_name = name
        self.active: _Active | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, in] or flattened [B*T, in] -> [..., out] in x's dtype."""
        out = super().forward(x)
        if self.active is None:
            return out
        return out + self._delta(x, self.active)

    def _delta(self, x: torch.Tensor, lora: _Active) -> torch.Tensor:
        """``scale * (x @ A_b^T) @ B_b^T`` per sample; x viewed as [B, T, in]."""
        batch, lead = lora.A.shape[0], tuple(x.shape[:-1])
        seq_len = lora.seq_len
        if seq_len is None:  # infer T: x is [B, T, in] or [B*T, in]
            seq_len = lead[-1] if len(lead) == 2 else (lead[0] // batch if lead and lead[0] % batch == 0 else -1)
        if lead not in ((batch, seq_len), (batch * seq_len,)):
            raise ValueError(
                f"LoRA on {self.target_name}: input leading dims {list(lead)} fit neither "
                f"[B, T] = [{batch}, {seq_len}] nor [B*T] = [{batch * seq_len}]"
            )
        x3 = x.reshape(batch, seq_len, self.in_features)
        xa = torch.bmm(x3, lora.A.to(x.dtype).transpose(1, 2)) * lora.scale  # [B, T, r]
        delta = torch.bmm(xa, lora.B.to(x.dtype).transpose(1, 2))  # [B, T, out]
        return delta.reshape(*lead, self.out_features)


def wrap_targets(model: nn.Module, names: Iterable[str]) -> list[LoRALinear]:
    """Swap the named `nn.Linear`s of `model` for `LoRALinear`s (once; re-wrapping is a no-op).

    The wrapped weights are frozen. Do this before FSDP sharding, since it replaces modules.
    """
    wrapped = []
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"LoRA target {name} is a {type(module).__name__}, not an nn.Linear")
        if not isinstance(module, LoRALinear):
            module.requires_grad_(False)
            module = LoRALinear(module, name)
            model.set_submodule(name, module)
        wrapped.append(module)
    log.info("LoRA wraps %d linear modules", len(wrapped))
    return wrapped


def wrapped_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The `LoRALinear`s of `model` by full module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


# The activations of the `hyper_lora` contexts open right now; read by `checkpoint_context_fn`.
_ACTIVE: list[dict[LoRALinear, _Active]] = []


@contextlib.contextmanager
def hyper_lora(model: nn.Module, lora: GeneratedLoRA, *, seq_len: int | None) -> Iterator[None]:
    """Apply `lora` to the wrapped targets of `model` for inputs of B = lora.batch_size rows of T = seq_len
    tokens (None: of any length, e.g. `generate` with a KV cache: the prompt, then one token a step).

    Every wrapped module must have factors in `lora` and vice versa; shapes are checked
    against the modules (errors name the target). Contexts do not nest on one module.
    """
    plan = _plan(model, lora, seq_len)
    if any(m.active is not None for m in plan):
        raise RuntimeError("hyper_lora is already active on this model; contexts do not nest")
    _ACTIVE.append(plan)
    _set(plan)
    try:
        yield
    finally:
        _ACTIVE[:] = [p for p in _ACTIVE if p is not plan]
        _set(dict.fromkeys(plan))


def _plan(model: nn.Module, lora: GeneratedLoRA, seq_len: int | None) -> dict[LoRALinear, _Active]:
    """Match generated factors to wrapped modules and validate every shape."""
    modules = wrapped_modules(model)
    unknown = sorted(set(lora.weights) - set(modules))
    if unknown:
        raise KeyError(f"LoRA generated for modules that are not wrapped targets: {', '.join(unknown)}")
    missing = sorted(set(modules) - set(lora.weights))
    if missing:
        raise KeyError(f"wrapped targets without a generated LoRA: {', '.join(missing)}")
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"hyper_lora: seq_len must be >= 1, got {seq_len}")
    batch = lora.batch_size
    for name, w in lora.weights.items():
        _check_shapes(name, modules[name], w, batch)
    return {modules[n]: _Active(w.A, w.B, lora.scale, seq_len) for n, w in lora.weights.items()}


def _check_shapes(name: str, module: nn.Linear, w: LoRAWeights, batch: int) -> None:
    """A must be [B, r, in] and B [B, out, r] for this module and batch."""
    a, b = tuple(w.A.shape), tuple(w.B.shape)
    if len(a) != 3 or len(b) != 3 or a[0] != batch or b[0] != batch or b[2] != a[1]:
        raise ValueError(f"LoRA for {name}: A {list(a)} and B {list(b)} are not [B={batch}, r, in] and [B, out, r]")
    if a[2] != module.in_features or b[1] != module.out_features:
        raise ValueError(
            f"LoRA for {name}: A {list(a)}, B {list(b)} do not fit the module "
            f"(in_features={module.in_features}, out_features={module.out_features})"
        )


def _set(plan: dict[LoRALinear, _Active | None]) -> None:
    for module, active in plan.items():
        module.active = active


def checkpoint_context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`context_fn` for `torch.utils.checkpoint`: the recompute sees the LoRA the forward saw."""
    snapshot = [dict(plan) for plan in _ACTIVE]
    return contextlib.nullcontext(), _reactivated(snapshot)


@contextlib.contextmanager
def _reactivated(snapshot: list[dict[LoRALinear, _Active]]) -> Iterator[None]:
    previous = {m: m.active for plan in snapshot for m in plan}
    for plan in snapshot:
        _set(plan)
    try:
        yield
    finally:
        _set(previous)


def enable_gradient_checkpointing(model: nn.Module) -> list[nn.Module]:
    """Turn on transformers' per-layer gradient checkpointing in a LoRA-aware way (non-reentrant);
    returns the checkpointed layers.

    Without `checkpoint_context_fn`, a backward after the `hyper_lora` context would
    recompute layers without the LoRA (torch then raises a saved-tensor mismatch).
    transformers checkpoints a layer only while ``layer.training`` is set, and the frozen
    student stays in eval mode: the layers' own flag is set (not their children's, so
    dropout and every other train-mode behaviour stay off). A later ``model.eval()`` or
    ``model.train()`` changes it again.
    """
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_context_fn}
    )
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    if not layers:
        raise RuntimeError(f"{type(model).__name__} has no layer that supports gradient checkpointing")
    for layer in layers:
        layer.training = True
    return layers


@torch.no_grad()
def lora_norms(lora: GeneratedLoRA) -> dict[str, dict[str, float]]:
    """Per module type: mean Frobenius norms of A, B and of ``scale * B @ A`` over layers and samples.

    For metrics (e.g. Prometheus gauges labelled by module type). ``||B A||_F`` comes from
    the r x r Gram matrices, ``||BA||^2 = sum((B^T B) * (A A^T))``, so [out, in] never exists.
    """
    by_kind: dict[str, list[torch.Tensor]] = {}
    for w in lora.weights.values():
        a, b = w.A.float(), w.B.float()
        gram = (b.transpose(1, 2) @ b) * (a @ a.transpose(1, 2))  # [B, r, r]
        delta = lora.scale * gram.sum((1, 2)).clamp_min(0).sqrt()
        norms = torch.stack([a.norm(dim=(1, 2)).mean(), b.norm(dim=(1, 2)).mean(), delta.mean()])
        by_kind.setdefault(w.kind, []).append(norms)
    return {
        kind: dict(zip(("A", "B", "delta"), torch.stack(rows).mean(0).tolist(), strict=True))
        for kind, rows in by_kind.items()
    }
