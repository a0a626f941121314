"""`python -m hyperdistill.trainer.plan --config deploy/configs/trainer.h200.yaml [--phase NAME] [--measured FILE.json]`

Memory and time plan of a trainer config for the real Qwen3-Coder-Next (`QWEN3_CODER_NEXT`: 48 layers,
36 Gated DeltaNet + 12 gated attention, hidden 2048, 512 experts top-10, vocab 151,936, bf16) under
the fixed trainer (`trainer.model`: FSDP2 root over the decoder, layers resharded after forward,
per-layer gradient checkpointing, embedding and LM head replicated). Per phase it prints per-GPU
memory by component at the phase's tokens per micro-batch, host RAM per rank, FLOPs per token, hours
at a stated utilisation and teacher rate (with and without a teacher cache) and a plain verdict
against the 141 GB of an H200, the issue's goals and the seed's hours.

What is measured and what is modelled:

- One decoder layer's activation memory is *calibrated*: `measure_layer` runs one real-width layer
  (bf16, the trainer's LoRA active, input requiring grad) on CPU at a short T and records the bytes
  it saves for backward and the allocator peak of its forward + backward. `--calibrate` re-measures;
  `LAYER_CALIBRATION` holds the numbers, scaled linearly in T (attention runs through SDPA, which
  keeps no [T, T] matrix: per-token bytes agree at two T, see `calibrate`).
- `--measured FILE.json` (written by ``tests/gpu/check.py`` on an H200) replaces the layer's
  activation bytes, the allocator's fragmentation share and the trainer's tokens/s by measured ones.
- Everything else (shards, gathered layers, checkpointed inputs, loss buffers, hypernetwork,
  FLOPs, hours) is arithmetic on the shapes; each constant below names its source.
"""

from __future__ import annotations

import argparse
import json
import math
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

GB = 1e9
KINDS = ("linear_attention", "full_attention")
KIND_NAMES = {"linear_attention": "DeltaNet", "full_attention": "attention"}

# ---- hardware, data and goals ----------------------------------------------------------------
H200_BF16_FLOPS = 989e12
"""Dense bf16 tensor-core peak of one H200 SXM (NVIDIA's datasheet: 1,979 TFLOP/s with 2:4 sparsity)."""
GOLD_EXAMPLES = 32_161
"""Resolved trajectories of nebius/SWE-rebench-openhands-trajectories (DESIGN.md, Reference facts)."""
MEAN_TOKENS = {16384: 14_500}
"""Mean tokens per trajectory after a cut at max_length (issue 15: ~14.5k after the 16k cut; DESIGN.md's
~9.3B positions for 20 epochs of 32,161 agrees). Other cuts scale this fill: for a longer cut that is an
upper bound (a trajectory at most doubles when the cut doubles), for a shorter one a lower bound."""
SEED_HOURS = {"warmup": 4.0, "main": 32.0, "anneal": 8.0}
"""The seed's Training Timeline (seed/hyperlora-distillation-README.md)."""
GOAL_PEAK_BYTES, GOAL_TOKENS, GOAL_HOST_BYTES = 100 * GB, 32768, 60 * GB
"""Issue 13's goals: per-GPU peak <= 100 GB at 32k tokens, host RAM <= 60 GB per rank."""

# ---- fixed reserves (stated, not measured) -----------------------------------------------------
CUDA_RESERVE_BYTES = 3 * GB
"""Outside PyTorch's allocator: CUDA context (~0.6 GB), NCCL communicators and buffers (~1-2 GB),
cuBLAS/cuDNN workspaces."""
FRAGMENTATION = 0.10
"""Allocator reserve over the allocated peak (segments cached, not reusable for a larger block);
``--measured`` replaces it by the GPU check's peak_reserved / peak_allocated - 1."""
HOST_CONTEXT_BYTES = 5 * GB
"""One rank's Python, torch, CUDA/NCCL libraries and their host buffers, the gRPC client."""

# ---- per-layer activation calibration --------------------------------------------------------
LAYER_CALIBRATION = {
    "linear_attention": {"saved": 455_200, "peak": 590_400},
    "full_attention": {"saved": 163_500, "peak": 298_700},
}
"""Bytes per token of one real-width decoder layer with 512 experts, bf16, LoRA rank 16 active:
``saved`` = what it saves for backward, ``peak`` = its forward + backward allocator peak (the saved
tensors plus backward transients); neither counts the layer's input (checkpointed separately).
Measured by `python -m hyperdistill.trainer.plan --calibrate` (torch 2.13.0+cpu, transformers 5.19.0; SDPA
attention, grouped_mm experts, transformers' PyTorch DeltaNet fallback, whose chunked recurrence
keeps float32 intermediates and a [32, 128, 128] float32 state per 64-token chunk: flash-linear-attention
saves less, and `--measured` says how much) as the increment per token between T = 128 and 256, where
the per-token bytes agree within 1.7% (DeltaNet -0.7%, attention -1.7%)."""
EXPERT_BYTES_PER_TOKEN = 4.0
"""Per expert and token: the router's float32 softmax [T, E], the one activation that grows with the
number of experts; everything else follows the top-10 routing (T x 10 rows), not the expert count.
Measured: 4.03 B between 16 and 32 experts (`--calibrate`). The layers are measured with 16 experts
(a real-width layer's 512 experts are 1.6B parameters, 3.2 GB in bf16) and extrapolated to 512."""
CALIBRATION_EXPERTS = 16
CALIBRATION_TOKENS = (128, 256)


# ---- the student -------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudentShape:
    """The sizes of a Qwen3-Next student the plan needs (parameters counted on the meta device)."""

    layer_types: tuple[str, ...]
    hidden: int
    vocab: int
    experts: int
    experts_per_token: int
    attention_heads: int
    head_dim: int
    deltanet_heads: int
    deltanet_key_dim: int
    deltanet_value_dim: int
    decoder_params: int
    """Decoder layers + final norm (what FSDP shards)."""
    embed_params: int
    head_params: int
    largest_layer_params: int
    active_params: int
    """Decoder parameters one token multiplies with: routed experts count top-k of E."""

    @property
    def layers(self) -> int:
        return len(self.layer_types)


def student_shape(config_kwargs: dict) -> StudentShape:
    """Build the student from Qwen3NextConfig kwargs on the meta device and count its parameters."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    cfg = Qwen3NextConfig(**config_kwargs)
    with torch.device("meta"):
        student = Qwen3NextForCausalLM(cfg)
    experts = sum(_numel(m) for name, m in student.named_modules() if name.endswith("mlp.experts"))
    decoder = _numel(student.model) - _numel(student.model.embed_tokens)
    return StudentShape(
        layer_types=tuple(cfg.layer_types),
        hidden=cfg.hidden_size,
        vocab=cfg.vocab_size,
        experts=cfg.num_experts,
        experts_per_token=cfg.num_experts_per_tok,
        attention_heads=cfg.num_attention_heads,
        head_dim=cfg.head_dim,
        deltanet_heads=cfg.linear_num_value_heads,
        deltanet_key_dim=cfg.linear_key_head_dim,
        deltanet_value_dim=cfg.linear_value_head_dim,
        decoder_params=decoder,
        embed_params=_numel(student.model.embed_tokens),
        head_params=_numel(student.lm_head),
        largest_layer_params=max(_numel(layer) for layer in student.model.layers),
        active_params=decoder - round(experts * (1 - cfg.num_experts_per_tok / cfg.num_experts)),
    )


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class HyperShape:
    """The hypernetwork's trainable parameters and the LoRA numbers it generates per prompt."""

    params: int
    generated: int
    """sum over targets of r * (in + out): A [r, in] and B [out, r] of every target module."""
    encoder_dim: int
    encoder_layers: int
    max_prompt_tokens: int


def hyper_shape(config) -> HyperShape:
    """Count a `HyperLoRAConfig`'s hypernetwork for the real student (built on meta)."""
    from hyperdistill.trainer.param_table import build_meta

    _, hyper = build_meta(config)
    generated = sum(config.rank * (t.in_features + t.out_features) for t in hyper.targets)
    return HyperShape(_numel(hyper), generated, config.encoder_dim, config.encoder_layers, config.max_prompt_tokens)


# ---- memory ------------------------------------------------------------------------------------
@dataclass
class Item:
    """One memory component: bytes, when it is live and where its number comes from."""

    name: str
    bytes: float
    when: str = "always"
    """``always`` (the whole micro-batch), ``loss`` (only while the loss runs) or ``backward``."""
    source: str = "model"
    """``model`` (arithmetic on shapes), ``calibrated`` (CPU layer measurement) or ``measured`` (GPU)."""


def calibrated_per_token(kind: str, experts: int = 512, what: str = "peak") -> float:
    """`LAYER_CALIBRATION[kind][what]` (bytes per token) for a layer with `experts` experts."""
    return LAYER_CALIBRATION[kind][what] + EXPERT_BYTES_PER_TOKEN * (experts - 512)


def layer_activation_per_token(shape: StudentShape, kind: str) -> float:
    """Calibrated forward+backward peak bytes per token of one layer of `kind`, at the shape's experts."""
    return calibrated_per_token(kind, shape.experts)


def decoder_activation_bytes(
    layers: int, hidden: int, dtype_bytes: int, tokens: int, layer_peak_per_token: float
) -> tuple[float, float]:
    """(checkpointed layer inputs, one layer's recompute + backward) in bytes for a micro-batch of `tokens`.

    With per-layer checkpointing every layer keeps only its input [T, hidden]; in backward one layer
    at a time is recomputed and back-propagated, which peaks at its calibrated forward+backward bytes.
    """
    return layers * tokens * hidden * dtype_bytes, layer_peak_per_token * tokens


def loss_items(vocab: int, hidden: int, tokens: int, top_k: int, chunk: int, dtype_bytes: int) -> list[Item]:
    """The chunked top-K KL (`trainer.loss`): teacher tensors, hidden copies, one [chunk, V] buffer.

    Teacher ids int64 + log-probs float32 [T, K] live for the micro-batch, and their masked copies
    [M, K] while the loss runs (M <= T: counted as T). The loss gathers the counted hidden states
    [M, H] and writes dKL/dh [M, H] in forward; one chunk holds the logits [C, V] in the head's
    dtype and their float32 copy (exponentials and gradient in place).
    """
    logits = chunk * vocab * (dtype_bytes + (4 if dtype_bytes != 4 else 0))
    return [
        Item(f"teacher top-K [T, {top_k}] int64 + float32", tokens * top_k * 12),
        Item(
            f"loss: logits [{chunk}, V] + masked [T, H], dKL/dh, [T, K] copies",
            logits + 2 * tokens * hidden * dtype_bytes + tokens * top_k * 12,
            when="loss",
        ),
    ]


def hyper_items(hyper: HyperShape, world: int) -> list[Item]:
    """The hypernetwork under FSDP2 (one root): float32 parameters gathered for the whole step plus
    their shard, gradients unsharded while they accumulate (no sync until the last micro-batch),
    AdamW's two states sharded; its activations: generated A/B and their gradients (float32, x3 with
    the codes) and the prompt encoder's (~24 floats per token, width and layer: an estimate)."""
    states = hyper.params * 4 * (2 + 3 / world)
    activations = 3 * hyper.generated * 4 + 24 * hyper.encoder_dim * hyper.encoder_layers * hyper.max_prompt_tokens * 4
    return [
        Item(f"hypernetwork {hyper.params / 1e6:.1f}M: params, grads, AdamW (fp32)", states),
        Item(f"hypernetwork: {hyper.generated / 1e6:.1f}M generated A/B + grads, encoder", activations),
    ]


def gpu_memory(
    shape: StudentShape,
    hyper: HyperShape,
    *,
    tokens: int,
    world: int,
    top_k: int,
    chunk: int,
    dtype_bytes: int = 2,
    layer_peak_per_token: float | None = None,
    layer_source: str = "calibrated",
) -> list[Item]:
    """Per-GPU memory items at `tokens` per micro-batch (see `peak_bytes` for how they add up)."""
    kind = max(KINDS, key=lambda k: layer_activation_per_token(shape, k) if k in shape.layer_types else 0)
    per_token = layer_peak_per_token or layer_activation_per_token(shape, kind)
    inputs, layer = decoder_activation_bytes(shape.layers, shape.hidden, dtype_bytes, tokens, per_token)
    layer_gb = shape.largest_layer_params * dtype_bytes / GB
    return [
        Item(
            f"student shards ({shape.decoder_params / 1e9:.1f}B / {world})", shape.decoder_params * dtype_bytes / world
        ),
        Item(
            f"gathered layers (2 x {layer_gb:.2f} GB: current + prefetched)",
            2 * shape.largest_layer_params * dtype_bytes,
        ),
        Item("embedding + LM head, replicated", (shape.embed_params + shape.head_params) * dtype_bytes),
        *hyper_items(hyper, world),
        Item(f"checkpointed layer inputs ({shape.layers} x T x {shape.hidden})", inputs),
        Item(
            f"one layer's recompute + backward ({KIND_NAMES[kind] if layer_peak_per_token is None else 'largest'}, "
            f"{per_token / 1e3:.0f} kB/token)",
            layer,
            "backward",
            layer_source,
        ),
        *loss_items(shape.vocab, shape.hidden, tokens, top_k, chunk, dtype_bytes),
    ]


def peak_bytes(items: list[Item], fragmentation: float = FRAGMENTATION) -> tuple[float, float]:
    """(allocated peak, per-GPU peak): ``always`` + the larger of ``loss`` and ``backward`` (the loss
    finishes before the first layer's backward), then the allocator's share and the CUDA reserve."""
    always = sum(i.bytes for i in items if i.when == "always")
    allocated = always + max(sum(i.bytes for i in items if i.when == w) for w in ("loss", "backward"))
    return allocated, allocated * (1 + fragmentation) + CUDA_RESERVE_BYTES


def host_memory(
    shape: StudentShape, *, tokens: int, top_k: int, prefetch: int, accumulation: int, dtype_bytes: int = 2
) -> list[Item]:
    """Host RAM per rank. `trainer.model` allocates the shard on the device and copies the safetensors
    slices of its own rows in: the largest tensor read whole (embedding or LM head, replicated) is
    held twice (mapped file pages + the copy). Teacher top-K waits on the host for the prefetch
    window and the accumulation window (decoded as int64 + float32: 12 B; the wire's 6 B is less).
    The tokenised data set is memory-mapped Arrow: page cache, shared, not counted."""
    largest = max(shape.embed_params, shape.head_params) * dtype_bytes
    return [
        Item("student shard staged on host (read straight to GPU)", 0.0),
        Item("largest tensor read at once (x2: file pages + copy)", 2 * largest),
        Item(
            f"teacher top-K: ({prefetch} prefetch + {accumulation} accumulation) x T x K x 12 B",
            (prefetch + accumulation) * tokens * top_k * 12,
        ),
        Item("Python, torch, CUDA/NCCL libraries, gRPC", HOST_CONTEXT_BYTES),
    ]


# ---- FLOPs and time ----------------------------------------------------------------------------
DELTANET_CHUNK = 64
"""Chunk length of the chunked gated delta rule (transformers' fallback and fla)."""


def flops_per_token(shape: StudentShape, hyper: HyperShape, seq_len: int) -> dict[str, float]:
    """Executed FLOPs per trained token: forward, the checkpoint's recompute, backward to activations only.

    The student is frozen, so backward computes input gradients only (one matmul per forward matmul,
    not two): dense matmuls cost 2N forward + 2N recompute + 2N backward. LoRA adds its A/B gradients.
    Attention (causal, flash-style, no [T, T] kept) costs 2 heads d T per token forward and ~2.5x that in
    backward; the chunked delta rule C (5 dk + 3 dv) + 6 dk dv per head and token, ~2x in backward. The
    LM head and the loss's closed-form gradient run once (4 V H), counted at every position (an upper
    bound: only assistant positions are). The hypernetwork (a few GFLOP per prompt) is left out.
    """
    n_attn = shape.layer_types.count("full_attention")
    n_delta = shape.layer_types.count("linear_attention")
    dk, dv = shape.deltanet_key_dim, shape.deltanet_value_dim
    attention = n_attn * 2 * shape.attention_heads * shape.head_dim * seq_len * (1 + 1 + 2.5)
    deltanet = n_delta * shape.deltanet_heads * (DELTANET_CHUNK * (5 * dk + 3 * dv) + 6 * dk * dv) * (1 + 1 + 2)
    return {
        "dense matmuls (6 x active params)": 6 * shape.active_params,
        "LoRA (8 x generated numbers)": 8 * hyper.generated,
        f"attention (T = {seq_len:,})": attention,
        "DeltaNet chunked recurrence": deltanet,
        "LM head + loss (4 V H)": 4 * shape.vocab * shape.hidden,
    }


@dataclass
class PhaseTime:
    """A phase's tokens and hours; the trainer and the teacher run pipelined (phase = the slower)."""

    examples: int
    mean_tokens: float
    epochs: int
    tokens: float
    trainer_hours: float
    teacher_hours: float
    """Teacher scoring of every epoch (no cache)."""
    hours: float
    """max(trainer, teacher): every epoch scored live."""
    hours_cached: float
    """First epoch max(trainer, teacher), later epochs from the teacher cache (trainer only)."""


def mean_tokens(max_length: int, table: dict[int, float]) -> float:
    """Mean tokens per example at a cut of `max_length`: listed, else the nearest listed cut's fill."""
    if max_length in table:
        return table[max_length]
    ref = min(table, key=lambda length: abs(math.log(length / max_length)))
    return min(max_length, table[ref] * max_length / ref)


def phase_time(
    examples: int, mean: float, epochs: int, trainer_tokens_per_s: float, teacher_positions_per_s: float
) -> PhaseTime:
    """Hours of a phase of `examples` x `mean` tokens x `epochs` at the two rates."""
    per_epoch = examples * mean
    trainer = per_epoch / trainer_tokens_per_s / 3600
    teacher = per_epoch / teacher_positions_per_s / 3600
    return PhaseTime(
        examples,
        mean,
        epochs,
        per_epoch * epochs,
        trainer * epochs,
        teacher * epochs,
        max(trainer, teacher) * epochs,
        max(trainer, teacher) + trainer * (epochs - 1),
    )


# ---- the GPU check's measurements ----------------------------------------------------------------
@dataclass
class Measured:
    """What ``tests/gpu/check.py`` measured on one GPU (4 real-width layers), as the plan uses it."""

    kernels: str
    layer_peak_per_token: dict[int, float]
    """T -> one layer's recompute + backward bytes per token: the run's peak minus the parameters,
    the hypernetwork's gradients and AdamW states, the checkpointed inputs and the teacher tensors
    (an upper bound if the run peaked in the loss instead)."""
    tokens_per_s: dict[int, float]
    """T -> tokens/s of the 48-layer student on one GPU (the check's rate x its layers / 48)."""
    fragmentation: float
    device: str


def load_measured(path: str | Path, shape: StudentShape, hyper: HyperShape, top_k: int) -> Measured:
    """Read the GPU check's JSON; use the ``fla`` runs when any finished, else ``torch``."""
    report = json.loads(Path(path).read_text())
    if report.get("cpu_mode") or report.get("device") in (None, "cpu"):
        raise ValueError(
            f"{path}: a CPU-mode GPU check (device {report.get('device')!r}); its peaks are not GPU "
            "memory: plan from a report written on a GPU (e.g. tests/gpu/results/h200.json)"
        )
    cfg = report.get("config") or {}
    layers, hidden = cfg.get("num_hidden_layers", 4), cfg.get("hidden_size", shape.hidden)
    runs = [r for r in report.get("runs", []) if r.get("ok")]
    if not runs:
        raise ValueError(f"{path}: no finished run (ok: true) to plan from")
    kernels = "fla" if any(r["kernels"] == "fla" for r in runs) else runs[0]["kernels"]
    runs = [r for r in runs if r["kernels"] == kernels]
    fixed = hyper.params * 12  # hypernetwork gradients + AdamW states, next to param_bytes
    per_token = {}
    for r in runs:
        t = r["tokens"]
        rest = r["param_bytes"] + fixed + layers * t * hidden * 2 + t * top_k * 12
        per_token[t] = max(r["peak_allocated_bytes"] - rest, 0) / t
    frag = max(r["peak_reserved_bytes"] / r["peak_allocated_bytes"] - 1 for r in runs)
    return Measured(
        kernels,
        per_token,
        {r["tokens"]: r["tokens_per_s"] * layers / shape.layers for r in runs},
        frag,
        report.get("device") or "?",
    )


def nearest(table: dict[int, float], tokens: int) -> tuple[int, float]:
    """The entry measured at the T closest to `tokens` (in ratio)."""
    t = min(table, key=lambda k: abs(math.log(k / tokens)))
    return t, table[t]


# ---- calibration measurement (CPU) ----------------------------------------------------------------
_ALLOCATE_ONLY_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in ("mm", "bmm", "addmm", "_grouped_mm", "convolution_backward")
    if hasattr(torch.ops.aten, name)
)


def _to_meta(x):
    return x.to("meta") if isinstance(x, torch.Tensor) else x


def _allocate_like(x):
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype) if isinstance(x, torch.Tensor) else x


class _AllocateOnly(TorchDispatchMode):
    """bf16 matmuls and convolution gradients allocate their outputs (same shapes and strides) but
    skip the arithmetic (shapes come from the meta kernels). Used where no value is read, e.g. a
    backward whose peak is measured: the allocation sequence, all that the peak depends on, is
    unchanged, while on an AVX2 CPU one bf16 GEMM with a non-transposed right operand takes ~20 s
    at these widths."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ALLOCATE_ONLY_OPS and args[0].dtype == torch.bfloat16:
            return tree_map(_allocate_like, func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs)))
        return func(*args, **kwargs)


def cpu_peak_bytes(fn) -> int:
    """Peak bytes allocated on the CPU while `fn()` runs, above what was allocated when it started.

    The profiler with ``profile_memory`` records every CPU allocation and free with the allocator's
    running total (c10's ProfiledCPUMemoryReporter). That total is only maintained while profiling,
    so it carries an offset from earlier profiling windows (blocks freed outside them): the peak is
    taken relative to the total before this window's first event. Frees of blocks that predate
    profiling are not reported, which can only overstate the peak.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append(event)
    if not events:
        return 0
    events.sort(key=lambda e: e.start_time_ns)
    first = events[0].extra_fields
    return max(e.extra_fields.total_allocated for e in events) - (first.total_allocated - first.alloc_size)


@dataclass
class LayerMeasurement:
    kind: str
    tokens: int
    experts: int
    saved_bytes: int
    """Unique storages saved for backward, without parameters, the input and the LoRA factors."""
    peak_bytes: int
    """Allocator peak of forward + backward (the saved tensors plus backward transients)."""


def measure_layer(
    config_kwargs: dict, kind: str, tokens: int, dtype: torch.dtype = torch.bfloat16, rank: int = 16, seed: int = 0
) -> LayerMeasurement:
    """One decoder layer of `kind` built from Qwen3NextConfig kwargs with random weights, frozen, its
    LoRA targets wrapped and active (random A/B requiring grad) and the input [1, T, H] requiring grad,
    as in training: the bytes it saves for backward and the peak of its forward + backward on CPU.
    Attention is SDPA (causal, no mask), experts grouped_mm: what `from_pretrained` picks."""
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextDecoderLayer, Qwen3NextRotaryEmbedding

    from hyperdistill.trainer.hypernetwork import DEFAULT_TARGETS
    from hyperdistill.trainer.lora import GeneratedLoRA, LoRAWeights, hyper_lora, wrap_targets

    torch.manual_seed(seed)
    cfg = Qwen3NextConfig(**config_kwargs)
    cfg._attn_implementation, cfg._experts_implementation = "sdpa", "grouped_mm"
    with torch.device("meta"):
        layer = Qwen3NextDecoderLayer(cfg, cfg.layer_types.index(kind))
    layer = layer.to_empty(device="cpu").to(dtype).requires_grad_(False)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02)
    modules = dict(layer.named_modules())
    targets = [name for name in DEFAULT_TARGETS if name in modules]
    wrap_targets(layer, targets)
    lora = GeneratedLoRA(
        {
            name: LoRAWeights(
                (0.01 * torch.randn(1, rank, modules[name].in_features)).requires_grad_(),
                (0.01 * torch.randn(1, modules[name].out_features, rank)).requires_grad_(),
                name,
            )
            for name in targets
        },
        2.0,
    )
    x = torch.randn(1, tokens, cfg.hidden_size, dtype=dtype, requires_grad=True)
    cos, sin = Qwen3NextRotaryEmbedding(cfg)(x, torch.arange(tokens)[None])
    skip = {
        t.untyped_storage()._cdata
        for t in (x, cos, sin, *layer.parameters(), *(f for w in lora.weights.values() for f in (w.A, w.B)))
    }
    packed: list[weakref.ref] = []
    saved_bytes = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(weakref.ref(t))
        return t

    def forward_backward() -> None:
        nonlocal saved_bytes
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), hyper_lora(layer, lora, seq_len=tokens):
            y = layer(x, (cos, sin), attention_mask=None)
        # What the graph still holds: tensors saved on branches the output does not reach are gone.
        live = {
            t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in (r() for r in packed) if t is not None
        }
        saved_bytes = sum(n for key, n in live.items() if key not in skip)
        with _AllocateOnly():
            y.backward(torch.ones_like(y))

    peak = cpu_peak_bytes(forward_backward)
    return LayerMeasurement(kind, tokens, cfg.num_experts, saved_bytes, peak)


def calibrate(
    tokens: tuple[int, int] = CALIBRATION_TOKENS,
    experts: tuple[int, int] = (CALIBRATION_EXPERTS, 2 * CALIBRATION_EXPERTS),
) -> dict:
    """Measure both layer kinds at real widths with `experts[0]` experts at two T, and at `experts[1]`.

    Per kind: bytes per token at each T (they agree within ~2%: linear in T), the increment per token
    between the two T (the per-token constant: T-independent bytes such as the LoRA factors' bf16
    copies drop out), the bytes per expert and token, and the constants extrapolated to 512 experts.
    """
    from hyperdistill.trainer.param_table import QWEN3_CODER_NEXT

    out = {"tokens": list(tokens), "experts": list(experts), "torch": torch.__version__}
    for kind in KINDS:
        a, b = (measure_layer(dict(QWEN3_CODER_NEXT, num_experts=experts[0]), kind, t) for t in tokens)
        c = measure_layer(dict(QWEN3_CODER_NEXT, num_experts=experts[1]), kind, tokens[0])
        per_expert = (c.saved_bytes - a.saved_bytes) / tokens[0] / (experts[1] - experts[0])
        extra, dt = per_expert * (512 - experts[0]), tokens[1] - tokens[0]
        out[kind] = {
            "saved_per_token": [a.saved_bytes / tokens[0], b.saved_bytes / tokens[1]],
            "peak_per_token": [a.peak_bytes / tokens[0], b.peak_bytes / tokens[1]],
            "expert_bytes_per_token": per_expert,
            "saved": (b.saved_bytes - a.saved_bytes) / dt + extra,
            "peak": (b.peak_bytes - a.peak_bytes) / dt + extra,
        }
    return out


def format_calibration(result: dict) -> str:
    """The calibration as text, with the constants to paste into `LAYER_CALIBRATION`."""
    t0, t1 = result["tokens"]
    e0, e1 = result["experts"]
    lines = [f"real-width layers, bf16, LoRA r=16 active, {e0} experts, T = {t0} and {t1} (torch {result['torch']}):"]
    for kind in KINDS:
        r = result[kind]
        for what in ("saved", "peak"):
            a, b = r[f"{what}_per_token"]
            lines.append(
                f"  {KIND_NAMES[kind]:9} {what:5} {a:>9,.0f} B/token at T={t0}, {b:>9,.0f} at T={t1} "
                f"({100 * (b / a - 1):+.2f}%); per extra token, at 512 experts: {r[what]:,.0f}"
            )
        lines.append(f"  {KIND_NAMES[kind]:9} {r['expert_bytes_per_token']:.2f} B per expert and token ({e0} -> {e1})")
    lines.append(
        "LAYER_CALIBRATION = {"
        + ", ".join(
            f'"{k}": {{"saved": {round(result[k]["saved"], -2):_.0f}, "peak": {round(result[k]["peak"], -2):_.0f}}}'
            for k in KINDS
        )
        + "}"
    )
    return "\n".join(lines)


# ---- the plan ------------------------------------------------------------------------------------
@dataclass
class Hardware:
    """The trainer's GPUs and the rates the hours assume."""

    gpus: int = 4
    gpu_memory_bytes: float = 141 * GB
    mfu: float = 0.25
    """Achieved share of the bf16 peak (FLOPs as executed: recompute included)."""
    teacher_positions_per_s: float = 30_000
    """Teacher scoring rate of the whole teacher (issue 15: ~30k positions/s on 4xH200 in FP8)."""
    examples: int = GOLD_EXAMPLES
    mean_tokens: dict[int, float] = field(default_factory=lambda: dict(MEAN_TOKENS))


def plan_phase(
    cfg, phase, shape: StudentShape, hyper: HyperShape, hw: Hardware, measured: Measured | None = None
) -> dict:
    """Memory, host RAM, FLOPs and hours of one phase of a `TrainerConfig` (plain data, for text or JSON)."""
    tokens = phase.token_budget or cfg.data.token_budget
    max_length = phase.max_length or cfg.data.max_length
    items, frag = _gpu_items(cfg, shape, hyper, hw, measured, tokens)
    allocated, peak = peak_bytes(items, frag)
    host = host_memory(
        shape,
        tokens=tokens,
        top_k=cfg.teacher.top_k,
        prefetch=cfg.teacher.prefetch_batches,
        accumulation=cfg.optim.accumulation_steps,
    )
    examples = min(phase.max_samples or hw.examples, hw.examples - cfg.eval.held_out)
    mean = mean_tokens(max_length, hw.mean_tokens)
    flops = flops_per_token(shape, hyper, round(mean))
    rate = hw.gpus * hw.mfu * H200_BF16_FLOPS / sum(flops.values())
    rate_source = f"model: {hw.mfu:.0%} of {H200_BF16_FLOPS / 1e12:.0f} TFLOP/s x {hw.gpus} GPUs"
    if measured is not None:
        t, per_gpu = nearest(measured.tokens_per_s, tokens)
        mfu = per_gpu * sum(flops.values()) / H200_BF16_FLOPS
        rate = per_gpu * hw.gpus
        rate_source = f"measured ({measured.kernels}, T={t:,}, {measured.device}) x {hw.gpus} GPUs; = {mfu:.0%} MFU"
    time = phase_time(examples, mean, phase.epochs, rate, hw.teacher_positions_per_s)
    return {
        "phase": phase.name,
        "max_length": max_length,
        "tokens_per_micro_batch": tokens,
        "gpu": [asdict(i) for i in items],
        "fragmentation": frag,
        "cuda_reserve_bytes": CUDA_RESERVE_BYTES,
        "allocated_bytes": allocated,
        "peak_bytes": peak,
        "gpu_bytes": hw.gpu_memory_bytes,
        "fits": peak <= hw.gpu_memory_bytes,
        "host": [asdict(i) for i in host],
        "host_bytes": sum(i.bytes for i in host),
        "flops_per_token": flops,
        "trainer_tokens_per_s": rate,
        "trainer_rate_source": rate_source,
        "time": asdict(time),
        "budget_hours": SEED_HOURS.get(phase.name),
    }


def _gpu_items(
    cfg, shape: StudentShape, hyper: HyperShape, hw: Hardware, measured: Measured | None, tokens: int
) -> tuple[list[Item], float]:
    """`gpu_memory` for a config at `tokens`, with the GPU check's layer bytes if given; and the
    fragmentation share to use."""
    kw, frag = {}, FRAGMENTATION
    if measured is not None:
        t, per_token = nearest(measured.layer_peak_per_token, tokens)
        kw, frag = {"layer_peak_per_token": per_token, "layer_source": f"measured T={t:,}"}, measured.fragmentation
    items = gpu_memory(
        shape,
        hyper,
        tokens=tokens,
        world=hw.gpus,
        top_k=cfg.teacher.top_k,
        chunk=cfg.optim.logits_chunk_positions,
        **kw,
    )
    return items, frag


def goal_peak(cfg, shape: StudentShape, hyper: HyperShape, hw: Hardware, measured: Measured | None) -> float:
    """Per-GPU peak at the goal's 32k tokens per micro-batch."""
    return peak_bytes(*_gpu_items(cfg, shape, hyper, hw, measured, GOAL_TOKENS))[1]


def _rows(items: list[dict], width: int = 72) -> list[str]:
    return [f"  {i['name']:<{width}} {i['bytes'] / GB:7.2f}  {i['when']:<8} {i['source']}" for i in items]


def _versus(hours: float, budget: float | None) -> str:
    return "" if budget is None else (" (within)" if hours <= budget else " (OVER)")


def render_phase(p: dict) -> str:
    """One phase's plan as text: memory table, host RAM, FLOPs, hours, verdict."""
    t, budget = p["time"], p["budget_hours"]
    frag = p["allocated_bytes"] * p["fragmentation"]
    lines = [
        f"== phase {p['phase']}: max_length {p['max_length']:,}, "
        f"{p['tokens_per_micro_batch']:,} tokens per micro-batch",
        f"  {'GPU memory per rank':<72} {'GB':>7}  {'live':<8} source",
        *_rows(p["gpu"]),
        f"  {'allocated peak (always + max(loss, backward))':<72} {p['allocated_bytes'] / GB:7.2f}",
        f"  {'allocator fragmentation (%.0f%%) + CUDA context/NCCL/workspaces' % (100 * p['fragmentation']):<72} "
        f"{(frag + p['cuda_reserve_bytes']) / GB:7.2f}",
        f"  {'per-GPU peak':<72} {p['peak_bytes'] / GB:7.2f}  of {p['gpu_bytes'] / GB:.0f} GB",
        f"  {'host RAM per rank':<72} {'GB':>7}",
        *_rows(p["host"]),
        f"  {'host total':<72} {p['host_bytes'] / GB:7.2f}",
        f"  FLOPs per token {sum(p['flops_per_token'].values()) / 1e9:.2f} G = "
        + " + ".join(f"{k} {v / 1e9:.2f}" for k, v in p["flops_per_token"].items()),
        f"  trainer {p['trainer_tokens_per_s']:,.0f} tokens/s ({p['trainer_rate_source']})",
        f"  data: {t['examples']:,} examples x {t['mean_tokens']:,.0f} tokens x {t['epochs']} epochs = "
        f"{t['tokens'] / 1e9:.3f}B tokens; trainer {t['trainer_hours']:.1f} h, teacher {t['teacher_hours']:.1f} h",
        f"  verdict: {'fits' if p['fits'] else 'DOES NOT FIT'} in {p['gpu_bytes'] / GB:.0f} GB "
        f"(peak {p['peak_bytes'] / GB:.1f} GB); host {p['host_bytes'] / GB:.1f} GB "
        f"({'<=' if p['host_bytes'] <= GOAL_HOST_BYTES else 'OVER'} the {GOAL_HOST_BYTES / GB:.0f} GB goal)",
        f"  hours: {t['hours']:.1f} h live teacher{_versus(t['hours'], budget)}, {t['hours_cached']:.1f} h with a "
        f"teacher cache{_versus(t['hours_cached'], budget)}" + (f"; seed budget {budget:g} h" if budget else ""),
    ]
    return "\n".join(lines)


def plan(cfg, hw: Hardware, phase: str | None = None, measured_path: str | None = None) -> dict:
    """The whole plan for a `TrainerConfig` as plain data."""
    from hyperdistill.trainer.param_table import QWEN3_CODER_NEXT

    shape, hyper = student_shape(QWEN3_CODER_NEXT), hyper_shape(cfg.hypernetwork)
    measured = load_measured(measured_path, shape, hyper, cfg.teacher.top_k) if measured_path else None
    phases = [p for p in cfg.phases if phase in (None, p.name)]
    if not phases:
        raise SystemExit(f"no phase {phase!r}; the config has {', '.join(p.name for p in cfg.phases)}")
    return {
        "student": {
            **asdict(shape),
            "layers": shape.layers,
            "deltanet_layers": shape.layer_types.count("linear_attention"),
        },
        "hypernetwork": asdict(hyper),
        "hardware": asdict(hw),
        "measured": None if measured is None else asdict(measured),
        "goal_peak_bytes_at_32k": goal_peak(cfg, shape, hyper, hw, measured),
        "phases": [plan_phase(cfg, p, shape, hyper, hw, measured) for p in phases],
    }


def render(result: dict, config_path: str) -> str:
    """The plan as text: header, every phase, the goals."""
    s, h, hw = result["student"], result["hypernetwork"], result["hardware"]
    m = result["measured"]
    goal = result["goal_peak_bytes_at_32k"]
    total = s["decoder_params"] + s["embed_params"] + s["head_params"]
    rates = "measured tokens/s" if m else f"{hw['mfu']:.0%} MFU"
    lines = [
        f"Plan for {config_path} on {hw['gpus']} x H200 ({hw['gpu_memory_bytes'] / GB:.0f} GB each)",
        f"student Qwen3-Coder-Next: {s['layers']} layers ({s['deltanet_layers']} DeltaNet + "
        f"{s['layers'] - s['deltanet_layers']} attention), hidden {s['hidden']}, {s['experts']} experts top-"
        f"{s['experts_per_token']}, vocab {s['vocab']:,}; {total / 1e9:.2f}B params, "
        f"{s['active_params'] / 1e9:.2f}B active per token in the decoder, bf16",
        f"hypernetwork {h['params'] / 1e6:.1f}M params, {h['generated'] / 1e6:.1f}M generated numbers per prompt",
        "layer activations: "
        + (
            f"measured by the GPU check on {m['device']} ({m['kernels']} kernels)"
            if m
            else "calibrated on CPU (`--calibrate`; PyTorch DeltaNet fallback: an upper bound for fla)"
        ),
        f"rates: {rates}, teacher {hw['teacher_positions_per_s']:,.0f} positions/s; data {hw['examples']:,} examples, "
        "mean tokens per example " + ", ".join(f"{int(v):,} at a {int(k):,} cut" for k, v in hw["mean_tokens"].items()),
        "",
    ]
    for p in result["phases"]:
        lines += [render_phase(p), ""]
    lines.append(
        f"goal: per-GPU peak at {GOAL_TOKENS:,} tokens {goal / GB:.1f} GB "
        f"({'met' if goal <= GOAL_PEAK_BYTES else 'NOT met'}: <= {GOAL_PEAK_BYTES / GB:.0f} GB); host RAM "
        f"<= {GOAL_HOST_BYTES / GB:.0f} GB per rank: "
        f"{'met' if all(p['host_bytes'] <= GOAL_HOST_BYTES for p in result['phases']) else 'NOT met'}"
    )
    main = next((p for p in result["phases"] if p["phase"] == "main"), None)
    if main:
        lines.append(
            f"goal: main phase {main['time']['hours']:.1f} h without a teacher cache, "
            f"{main['time']['hours_cached']:.1f} h with one (seed: {SEED_HOURS['main']:g} h)"
        )
    return "\n".join(lines)


def _mean_tokens_arg(text: str) -> tuple[int, float]:
    length, _, mean = text.partition("=")
    return int(length), float(mean)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hyperdistill.trainer.plan",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="trainer YAML, e.g. deploy/configs/trainer.h200.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.accumulation_steps=16"
    )
    parser.add_argument("--phase", help="plan only this phase (default: all)")
    parser.add_argument(
        "--measured",
        metavar="FILE.json",
        help="the GPU check's gpu_check.json: measured layer activations, fragmentation, tokens/s",
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=4,
        help="trainer GPUs (world size, default 4); 8 once a teacher cache frees GPUs 0-3",
    )
    parser.add_argument("--gpu-memory-gb", type=float, default=141.0, help="memory of one GPU, GB (H200: 141)")
    parser.add_argument(
        "--mfu", type=float, default=0.25, help="share of the 989 TFLOP/s bf16 peak achieved (default 0.25)"
    )
    parser.add_argument(
        "--teacher-positions-per-s",
        type=float,
        default=30_000,
        help="teacher scoring rate (default 30,000: 4xH200 FP8, issue 15)",
    )
    parser.add_argument("--examples", type=int, default=GOLD_EXAMPLES, help="examples in the data set (gold: 32,161)")
    parser.add_argument(
        "--mean-tokens",
        type=_mean_tokens_arg,
        action="append",
        metavar="MAX_LENGTH=TOKENS",
        help="mean tokens per example at a cut (repeatable; 16384=14500 from issue 15 unless given)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--calibrate", action="store_true", help="re-measure the layer calibration on CPU (~1-2 min)")
    args = parser.parse_args(argv)
    if args.calibrate:
        result = calibrate()
        print(json.dumps(result, indent=1) if args.json else format_calibration(result))
        return
    if not args.config:
        parser.error("--config is required (or --calibrate)")
    from hyperdistill.common.config import load_config
    from hyperdistill.trainer.config import TrainerConfig

    cfg = load_config(TrainerConfig, args.config, overrides=args.overrides)
    hw = Hardware(
        args.gpus,
        args.gpu_memory_gb * GB,
        args.mfu,
        args.teacher_positions_per_s,
        args.examples,
        {**MEAN_TOKENS, **dict(args.mean_tokens or [])},
    )
    result = plan(cfg, hw, args.phase, args.measured)
    print(json.dumps(result, indent=1) if args.json else render(result, args.config))


if __name__ == "__main__":
    main()
