"""HyperLoRA: a hypernetwork that reads a prompt and generates per-sample LoRA for the student.

(``kind: hyper``; ``kind: routed`` routes each prompt to one of the bank's experts instead, see
"Routing" below; ``kind: static`` is the bank alone.)

    prompt ids [B, P] --PromptEncoder--> context [B, E]
    context + layer embedding + module-type embedding --shared MLP trunk--> h [B, N, D]
    h --one head per module type (shared across layers)--> gates g [B, n] per target
    A_b = diag(g_b) A,  B_b = B  (A [r, in], B [out, r]: a learned LoRA per target, the bank,
                                  in n experts of r / n rank directions; g sums to n)

for all N (layer, target) pairs at once. Cf. Sakana's Text-to-LoRA.

Design. Each target has one learned LoRA, the bank (`LoRABank`, initialised as PEFT
initialises a LoRA: A kaiming-uniform, B zero), split into n experts of r / n rank directions
(``hypernetwork.experts``), and the prompt weights the experts: ``delta W_b = scale * B
diag(g_b) A`` with g_b = n * softmax(logits_b), one expert's gate repeated over its directions.
The heads are zero-initialised, so g = 1 and the hypernetwork *is* a static LoRA at step 0;
`StaticLoRA` (``kind: static``) is the bank alone, the baseline every report compares with.

Why gates that sum to n (issue 12). Two earlier generators learned less than one static LoRA:
emitting A and B through shared bases (``code_dim``) moved the generated factors ~50x farther
per AdamW step than a static LoRA's parameters, so its usable learning rate was tiny; a free
r x r mixing matrix per target (A_b = M_b A, M = I + W h) instead learned one large *constant*
M (|M - I| ~3-7 within 20 steps: a faster way than the bank to grow the static update), and the
constant swamped the prompt: the share of the prompt encoder's output that varies between
prompts fell from 0.5% to 0.004%, and its gradient with it. Gates that always sum to n cannot
scale the update, only weight the experts; with them the encoder's output keeps 5-20% of its
variance per prompt over the first 60 steps of learn-bench. Not yet solved: over 150-300 steps
the trunk's pre-LayerNorm output still grows into one large constant (norm ~2,200 against a
per-prompt spread of ~1), so after the trunk's final LayerNorm every prompt and layer gets the
same gates, and the hypernetwork ends where a static LoRA does. Gates read from the context
without the trunk and its LayerNorms, square-root gates and a load-balancing term were tried and
collapse too, later or to uniform gates (issue 12's note has the numbers).

Routing: ``kind: routed`` (`RoutedHyperLoRA`, issue 12). One expert per prompt, the same for
every layer and target, chosen by a linear router on the prompt encoder's context: g_b = n *
onehot(argmax router(context_b)), A_b = diag(g_b) A, B shared. The router is not learned through
the loss; `trainer.routing` finds the experts first. For K = ``route_after_steps`` steps the
bank trains as a static LoRA while a zero per-sample probe (an extra B on the bank's A) records
each sample's gradient dL_b / dB_b, the direction its own LoRA would move; at step K those
gradients are clustered (balanced spherical k-means, n groups), the encoder and router are
pre-trained by cross-entropy to route each prompt to its cluster, then frozen; B is zeroed and
the experts train on with hard routing. Then the routing is corrected from the experts
themselves (`trainer.routing.relabel`, ``route_relabel_*``): after R more steps, for W steps every
sample is also scored under every expert, and a fresh encoder and router learn to send each
scored prompt to its lowest-KL expert; twice. On learn-bench (500 steps, batch 8, lr 1e-2) it
closes 90.2% / 90.5% of the KL gap (instructions / content-words) where a static LoRA closes
12.7% / 13.3%; its prompt swap is -25.7% / -27.1% (the LoRA is the prompt's), and 100% / 98.4%
of held-out paraphrases are routed to their family's expert. Without the re-routing the bootstrap's clusters
(87-90% pure) leave 3-12% of held-out prompts with another family's expert, and each such prompt
costs about what a prompt swap does: 60-74% over seeds at 300 steps. Its rows in the learn-bench
report are ``generated`` and ``prompt_swap``. What
failed before it (issue 12's experiments): soft (softmax) gates, hard routing learned through
the loss (Sinkhorn-balanced assignment; Switch-style top-1 with a load-balancing term: 6.5%,
every held-out prompt routed to the same expert) and router targets from the per-sample
gradient's argmin over the experts' gates all collapsed or stayed near the static LoRA;
clustering the prompt encoder's features instead of the gradients gives groups of purity ~0.33.
K matters: with K = 30 the clusters are less pure (held-out purity 0.78) and the arm closes
45.5%. The probe gradients separate the families because each family's teacher wants its own
LoRA_c. The distributed `Trainer` runs the same schedule on the FSDP2-sharded adapter
(`trainer.routing.RoutingSchedule`).

Cost: per target r * (in + out) bank parameters (a static LoRA's) and n generated gates per
prompt; the per-sample factors A_b [B, r, in] are what `hyper_lora` applies, as before.
``kind: routed`` adds, per re-routing round, W steps with n extra no-grad forwards of each
micro-batch (2 rounds x 40 steps x 4 experts: about what 107 training steps cost, at a forward
~1/3 of a training step), and the switch's 512 probe gradients on rank 0 (`trainer.routing`).
`python -m hyperdistill.trainer.param_table` prints the counts for the real student.

Initialisation: B = 0 exactly, so the student's outputs are unchanged bit for bit at step 0.
As in standard LoRA, at step 0 only B receives gradient (dL/dA = 0 since B = 0, and the
heads, trunk and encoder reach the loss only through B). The first optimizer step moves B off
zero, which opens the heads; the second moves the heads off zero, which opens the trunk and
the encoder.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hyperdistill.trainer.lora import GeneratedLoRA, LoRAWeights, wrap_targets
from hyperdistill.trainer.routing import attach_probe, new_router

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

    def __init__(self, config: HyperLoRAConfig, embed: nn.Embedding):
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


class LoRABank(nn.Module):
    """One learned LoRA per target, stacked by module type: A [L, r, in], B [L, out, r].

    Initialised as PEFT initialises a LoRA: A kaiming-uniform(a=sqrt(5)) per layer, B zero.
    It is the static adapter (`StaticLoRA`) and the bases that `HyperLoRA` mixes per prompt.
    """

    def __init__(self, targets: Sequence[Target], rank: int):
        super().__init__()
        self.targets = list(targets)
        self.kinds = list(dict.fromkeys(t.kind for t in self.targets))
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for kind in self.kinds:
            group = self.group(kind)
            a = torch.empty(len(group), rank, group[0].in_features)
            for layer in a:
                nn.init.kaiming_uniform_(layer, a=math.sqrt(5))
            self.A[_key(kind)] = nn.Parameter(a)
            self.B[_key(kind)] = nn.Parameter(torch.zeros(len(group), group[0].out_features, rank))

    def group(self, kind: str) -> list[Target]:
        """The targets of one module type, in layer order (the rows of its stacked factors)."""
        return [t for t in self.targets if t.kind == kind]

    def factors(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A [L, r, in] and B [L, out, r] of one module type."""
        return self.A[_key(kind)], self.B[_key(kind)]

    def lora(self, a_by_kind: dict[str, torch.Tensor], batch: int, scale: float) -> GeneratedLoRA:
        """`GeneratedLoRA` from per-sample A [B, L, r, in] per module type and the bank's B."""
        weights = {}
        for kind in self.kinds:
            b = self.B[_key(kind)].expand(batch, -1, -1, -1)
            weights.update(
                {t.name: LoRAWeights(a_by_kind[kind][:, j], b[:, j], kind) for j, t in enumerate(self.group(kind))}
            )
        return GeneratedLoRA(weights=weights, scale=scale)


class StaticLoRA(nn.Module):
    """``hypernetwork.kind: static``: one LoRA per target, the same for every prompt.

    The baseline a hypernetwork has to beat, trained through the same loop, loss, data,
    checkpoints and metrics; it ignores the prompt.
    """

    def __init__(self, config: HyperLoRAConfig, targets: Sequence[Target]):
        super().__init__()
        self.config = config
        self.bank = LoRABank(targets, config.rank)

    @property
    def targets(self) -> list[Target]:
        return self.bank.targets

    def forward(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> GeneratedLoRA:
        """The bank's LoRA for each of the B prompts (expanded, not copied)."""
        batch = prompt_ids.shape[0]
        a = {kind: self.bank.factors(kind)[0].expand(batch, -1, -1, -1) for kind in self.bank.kinds}
        return self.bank.lora(a, batch, self.config.scale)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """One group, ``bank``."""
        return {"bank": list(self.bank.parameters())}


class _TrunkBlock(nn.Module):
    """Pre-norm residual MLP block: h + W2 gelu(W1 norm(h))."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.norm(h))


class LoRAGenerator(nn.Module):
    """Context [B, E] -> per-prompt gates over the bank's experts, per target:
    g = n * softmax((W_kind h) / sqrt(D)) over the n experts (``hypernetwork.experts``).

    h [B, N, D] is the trunk's output for (context, layer, module type). Expert e of a target is
    the e-th block of r / n rank directions of its bank LoRA; its gate scales that block, so
    ``delta W_b = B diag(g_b) A``. The gates always sum to n: the prompt chooses how the bank's
    experts are weighted, never how large the update is (a generator that could also scale the
    update learned one large constant scale, the static solution, and its prompt encoder
    collapsed to a constant: issue 12). The heads are zero-initialised, so g = 1 and the
    hypernetwork is the bank, a static LoRA, at step 0. The factor 1/sqrt(D) keeps an optimizer
    step's change of a logit comparable to a bank parameter's.
    """

    def __init__(self, config: HyperLoRAConfig, targets: Sequence[Target]):
        super().__init__()
        self.targets = list(targets)
        self.kinds = list(dict.fromkeys(t.kind for t in self.targets))
        self.experts, dim = config.experts, config.trunk_dim
        self.block = config.rank // config.experts
        self.context_proj = nn.Linear(config.encoder_dim, dim)
        self.layer_embed = nn.Embedding(max(t.layer for t in self.targets) + 1, dim)
        self.type_embed = nn.Embedding(len(self.kinds), dim)
        self.trunk = nn.Sequential(*(_TrunkBlock(dim) for _ in range(config.trunk_layers)), nn.LayerNorm(dim))
        self.heads = nn.ModuleDict({_key(kind): nn.Linear(dim, self.experts) for kind in self.kinds})
        for head in self.heads.values():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.out_scale = dim**-0.5
        order = [t for kind in self.kinds for t in self.targets if t.kind == kind]  # grouped by kind
        self.register_buffer("target_layers", torch.tensor([t.layer for t in order]), persistent=False)
        self.register_buffer("target_kinds", torch.tensor([self.kinds.index(t.kind) for t in order]), persistent=False)

    def forward(self, context: torch.Tensor) -> dict[str, torch.Tensor]:
        """context: float [B, E] -> gates float32 [B, L, r] per module type (its layers in order;
        each expert's gate repeated over its r / n rank directions)."""
        embeds = self.layer_embed(self.target_layers) + self.type_embed(self.target_kinds)  # [N, D]
        h = self.trunk(self.context_proj(context)[:, None] + embeds)  # [B, N, D]
        gates, start = {}, 0
        for kind in self.kinds:
            n = sum(t.kind == kind for t in self.targets)
            logits = self.heads[_key(kind)](h[:, start : start + n]) * self.out_scale  # [B, L, n]
            gates[kind] = (self.experts * logits.softmax(-1)).repeat_interleave(self.block, dim=-1)
            start += n
        return gates


def _key(kind: str) -> str:
    """ModuleDict key for a module type (keys may not contain dots)."""
    return kind.replace(".", "_")


@dataclass(kw_only=True)
class HyperLoRAConfig:
    """The hypernetwork (``hypernetwork:`` in the trainer config): targets, rank, experts, encoder, trunk."""

    kind: str = "hyper"
    """``hyper``: a LoRA generated per prompt by gates from the trunk; ``routed``: one expert per
    prompt, chosen by a router on the prompt encoder (`RoutedHyperLoRA`; trained by the
    bootstrap / cluster / pre-train schedule of `trainer.routing`, in the `Trainer` and the
    learn-bench); ``static``: one LoRA per target shared by every prompt (the baseline; the encoder
    fields are then unused)."""
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Target module names, matched as suffixes of the student's module names; one head each."""
    rank: int = 16
    """LoRA rank r (of the bank, and of every generated adapter)."""
    experts: int = 4
    """Experts n per target: the bank's r rank directions in n blocks of r / n, weighted per
    prompt by the generated gates (1: every prompt gets the bank, as ``kind: static``)."""
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
    """Residual MLP blocks in the trunk (unused by ``kind: routed``, which has no trunk)."""
    route_after_steps: int = 60
    """``kind: routed``: bootstrap steps K. For steps 0..K-1 the adapter is the bank (a static
    LoRA) plus a zero probe whose per-sample gradients are recorded; at step K they are clustered
    into ``experts`` groups and routing is set."""
    route_rewarm_steps: int = 10
    """``kind: routed``: after routing is set (B zeroed, a fresh optimizer), the learning rate is
    ramped linearly back to the schedule's over this many steps (0: no ramp)."""
    route_relabel_after: int = 60
    """``kind: routed``: routed steps before the re-routing window opens (at step K + this)."""
    route_relabel_steps: int = 40
    """``kind: routed``: re-routing (0: off). For this many steps after ``route_relabel_after``,
    every sample is also scored under every expert (``experts`` no-grad forwards of each
    micro-batch, `trainer.routing.expert_losses`); then a fresh encoder and router learn, by
    cross-entropy, to send each scored prompt to the expert with its lowest KL. The bootstrap's
    clusters are ~87-90% pure on learn-bench and the router learns their errors; the experts tell
    the families apart better (96.6-100% of the window's samples)."""
    route_relabel_rounds: int = 2
    """``kind: routed``: re-routings, each after its own ``route_relabel_after`` routed steps and
    window: round i scores steps K + (i + 1) R + i W .. K + (i + 1)(R + W) - 1. A later round's
    experts trained on a cleaner routing, so its labels are cleaner."""
    router_pretrain_steps: int = 150
    """``kind: routed``: Adam steps that pre-train the encoder and router by cross-entropy to the
    cluster labels of the bootstrap prompts (then both are frozen)."""
    router_pretrain_lr: float = 3e-3
    """``kind: routed``: Adam learning rate of that pre-training."""
    router_pretrain_batch: int = 32
    """``kind: routed``: prompts per pre-training step (drawn with replacement)."""
    route_bootstrap_samples: int = 512
    """``kind: routed``: the bootstrap records the probe gradients of about this many samples over
    all ranks, the first ones (each rank records whole micro-batches until it holds its share).
    learn-bench clusters 480 (60 steps x 8) at purity 0.90; at Qwen3-Coder-Next's shapes a sample's
    gradient is 42 MB (`trainer.routing.probe_features`), so 512 are 21.5 GB, held by rank 0 alone
    at the switch."""
    route_feature_dim: int = 0
    """``kind: routed``: keep each bootstrap sample's probe gradient as a count sketch of this many
    floats when it has more (0: whole). A memory bound with a cost: on learn-bench (D = 8,192)
    sketching to 4,096 / 1,024 / 256 lowers the clusters' purity from 0.90 to 0.85 / 0.75 / 0.55."""
    cluster_dims: int = 8
    """``kind: routed``: PCA dimensions the probe gradients are reduced to before clustering."""
    cluster_restarts: int = 10
    """``kind: routed``: k-means restarts; the one with the best spherical objective is kept."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets must be non-empty and unique, got {self.targets}")
        for name in (
            "rank",
            "max_prompt_tokens",
            "encoder_dim",
            "encoder_layers",
            "encoder_heads",
            "trunk_dim",
            "trunk_layers",
            "route_after_steps",
            "route_bootstrap_samples",
            "router_pretrain_steps",
            "router_pretrain_batch",
            "cluster_dims",
            "cluster_restarts",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.route_feature_dim < 0:
            raise ValueError(f"route_feature_dim must be >= 0 (0: no sketch), got {self.route_feature_dim}")
        if self.experts < 1 or self.rank % self.experts:
            raise ValueError(f"experts must be >= 1 and divide rank ({self.rank}), got {self.experts}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if min(self.route_relabel_after, self.route_relabel_steps, self.route_relabel_rounds) < 0:
            raise ValueError(
                "route_relabel_after, route_relabel_steps and route_relabel_rounds must be >= 0 "
                f"(0 steps or rounds: no re-routing), got {self.route_relabel_after}, "
                f"{self.route_relabel_steps} and {self.route_relabel_rounds}"
            )
        if self.route_rewarm_steps < 0:
            raise ValueError(f"route_rewarm_steps must be >= 0, got {self.route_rewarm_steps}")
        if self.router_pretrain_lr <= 0:
            raise ValueError(f"router_pretrain_lr must be > 0, got {self.router_pretrain_lr}")
        if self.encoder_dim % self.encoder_heads:
            raise ValueError(f"encoder_dim ({self.encoder_dim}) must divide by encoder_heads")

    @property
    def scale(self) -> float:
        """The LoRA scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class HyperLoRA(nn.Module):
    """PromptEncoder + LoRAGenerator + LoRABank: prompt ids -> `GeneratedLoRA` for `hyper_lora`."""

    def __init__(self, config: HyperLoRAConfig, targets: Sequence[Target], embed: nn.Embedding):
        super().__init__()
        self.config = config
        self.encoder = PromptEncoder(config, embed)
        self.generator = LoRAGenerator(config, targets)
        self.bank = LoRABank(targets, config.rank)

    @property
    def targets(self) -> list[Target]:
        return self.bank.targets

    def forward(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> GeneratedLoRA:
        """prompt_ids: int [B, P]; prompt_mask: bool [B, P] -> LoRA for every target, batch B:
        A_b = diag(g_b) A (gates g_b [r] generated from prompt b), B_b = B."""
        gates = self.generator(self.encoder(prompt_ids, prompt_mask))
        a = {kind: g[..., None] * self.bank.factors(kind)[0] for kind, g in gates.items()}  # [B, L, r, in]
        return self.bank.lora(a, prompt_ids.shape[0], self.config.scale)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by group: ``encoder``, ``trunk`` (embeddings and MLP), ``head:<kind>``, ``bank``."""
        gen = self.generator
        trunk = (gen.context_proj, gen.layer_embed, gen.type_embed, gen.trunk)
        groups = {"encoder": list(self.encoder.parameters()), "trunk": [p for m in trunk for p in m.parameters()]}
        groups.update({f"head:{kind}": list(gen.heads[_key(kind)].parameters()) for kind in gen.kinds})
        groups["bank"] = list(self.bank.parameters())
        return groups


class RoutedHyperLoRA(nn.Module):
    """``hypernetwork.kind: routed``: PromptEncoder + router + LoRABank; one expert per prompt.

    The router is a linear map of the prompt encoder's context to the n experts (init N(0, 0.1),
    bias 0). Until routing is set (``routing_set``, a persistent buffer, so a checkpoint keeps it)
    every prompt gets gates g = 1, the bank, a static LoRA; with ``probe = True`` the forward also
    appends a zero rank-r probe per sample (`trainer.routing.attach_probe`) whose gradients
    `trainer.routing.Bootstrap` records. Once set (`trainer.routing.set_routing`), prompt b gets
    g_b = n * onehot(argmax router(context_b)) for every layer and target, one expert's gate
    repeated over its r / n directions: A_b = diag(g_b) A, B_b = B; the encoder and router are
    then frozen (run without autograd, and ``requires_grad`` off, also after a checkpoint load).
    """

    def __init__(self, config: HyperLoRAConfig, targets: Sequence[Target], embed: nn.Embedding):
        super().__init__()
        self.config = config
        self.encoder = PromptEncoder(config, embed)
        self.router = new_router(config)
        self.bank = LoRABank(targets, config.rank)
        self.register_buffer("routing_set", torch.zeros((), dtype=torch.bool))
        self.probe = False
        """Bootstrap only: append a zero per-sample probe to every target's factors."""
        self.last_probe: dict[str, torch.Tensor] = {}
        """The probe tensors P [B, L, out, r] per module type of the last forward with ``probe``."""
        self.register_load_state_dict_post_hook(_refreeze)

    @property
    def targets(self) -> list[Target]:
        return self.bank.targets

    @property
    def routed(self) -> bool:
        """Whether routing is set (hard one-expert gates; encoder and router frozen)."""
        return bool(self.routing_set)

    def logits(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Router logits float32 [B, n] (with autograd: what the pre-training trains)."""
        return self.router(self.encoder(prompt_ids, prompt_mask))

    def experts(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """The expert each prompt is routed to, int64 [B] (meaningful once routing is set)."""
        with torch.no_grad():
            return self.logits(prompt_ids, prompt_mask).argmax(-1)

    def gates(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, experts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """float32 [B, n]: 1 before routing is set; n * onehot(routed expert) after, or of
        ``experts`` (int64 [B]) when given."""
        n = self.config.experts
        if experts is not None:
            return n * nn.functional.one_hot(experts.to(self.router.weight.device), n).float()
        if not self.routed:
            return torch.ones(prompt_ids.shape[0], n, device=self.router.weight.device)
        return n * nn.functional.one_hot(self.experts(prompt_ids, prompt_mask), n).float()

    def forward(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, experts: torch.Tensor | None = None
    ) -> GeneratedLoRA:
        """prompt_ids: int [B, P]; prompt_mask: bool [B, P] -> LoRA for every target, batch B.
        ``experts`` (int64 [B]): give sample b expert ``experts[b]`` instead of the router's
        (`trainer.routing.expert_losses` scores every sample under every expert)."""
        gates = self.gates(prompt_ids, prompt_mask, experts)
        g = gates.repeat_interleave(self.config.rank // self.config.experts, -1)[:, None, :, None]  # [B, 1, r, 1]
        a = {kind: g * self.bank.factors(kind)[0] for kind in self.bank.kinds}  # [B, L, r, in]
        lora = self.bank.lora(a, prompt_ids.shape[0], self.config.scale)
        if self.probe and not self.routed and experts is None:
            lora, self.last_probe = attach_probe(self.bank, lora)
        return lora

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by group: ``encoder``, ``router``, ``bank``."""
        return {
            "encoder": list(self.encoder.parameters()),
            "router": list(self.router.parameters()),
            "bank": list(self.bank.parameters()),
        }


def _refreeze(module: nn.Module, incompatible_keys) -> None:
    """After a state-dict load: a routed adapter's encoder and router stay frozen."""
    if module.routed:
        module.encoder.requires_grad_(False)
        module.router.requires_grad_(False)


KINDS = ("hyper", "routed", "static")
PARAMETER_GROUPS = ("encoder", "trunk", "head", "router", "bank")
"""The names of `parameter_groups` (``head:<kind>`` counts as ``head``)."""
Adapter = HyperLoRA | RoutedHyperLoRA | StaticLoRA
"""What `build_hyper_lora` returns: prompt ids -> `GeneratedLoRA`, with ``targets``, ``config``
and ``parameter_groups()``."""


def build_adapter(config: HyperLoRAConfig, targets: Sequence[Target], embed: nn.Embedding) -> Adapter:
    """The adapter that ``config.kind`` names, for `targets` (no student changes)."""
    if config.kind == "static":
        return StaticLoRA(config, targets)
    if config.kind == "routed":
        return RoutedHyperLoRA(config, targets, embed)
    return HyperLoRA(config, targets, embed)


def build_hyper_lora(config: HyperLoRAConfig, student: nn.Module) -> Adapter:
    """Freeze `student`, wrap its targets for `hyper_lora` and build the adapter for them
    (a hypernetwork, a routed one with ``kind: routed``, or one static LoRA with ``kind: static``)."""
    student.requires_grad_(False)
    targets = find_targets(student, config.targets)
    wrap_targets(student, [t.name for t in targets])
    adapter = build_adapter(config, targets, student.get_input_embeddings())
    log.info(
        "%s: %d targets over %d module types, %.2fM trainable parameters, %.2fM LoRA numbers per prompt",
        type(adapter).__name__,
        len(targets),
        len(adapter.bank.kinds),
        sum(p.numel() for p in adapter.parameters()) / 1e6,
        sum(config.rank * (t.in_features + t.out_features) for t in targets) / 1e6,
    )
    return adapter
