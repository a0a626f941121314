"""Tiny random Qwen3 teacher and student checkpoints for CPU tests and local runs.

`python -m common.tiny_models [--out DIR] [--force]` builds, offline and
deterministically, a 2-layer `Qwen3MoeForCausalLM` teacher (the Qwen3-Coder-480B family)
and a 4-layer `Qwen3NextForCausalLM` student (Qwen3-Coder-Next: three Gated DeltaNet
layers then one gated-attention layer). Both keep the real padded vocabulary (151,936),
the real Qwen3 tokenizer files and our `chat_template.jinja`, so the serving and training
code loads them exactly as it loads the real checkpoints.

The cache holds `teacher/`, `student/` and a stamp keyed by a hash of everything the build
depends on; a build goes into a temporary directory that is renamed into place, so a
killed build is never mistaken for a finished one.
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
from collections.abc import Iterator
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

from common.dirs import dir_lock, replace_dir
from common.log import setup_logging
from common.tokenizer import qwen_tokenizer_dir

log = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")
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


@dataclass(frozen=True)
class TinyModels:
    """Directories of the cached tiny checkpoints (each loadable with `from_pretrained`)."""

    teacher: Path
    student: Path


def default_cache_dir() -> Path:
    """`$HYPERDISTILL_CACHE_DIR/tiny-models`, else `<repo root>/.cache/tiny-models`."""
    base = os.environ.get(CACHE_ENV)
    root = Path(base) if base else Path(__file__).resolve().parent.parent / ".cache"
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
        _build_into(root, key)
    return models


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
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=[EOS_ID, BOS_ID], pad_token_id=BOS_ID
    )
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


def _build_into(root: Path, key: str) -> None:
    """Build both models in a sibling temp dir, then swap it in for `root`."""
    start = time.monotonic()
    log.info("building tiny models into %s", root)
    # Under the lock no other build runs: anything a killed build left behind is garbage.
    for kind in ("build", "stale"):
        for leftover in root.parent.glob(f".{root.name}-{kind}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-build-", dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache should read like any dir
    try:
        build_teacher(tmp / "teacher")
        build_student(tmp / "student")
        (tmp / STAMP_FILE).write_text(json.dumps({"key": key}) + "\n")
        replace_dir(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built tiny models in %.1f s", time.monotonic() - start)


def _stamp_key(root: Path) -> str | None:
    """The build key recorded in `root`, or None when there is no finished build."""
    try:
        return json.loads((root / STAMP_FILE).read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None



def build_lora_teacher(student_dir: str | Path, out: str | Path, *, seed: int, scale: float, rank: int = 4,
                       targets: tuple[str, ...] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Save, to `out`, the student plus a fixed random rank-`rank` LoRA merged into its weights.

    A teacher whose distance to the student is known and reachable: a per-prompt or static
    LoRA on the same targets can match it exactly. On every target linear module (the
    hypernetwork's default targets unless given), ``W += scale * B @ A`` with
    A ~ N(0, 1/in) [r, in] and B ~ N(0, 1/r) [out, r] drawn from `seed`. Returns the factors
    by full module name, `scale` folded into A, so that ``B @ A`` is the merged update (the
    oracle LoRA, at LoRA scale 1).
    """
    from trainer.hypernetwork import DEFAULT_TARGETS, find_targets  # the trainer's own target matching

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


if __name__ == "__main__":
    main()
