"""HyperLoRA: a hypernetwork that reads a prompt and generates per-sample LoRA for the student.

    prompt ids [B, P] --PromptEncoder--> context [B, E]
    context + layer embedding + module-type embedding --shared MLP trunk--> h [B, N, D]
    h --one head per module type (shared across layers)--> A [B, r, in], B [B, out, r]

for all N (layer, target) pairs at once. Cf. Sakana's Text-to-LoRA.

Head design: shared bases with low-dimensional codes. A head that emits A and B directly
is a linear map D -> r * (in + out): for ``in_proj_qkvz`` (2048 -> 12288) at r = 16 and
D = 512 that is 117M parameters for one module type, 361M for the seven default targets.
Instead each head emits, per (sample, layer), codes ``a [r, m]`` and ``b [m, r]`` and maps
them through bases learned per module type and shared by its layers:

    A = a @ U_A   (U_A [m, in])        B = U_B @ b   (U_B [out, m])

That is the direct head factored through an m-dimensional bottleneck per LoRA rank
vector: D * 2rm + m * (in + out) parameters per type (2.0M for ``in_proj_qkvz`` at m = 64).
The cost is expressiveness: every layer's A rows lie in the row space of U_A and B's
columns in the column space of U_B, and ``code_dim`` (m) sets that trade-off; the layer
embedding still gives every layer its own codes. `python -m trainer.param_table` prints the
counts for the real student.

Initialisation: the B-code layer is zero (weight and bias), so B = 0 exactly and the
student's outputs are unchanged bit for bit at step 0. A has the scale of standard LoRA's
kaiming-uniform(a=sqrt(5)) init, std 1/sqrt(3 in): the trunk ends in a LayerNorm, the
A-code layer has std 1/sqrt(D) (unit-variance codes) and U_A ~ U(+-1/sqrt(m in)). As in
standard LoRA, at step 0 only the B-code layers receive gradient (dL/dA = 0 since B = 0, and
every other path to the encoder and trunk runs through the zero B-code weights); after the
first optimizer step moves them off zero, every parameter group does.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from trainer.lora import GeneratedLoRA, LoRAWeights, wrap_targets

log = logging.getLogger(__name__)

DEFAULT_TARGETS = (
    "linear_attn.in_proj_qkvz",
    "linear_attn.in_proj_ba",
    "linear_attn.out_proj",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
)
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    """One LoRA target: a linear module of one decoder layer."""

    name: str
    """Full module name in the student, e.g. ``model.layers.3.self_attn.q_proj``."""
    kind: str
    """The configured target name it matched (its module type), e.g. ``self_attn.q_proj``."""
    layer: int
    """Decoder layer index."""
    in_features: int
    """Input width of the linear module (A is [r, in_features])."""
    out_features: int
    """Output width of the linear module (B is [out_features, r])."""


def find_targets(model: nn.Module, kinds: Sequence[str]) -> list[Target]:
    """Every `nn.Linear` of `model` whose name ends in one of `kinds`, grouped by kind, by layer.

    Raises when a kind matches nothing, matches a module that is not an `nn.Linear`, or has
    different shapes in different layers (its head is shared across layers).
    """
    modules = dict(model.named_modules())
    targets = []
    for kind in kinds:
        names = [n for n in modules if n == kind or n.endswith("." + kind)]
        if not names:
            raise ValueError(f"LoRA target {kind!r} matches no module of {type(model).__name__}")
        for name in names:
            module = modules[name]
            if not isinstance(module, nn.Linear):
                raise TypeError(f"LoRA target {kind!r} matches {name}, a {type(module).__name__}, not an nn.Linear")
            match = _LAYER_INDEX.search(name)
            if match is None:
                raise ValueError(f"LoRA target {name} is not inside a numbered decoder layer ('layers.<i>.')")
            targets.append(Target(name, kind, int(match.group(1)), module.in_features, module.out_features))
        shapes = {(t.in_features, t.out_features) for t in targets if t.kind == kind}
        if len(shapes) > 1:
            raise ValueError(f"LoRA target {kind!r} has different shapes across layers: {sorted(shapes)}")
    return targets


def truncate_prompts(ids: torch.Tensor, mask: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the last `cap` valid tokens of each prompt, packed to the left, in order.

    The end is kept because the prompt is system + first user message and the system turn is
    boilerplate shared by all samples; the task is at the end. Works for left or right padding.
    ids: int [B, P]; mask: bool [B, P] -> ids int [B, P'], mask bool [B, P'], P' <= cap.
    """
    from_end = mask.flip(1).cumsum(1).flip(1)  # valid tokens at or after each position
    keep = mask & (from_end <= cap)
    width = int(keep.sum(1).max())
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    return ids.gather(1, order), keep.gather(1, order)


class PromptEncoder(nn.Module):
    """Prompt token ids -> context vector: frozen student embeddings, a small transformer
    encoder (no positional encoding: the prompt is conditioned on as a set of contextualised
    tokens), attention pooling with a learned query.
    """

    def __init__(self, config: HyperLoRA.Config, embed: nn.Embedding):
        super().__init__()
        # Held outside the module tree, so the student's [V, H] table never enters this
        # module's parameters, state dict, optimizer or sharding, and `.to()` leaves it alone.
        object.__setattr__(self, "_embed", embed)
        self.max_tokens = config.max_prompt_tokens
        dim = config.encoder_dim
        self.in_norm = nn.LayerNorm(embed.embedding_dim)
        self.proj = nn.Linear(embed.embedding_dim, dim)
        layer = nn.TransformerEncoderLayer(
            dim, config.encoder_heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(
            layer, config.encoder_layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False
        )
        self.query = nn.Parameter(torch.randn(1, 1, dim))
        self.pool = nn.MultiheadAttention(dim, config.encoder_heads, batch_first=True)
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """prompt_ids: int [B, P]; prompt_mask: bool [B, P] (True = token) -> float32 [B, E]."""
        ids, mask = truncate_prompts(prompt_ids, prompt_mask.bool(), self.max_tokens)
        if not bool(mask.any(1).all()):
            raise ValueError("PromptEncoder: every prompt needs at least one token (a row of prompt_mask is empty)")
        with torch.no_grad():
            emb = self._embed(ids.masked_fill(~mask, 0))  # [B, P', H], student dtype
        x = self.proj(self.in_norm(emb.to(self.proj.weight.dtype)))
        x = self.encoder(x, src_key_padding_mask=~mask)
        query = self.query.expand(x.shape[0], -1, -1)
        pooled, _ = self.pool(query, x, x, key_padding_mask=~mask, need_weights=False)
        return self.out_norm(pooled[:, 0])


class LoRAHead(nn.Module):
    """One module type's head, shared by its layers: h [B, n, D] -> A [B, n, r, in], B [B, n, out, r].

    Codes a [r, m], b [m, r] are linear in h; A = a @ U_A, B = U_B @ b (see the module docstring).
    """

    def __init__(self, dim: int, rank: int, code_dim: int, in_features: int, out_features: int):
        super().__init__()
        self.rank, self.code_dim = rank, code_dim
        self.code_a = nn.Linear(dim, rank * code_dim)
        self.code_b = nn.Linear(dim, code_dim * rank)
        self.basis_a = nn.Parameter(torch.empty(code_dim, in_features))
        self.basis_b = nn.Parameter(torch.empty(out_features, code_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """B-code layer zero (B = 0); unit-variance A codes; A std 1/sqrt(3 in) like LoRA's A."""
        nn.init.normal_(self.code_a.weight, std=self.code_a.in_features**-0.5)
        nn.init.zeros_(self.code_a.bias)
        nn.init.zeros_(self.code_b.weight)
        nn.init.zeros_(self.code_b.bias)
        bound_a = (self.code_dim * self.basis_a.shape[1]) ** -0.5
        nn.init.uniform_(self.basis_a, -bound_a, bound_a)
        bound_b = self.code_dim**-0.5
        nn.init.uniform_(self.basis_b, -bound_b, bound_b)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, n = h.shape[:2]
        code_a = self.code_a(h).view(batch, n, self.rank, self.code_dim)
        code_b = self.code_b(h).view(batch, n, self.code_dim, self.rank)
        return code_a @ self.basis_a, self.basis_b @ code_b


class _TrunkBlock(nn.Module):
    """Pre-norm residual MLP block: h + W2 gelu(W1 norm(h))."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.norm(h))


class LoRAGenerator(nn.Module):
    """Context [B, E] -> per-sample LoRA factors for every target (batch-first)."""

    def __init__(self, config: HyperLoRA.Config, targets: Sequence[Target]):
        super().__init__()
        self.targets = list(targets)
        self.kinds = list(dict.fromkeys(t.kind for t in self.targets))
        dim = config.trunk_dim
        self.context_proj = nn.Linear(config.encoder_dim, dim)
        self.layer_embed = nn.Embedding(max(t.layer for t in self.targets) + 1, dim)
        self.type_embed = nn.Embedding(len(self.kinds), dim)
        self.trunk = nn.Sequential(*(_TrunkBlock(dim) for _ in range(config.trunk_layers)), nn.LayerNorm(dim))
        self.heads = nn.ModuleDict()
        for kind in self.kinds:
            first = next(t for t in self.targets if t.kind == kind)
            self.heads[_key(kind)] = LoRAHead(dim, config.rank, config.code_dim, first.in_features, first.out_features)
        self.register_buffer("target_layers", torch.tensor([t.layer for t in self.targets]), persistent=False)
        kind_ids = [self.kinds.index(t.kind) for t in self.targets]
        self.register_buffer("target_kinds", torch.tensor(kind_ids), persistent=False)
        self.scale = config.scale

    def forward(self, context: torch.Tensor) -> GeneratedLoRA:
        """context: float [B, E] -> A float32 [B, r, in], B float32 [B, out, r] per target module."""
        embeds = self.layer_embed(self.target_layers) + self.type_embed(self.target_kinds)  # [N, D]
        h = self.trunk(self.context_proj(context)[:, None] + embeds)  # [B, N, D], targets grouped by kind
        weights, start = {}, 0
        for kind in self.kinds:
            group = [t for t in self.targets if t.kind == kind]
            a, b = self.head(kind)(h[:, start : start + len(group)])
            weights.update({t.name: LoRAWeights(a[:, j], b[:, j], kind) for j, t in enumerate(group)})
            start += len(group)
        return GeneratedLoRA(weights=weights, scale=self.scale)

    def head(self, kind: str) -> LoRAHead:
        """The head of one module type."""
        return self.heads[_key(kind)]


def _key(kind: str) -> str:
    """ModuleDict key for a module type (keys may not contain dots)."""
    return kind.replace(".", "_")


class HyperLoRA(nn.Module):
    """PromptEncoder + LoRAGenerator: prompt ids -> `GeneratedLoRA` for `hyper_lora`."""

    @dataclass(kw_only=True)
    class Config:
        targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
        """Target module names, matched as suffixes of the student's module names; one head each."""
        rank: int = 16
        """LoRA rank r."""
        alpha: float = 32.0
        """LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with ``rslora``)."""
        rslora: bool = False
        """Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r."""
        max_prompt_tokens: int = 4096
        """Prompt cap: the encoder sees the last this-many tokens of each prompt."""
        encoder_dim: int = 512
        """Width E of the prompt encoder and of the context vector."""
        encoder_layers: int = 2
        """Transformer layers in the prompt encoder."""
        encoder_heads: int = 8
        """Attention heads in the prompt encoder and its pooling."""
        trunk_dim: int = 512
        """Width D of the shared MLP trunk (and of the layer and module-type embeddings)."""
        trunk_layers: int = 2
        """Residual MLP blocks in the trunk."""
        code_dim: int = 64
        """m: size of the per-rank-vector codes the heads emit, mapped through learned bases."""

        def __post_init__(self) -> None:
            if not self.targets or len(set(self.targets)) != len(self.targets):
                raise ValueError(f"hypernetwork.targets must be non-empty and unique, got {self.targets}")
            for name in ("rank", "max_prompt_tokens", "encoder_dim", "encoder_layers", "encoder_heads",
                         "trunk_dim", "trunk_layers", "code_dim"):
                if getattr(self, name) < 1:
                    raise ValueError(f"hypernetwork.{name} must be >= 1, got {getattr(self, name)}")
            if self.alpha <= 0:
                raise ValueError(f"hypernetwork.alpha must be > 0, got {self.alpha}")
            if self.encoder_dim % self.encoder_heads:
                raise ValueError(f"hypernetwork.encoder_dim ({self.encoder_dim}) must divide by encoder_heads")

        @property
        def scale(self) -> float:
            """The LoRA scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
            return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def __init__(self, config: HyperLoRA.Config, targets: Sequence[Target], embed: nn.Embedding):
        super().__init__()
        self.config = config
        self.encoder = PromptEncoder(config, embed)
        self.generator = LoRAGenerator(config, targets)

    @property
    def targets(self) -> list[Target]:
        return self.generator.targets

    def forward(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> GeneratedLoRA:
        """prompt_ids: int [B, P]; prompt_mask: bool [B, P] -> LoRA for every target, batch B."""
        return self.generator(self.encoder(prompt_ids, prompt_mask))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by group: ``encoder``, ``trunk`` (embeddings and MLP), ``head:<kind>``."""
        gen = self.generator
        trunk = (gen.context_proj, gen.layer_embed, gen.type_embed, gen.trunk)
        groups = {"encoder": list(self.encoder.parameters()), "trunk": [p for m in trunk for p in m.parameters()]}
        groups.update({f"head:{kind}": list(gen.head(kind).parameters()) for kind in gen.kinds})
        return groups


def build_hyper_lora(config: HyperLoRA.Config, student: nn.Module) -> HyperLoRA:
    """Freeze `student`, wrap its targets for `hyper_lora` and build the hypernetwork for them."""
    student.requires_grad_(False)
    targets = find_targets(student, config.targets)
    wrap_targets(student, [t.name for t in targets])
    hyper = HyperLoRA(config, targets, student.get_input_embeddings())
    log.info(
        "HyperLoRA: %d targets over %d module types, %.2fM trainable parameters, %.2fM generated numbers per prompt",
        len(targets), len(hyper.generator.kinds), sum(p.numel() for p in hyper.parameters()) / 1e6,
        sum(config.rank * (t.in_features + t.out_features) for t in targets) / 1e6,
    )
    return hyper
