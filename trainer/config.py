"""The trainer's config tree (YAML under deploy/configs/, ``a.b=c`` overrides), stored in every
checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from hyperdistill.trainer.checkpoint import CheckpointConfig
from hyperdistill.trainer.data import DataConfig
from hyperdistill.trainer.hypernetwork import PARAMETER_GROUPS, HyperLoRAConfig
from hyperdistill.trainer.teacher_client import TeacherClientConfig


@dataclass(kw_only=True)
class StudentConfig:
    path: str = ""
    """Student model directory or hub id (Qwen3-Coder-Next); its tokenizer and chat template too."""
    dtype: str = "auto"
    """``auto``: bfloat16 on GPU, float32 on CPU; or ``bfloat16`` / ``float32``."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in backward (long contexts)."""
    chat_template: str | None = None
    """Jinja file that replaces the tokenizer's chat template, for training and ``prepare_data``.
    The loss mask needs ``{% generation %}`` blocks around assistant turns, which published Qwen
    templates lack; ``common/chat_template.jinja`` is the Qwen3-Coder template with them."""
    require_fast_kernels: bool = True
    """On CUDA, refuse to start when flash-linear-attention is missing (the DeltaNet layers would
    run transformers' PyTorch fallback, an order of magnitude slower)."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path is required")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"dtype must be auto, bfloat16 or float32, got {self.dtype!r}")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ValueError(f"chat_template: no such file {self.chat_template!r}")


@dataclass(kw_only=True)
class PhaseConfig:
    name: str
    """Shown in logs and metrics (``warmup``, ``main``, ``anneal``)."""
    lr: float
    """Peak learning rate of this phase (each phase runs its own warmup + cosine)."""
    epochs: int = 1
    """Passes over this phase's examples."""
    max_samples: int | None = None
    """Use only the first N training examples (the seed's warmup: 1k samples)."""
    max_length: int | None = None
    """Context length of this phase; defaults to ``data.max_length`` (anneal: 32k)."""
    token_budget: int | None = None
    """Padded tokens per micro-batch; defaults to ``data.token_budget``."""
    warmup_steps: int = 0
    """Linear warmup, in optimizer steps, at the start of the phase."""
    min_lr_ratio: float = 0.1
    """The cosine decays to ``lr * min_lr_ratio`` at the end of the phase."""
    max_steps: int | None = None
    """Stop the phase after this many optimizer steps (smoke runs, the demo)."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"phase {self.name!r}: need lr > 0, epochs >= 1, 0 <= min_lr_ratio <= 1")


@dataclass(kw_only=True)
class OptimConfig:
    weight_decay: float = 0.01
    """AdamW weight decay (hypernetwork parameters only; the student is frozen)."""
    lr_scales: dict[str, float] = field(default_factory=dict)
    """Learning-rate multipliers by parameter group (``encoder``, ``trunk``, ``head``, ``bank``;
    `HyperLoRA.parameter_groups`), applied to every phase's schedule; 1 when absent."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the hypernetwork's global gradient norm to this."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step; the loss is normalised by the assistant-token count of
    the whole window across ranks."""
    loss: str = "tail"
    """``tail``: top-K + tail-mass KL (exact when K = V); ``renorm``: KL over renormalised top-K."""
    temperature: float = 1.0
    """Softmax temperature applied to both distributions."""
    logits_chunk_positions: int = 1024
    """Positions per LM-head chunk in the loss (``[T, V]`` float32 never exists whole)."""

    def __post_init__(self) -> None:
        if self.accumulation_steps < 1 or self.grad_clip <= 0 or self.loss not in ("tail", "renorm"):
            raise ValueError("need accumulation_steps >= 1, grad_clip > 0, loss in (tail, renorm)")
        unknown = sorted(set(self.lr_scales) - set(PARAMETER_GROUPS))
        if unknown or any(v <= 0 for v in self.lr_scales.values()):
            raise ValueError(
                f"lr_scales: groups must be among {PARAMETER_GROUPS} with scales > 0, got {self.lr_scales}"
            )


@dataclass(kw_only=True)
class MetricsConfig:
    host: str = "127.0.0.1"
    """Bind address of ``/metrics``."""
    port: int = 9401
    """Rank r serves ``/metrics`` on ``port + r``; 0 disables the endpoint."""
    log_every_steps: int = 1
    """Log line (and wandb point) every N optimizer steps."""


@dataclass(kw_only=True)
class WandbConfig:
    mode: str = "auto"
    """``auto``: online when WANDB_API_KEY is set, offline otherwise; ``online``; ``offline``; ``disabled``."""
    project: str = "hyperdistill"
    """wandb project."""
    run_name: str | None = None
    """wandb run name (default: wandb's)."""

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "online", "offline", "disabled"):
            raise ValueError(f"mode must be auto, online, offline or disabled, got {self.mode!r}")


@dataclass(kw_only=True)
class EvalConfig:
    held_out: int = 0
    """Examples held out of training (the last N prepared examples) for the evaluation arms
    (``trainer/eval.py``); 0 turns evaluation off, and the prompt-swap arm needs at least 2."""
    every_steps: int = 0
    """Evaluate every N optimizer steps (0: only before and after training)."""
    position_buckets: list[int] = field(default_factory=lambda: [0, 512, 2048, 8192, 32768])
    """Left edges of the KL-by-position buckets (position of the target token in its sequence);
    the last bucket is open-ended."""
    static_checkpoint: str | None = None
    """A checkpoint (``step_*`` directory, or a directory of them: the latest) of a static-LoRA
    run (``hypernetwork.kind: static``), evaluated as the ``static`` arm."""

    def __post_init__(self) -> None:
        if self.held_out < 0 or self.held_out == 1:
            raise ValueError(
                f"held_out must be 0 (off) or >= 2 (the prompt-swap arm gives each example "
                f"another one's prompt), got {self.held_out}"
            )
        if self.static_checkpoint and not self.held_out:
            raise ValueError("static_checkpoint needs held_out > 0 (the arms run on the held-out examples)")
        edges = self.position_buckets
        if not edges or edges[0] != 0 or any(b <= a for a, b in pairwise(edges)):
            raise ValueError(f"position_buckets must start at 0 and increase, got {edges}")


@dataclass(kw_only=True)
class TrainerConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    hypernetwork: HyperLoRAConfig = field(default_factory=HyperLoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherClientConfig = field(default_factory=TeacherClientConfig)
    phases: list[PhaseConfig] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str = "runs/demo"
    """Run outputs: ``log.jsonl`` (one line per step), wandb files."""
    seed: int = 0
    """Seed of the hypernetwork's init and every RNG."""
    stop_after_steps: int | None = None
    """Checkpoint and exit once this many optimizer steps ran in this invocation (preemption
    drills, resume tests); the next start with ``checkpoint.resume: auto`` continues."""
    log_level: str = "INFO"
    """Root log level."""

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("phases: at least one phase is required (e.g. warmup, main, anneal)")
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phases: names must be unique, got {names}")
        depth, accumulation = self.teacher.prefetch_batches, self.optim.accumulation_steps
        if 0 < depth < accumulation:
            # A step trains on a whole window of micro-batches; with fewer batches in flight than
            # a window, the teacher idles while the trainer computes.
            raise ValueError(
                f"teacher.prefetch_batches ({depth}) must be >= optim.accumulation_steps "
                f"({accumulation}), or 0 to turn prefetch off"
            )
