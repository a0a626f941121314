"""The family teachers of ``make learn-bench``: teacher c is the tiny student plus a fixed random
rank-`RANK` LoRA_c (seed c) merged into its weights, scaled so that KL(teacher_c || student) is
`TARGET_KL` nats per assistant token.

The KL is the trainer's own loss (`topk_kl_loss`, top-`TOP_K`, tail mode), measured in-process (student +
LoRA_c through `hyper_lora` against the plain student) on `CALIBRATION_SAMPLES` training samples of
the family from each variant (both variants share the teachers), at `build_lora_teacher` scales
found by a secant search from `SCALE_GUESS`; the KL of the scale kept is recorded.

Cache: ``<cache>/learn-bench/teachers/`` holds ``teacher-<c>/`` (a checkpoint the teacher service
loads, with ``lora.safetensors``: LoRA_c's factors, the oracle) and a stamp with the scales and
KLs, keyed by the tiny models' build, this module, the task and the parameters. A build goes into
a temporary directory renamed into place (as the tiny models do).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3NextForCausalLM

from hyperdistill.common.dirs import dir_lock, replace_dir
from hyperdistill.common.tokenizer import load_tokenizer
from hyperdistill.trainer.data.render import render_trajectory
from hyperdistill.trainer.data.sampler import Batch, collate
from hyperdistill.trainer.hypernetwork import find_targets
from hyperdistill.trainer.lora import GeneratedLoRA, LoRAWeights, hyper_lora, wrap_targets
from hyperdistill.trainer.loss import topk_kl_loss
from tests.devtools.tiny_models import build_lora_teacher, default_cache_dir, ensure_tiny_models
from tests.learn_bench import task

log = logging.getLogger(__name__)

FAMILIES = 4
RANK = 4
TOP_K = 20
TARGET_KL = 0.5
KL_TOLERANCE = 0.02
"""Calibration stops once the measured KL is this close to `TARGET_KL` (nats per token)."""
TARGETS = ("linear_attn.out_proj", "self_attn.o_proj")
"""LoRA_c's modules (and the arms'): the mixers' output projections, one per decoder layer. On
all seven default targets a rank-8 LoRA told the family closed only 35% of the gap in 250 steps
(in_proj_qkvz alone is 40% of the KL, through the DeltaNet's gates); on these two, 49% in 100."""
SCALE_GUESS = 0.14
"""First ``scale`` tried (~0.5 nats per token, measured)."""
MAX_TRIES = 6
CALIBRATION_SAMPLES = 8
"""Per family and variant (~32 assistant tokens each)."""
CALIBRATION_SEED = 1000
MAX_LENGTH = 4096
"""Render limit; the task's samples are < 200 tokens."""
STAMP_FILE = "stamp.json"

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Full module name -> (A float32 [r, in], B float32 [out, r]); B @ A is the update at LoRA scale 1."""


@dataclass(frozen=True)
class FamilyTeachers:
    dirs: list[Path]
    """Checkpoint of teacher c (loadable by the teacher service's ``hf`` engine)."""
    loras: list[Factors]
    """LoRA_c: what a per-prompt hypernetwork should generate for family c (the oracle arm)."""
    scales: list[float]
    """`build_lora_teacher`'s ``scale`` of each family."""
    kl: list[float]
    """Measured KL(teacher_c || student), nats per assistant token."""
    key: str


def cache_root() -> Path:
    """``learn-bench`` beside the tiny-model cache (``.cache/learn-bench`` or under ``$HYPERDISTILL_CACHE_DIR``)."""
    return default_cache_dir().parent / "learn-bench"


def student_fingerprint(student_dir: Path) -> str:
    """sha256 of the student's files (config, weights, tokenizer): what the teachers are built
    from, so that an edit of the tiny models' code that rebuilds the same student keeps them."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        digest.update((student_dir / name).read_bytes())
    return digest.hexdigest()


def teachers_key(student_dir: Path) -> str:
    """sha256 over the student's files, this module, the task and the LoRA targets."""
    digest = hashlib.sha256(student_fingerprint(student_dir).encode())
    for path in (Path(__file__), Path(task.__file__)):
        digest.update(path.read_bytes())
    digest.update(repr(TARGETS).encode())
    return digest.hexdigest()


def ensure_teachers(root: str | Path | None = None) -> FamilyTeachers:
    """The calibrated family teachers under ``<root>/teachers``, built first if missing or stale."""
    out = Path(root or cache_root()) / "teachers"
    student_dir = ensure_tiny_models().student
    key = teachers_key(student_dir)
    with dir_lock(out):
        if _stamp(out).get("key") != key:
            _build_into(out, student_dir, key)
    stamp = _stamp(out)
    dirs = [out / f"teacher-{c}" for c in range(FAMILIES)]
    return FamilyTeachers(dirs, [load_factors(d) for d in dirs], stamp["scales"], stamp["kl"], key)


def load_student(student_dir: str | Path) -> Qwen3NextForCausalLM:
    """The tiny student, float32, eval mode, its LoRA targets wrapped for `hyper_lora`."""
    student = Qwen3NextForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval().requires_grad_(False)
    wrap_targets(student, [t.name for t in find_targets(student, TARGETS)])
    return student


@torch.inference_mode()
def hidden_states(student: Qwen3NextForCausalLM, batch: Batch, lora: Factors | None = None) -> torch.Tensor:
    """Final hidden states float32 [B, T, H] of `student` (wrapped by `load_student`), with B @ A
    added on every target (`hyper_lora`, LoRA scale 1) when `lora` is given."""
    if lora is None:
        return student.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    rows, seq_len = batch.input_ids.shape
    weights = {
        name: LoRAWeights(a.expand(rows, *a.shape), b.expand(rows, *b.shape), _kind(name))
        for name, (a, b) in lora.items()
    }
    with hyper_lora(student, GeneratedLoRA(weights, 1.0), seq_len=seq_len):
        return hidden_states(student, batch)


@torch.inference_mode()
def topk_logprobs(
    hidden: torch.Tensor, lm_head: torch.nn.Module, top_k: int = TOP_K, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [M, H] -> the top-K ids int64 [M, K] and log-probs float32 [M, K] of the full-vocabulary
    log-softmax, `chunk` positions at a time."""
    parts = [
        torch.log_softmax(lm_head(hidden[i : i + chunk]).float(), -1).topk(top_k, -1)
        for i in range(0, hidden.shape[0], chunk)
    ]
    return torch.cat([p.indices for p in parts]), torch.cat([p.values for p in parts])


def measure_kl(student: Qwen3NextForCausalLM, batch: Batch, lora: Factors) -> float:
    """KL(student + LoRA || student) per assistant token of `batch`: `topk_kl_loss`, top-`TOP_K`, tail mode."""
    mask = batch.loss_mask[:, 1:]  # position t predicts token t + 1
    lm_head = student.get_output_embeddings()
    teacher = hidden_states(student, batch, lora)[:, :-1][mask]
    ids, logprobs = topk_logprobs(teacher, lm_head)
    plain = hidden_states(student, batch)[:, :-1][mask]
    with torch.no_grad():
        kl = topk_kl_loss(
            plain[None], lm_head, ids[None], logprobs[None], torch.ones(1, len(ids), dtype=torch.bool), len(ids)
        )
    return float(kl)


def calibration_batches(tokenizer) -> list[Batch]:
    """Per family: `CALIBRATION_SAMPLES` training samples of each variant, rendered and padded."""
    rendered: list[list[dict]] = [[] for _ in range(FAMILIES)]
    for variant in task.VARIANTS:
        for sample in task.make_samples(variant, FAMILIES * CALIBRATION_SAMPLES, held_out=False, seed=CALIBRATION_SEED):
            example = render_trajectory(sample.messages, [], tokenizer, MAX_LENGTH)
            rendered[sample.family].append({**example, "trajectory_id": f"{variant}-{len(rendered[sample.family])}"})
    return [collate(examples, tokenizer.pad_token_id) for examples in rendered]


def save_factors(lora: Factors, path: Path) -> None:
    save_file(
        {f"{name}.{part}": t.contiguous() for name, pair in lora.items() for part, t in zip("AB", pair, strict=True)},
        path,
    )


def load_factors(teacher_dir: Path) -> Factors:
    tensors = load_file(teacher_dir / "lora.safetensors")
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    return {name: (tensors[f"{name}.A"], tensors[f"{name}.B"]) for name in names}


def _build_into(out: Path, student_dir: Path, key: str) -> None:
    """Build and calibrate every family in a sibling temp dir, then swap it in for `out`."""
    start = time.monotonic()
    for leftover in out.parent.glob(f".{out.name}-build-*"):  # a killed build's (we hold the lock)
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-build-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        student = load_student(student_dir)
        batches = calibration_batches(load_tokenizer(student_dir, None))
        results = [_calibrate(student, batches[c], student_dir, tmp / f"teacher-{c}", c) for c in range(FAMILIES)]
        scales, kls = [r[0] for r in results], [r[1] for r in results]
        (tmp / STAMP_FILE).write_text(json.dumps({"key": key, "scales": scales, "kl": kls}) + "\n")
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "built %d learn-bench teachers in %.1f s: scales %s, KL %s nats/token",
        FAMILIES,
        time.monotonic() - start,
        [f"{s:.4f}" for s in scales],
        [f"{k:.3f}" for k in kls],
    )


def _calibrate(
    student: Qwen3NextForCausalLM, batch: Batch, student_dir: Path, out: Path, family: int
) -> tuple[float, float]:
    """Build teacher `family` into `out` at the scale whose KL is `TARGET_KL`; returns (scale, KL).

    A secant search on log KL against log scale (KL ~ scale^p; p = 1 until two tries measure it),
    rebuilding the teacher at each try, so it does not depend on how `build_lora_teacher` scales.
    """
    tries: list[tuple[float, float]] = []  # (log scale, log KL)
    scale = SCALE_GUESS
    for _ in range(MAX_TRIES):
        shutil.rmtree(out, ignore_errors=True)
        lora = build_lora_teacher(student_dir, out, seed=family, scale=scale, rank=RANK, targets=TARGETS)
        kl = measure_kl(student, batch, lora)
        log.info("learn-bench teacher %d: scale %.5f gives KL %.3f nats/token", family, scale, kl)
        if abs(kl - TARGET_KL) <= KL_TOLERANCE:
            save_factors(lora, out / "lora.safetensors")
            return scale, kl
        tries.append((math.log(scale), math.log(kl)))
        slope = 1.0
        if len(tries) > 1:
            (x0, y0), (x1, y1) = tries[-2:]
            slope = (y1 - y0) / (x1 - x0)
        x, y = tries[-1]
        scale = math.exp(x + (math.log(TARGET_KL) - y) / slope)
    raise RuntimeError(
        f"learn-bench teacher {family}: no scale within {KL_TOLERANCE} of KL {TARGET_KL} after "
        f"{MAX_TRIES} tries (scale, KL): {[(math.exp(x), math.exp(y)) for x, y in tries]}"
    )


def _kind(name: str) -> str:
    """The configured target (module type) that full module name `name` matched."""
    return next(kind for kind in TARGETS if name.endswith("." + kind))


def _stamp(out: Path) -> dict:
    try:
        return json.loads((out / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return {}
