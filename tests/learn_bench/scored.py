"""The learn-bench samples, scored by their family's teacher through the teacher service.

`load_scored` renders each (variant, split) with the student's tokenizer exactly as the trainer
does (`render_trajectory`), and scores whatever the cache lacks in one session: one ``hf``
teacher process per family (float32, one torch thread each: the LM head's log-softmax over the
151,936-token vocabulary at every position is the whole cost), all sequences of a family on one
stream, every family at once. The service scores every position of a sequence, though only the
assistant ones (~39% here) enter the loss: the wire has no way to skip the prompt.

Each (variant, split) is stored as one ``.npz`` of concatenated arrays under
``<cache>/learn-bench/scored/``, keyed by the teachers, this module, top-K and the rendered tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hyperdistill.common.codec import TopK
from hyperdistill.common.dirs import dir_lock
from hyperdistill.common.tokenizer import load_tokenizer
from hyperdistill.teacher_service.probe_client import ProbeClient
from hyperdistill.trainer.data.render import render_trajectory
from tests.devtools.teacher_process import TeacherProcess
from tests.devtools.tiny_models import ensure_tiny_models
from tests.learn_bench import task
from tests.learn_bench.teachers import MAX_LENGTH, TOP_K, Factors, cache_root, ensure_teachers

log = logging.getLogger(__name__)

TEACHER_CONFIG = Path(__file__).resolve().parents[2] / "deploy/configs/teacher.cpu.yaml"
TEACHER_OVERRIDES = ("engine.kind=hf", "engine.dtype=float32", "server.logprob_dtype=float32")


@dataclass(frozen=True)
class ScoredSet:
    """One variant's samples with their teacher's top-K, and what the oracle arm needs."""

    train: list[dict]
    """Examples for `trainer.data.sampler.collate` (``input_ids`` int32 [T], ``loss_mask`` bool [T],
    ``prompt_ids`` int32 [P], ``trajectory_id``) plus ``family``, ``paraphrase`` (index in the
    family's list), ``teacher_ids`` int32 [T-1, K] and ``teacher_logprobs`` float32 [T-1, K]
    (position t: the teacher's distribution of token t+1)."""
    eval: list[dict]
    """The same for the evaluation samples (held-out paraphrases only)."""
    family_loras: list[Factors]
    """LoRA_c of each family: {module name: (A [r, in], B [out, r])}, the update B @ A at LoRA scale 1."""
    family_kl: list[float]
    """Measured KL(teacher_c || student), nats per assistant token."""


def load_scored(
    variants: Sequence[str] = task.VARIANTS,
    *,
    n_train: int = 2048,
    n_eval: int = 128,
    seed: int = 0,
    out: str | Path | None = None,
) -> dict[str, ScoredSet]:
    """Variant -> its `n_train` training and `n_eval` held-out samples, scored (from the cache when
    it has them). Training samples come from `make_samples` with `seed`, evaluation ones with
    ``seed + 1``. ``out``: the scored cache (default ``scored`` under `cache_root()`)."""
    teachers = ensure_teachers()
    tokenizer = load_tokenizer(ensure_tiny_models().student, None)
    parts = {(v, "train"): _render(v, "train", n_train, seed, tokenizer) for v in variants}
    parts |= {(v, "eval"): _render(v, "eval", n_eval, seed + 1, tokenizer) for v in variants}
    out = Path(out or cache_root() / "scored")
    with dir_lock(out):
        out.mkdir(exist_ok=True)
        keys = {part: _key(teachers.key, examples) for part, examples in parts.items()}
        missing = [part for part in parts if _stored_key(_path(out, part)) != keys[part]]
        if missing:
            examples = [e for part in missing for e in parts[part]]
            results = score(teachers.dirs, examples, out / "logs")
            for part in missing:
                _save(_path(out, part), keys[part], parts[part], results[: len(parts[part])])
                results = results[len(parts[part]) :]
        loaded = {part: _load(_path(out, part), part) for part in parts}
    return {v: ScoredSet(loaded[v, "train"], loaded[v, "eval"], teachers.loras, teachers.kl) for v in variants}


def score(teacher_dirs: Sequence[Path], examples: Sequence[dict], log_dir: Path) -> list[TopK]:
    """Top-`TOP_K` of each example's ``input_ids`` from the teacher of its ``family``: one teacher
    process per family, started together and stopped on the way out (also on error)."""
    start = time.monotonic()
    families = sorted({e["family"] for e in examples})
    log_dir.mkdir(parents=True, exist_ok=True)
    teachers = {
        c: TeacherProcess(
            TEACHER_CONFIG,
            [f"engine.model={teacher_dirs[c]}", *TEACHER_OVERRIDES],
            log_path=log_dir / f"teacher-{c}.log",
            env={"OMP_NUM_THREADS": "1"},
        )
        for c in families
    }
    try:
        for teacher in teachers.values():
            teacher.start()
        for teacher in teachers.values():
            teacher.wait_serving()
        serving = time.monotonic()
        results = asyncio.run(_score_families({c: t.address for c, t in teachers.items()}, examples))
        scored = time.monotonic()
    finally:
        _stop(teachers.values())
    positions = sum(len(e["input_ids"]) - 1 for e in examples)
    log.info(
        "scored %d sequences, %d positions in %.1f s: %.0f positions/s (%d teachers, top-%d; "
        "%.1f s to start them, %.1f s to stop them)",
        len(examples),
        positions,
        scored - serving,
        positions / (scored - serving),
        len(teachers),
        TOP_K,
        serving - start,
        time.monotonic() - scored,
    )
    return results


def _stop(teachers: Iterable[TeacherProcess]) -> None:
    """SIGTERM every teacher, then wait for each: they drain and exit in parallel."""
    for teacher in teachers:
        if teacher.proc is not None and teacher.proc.poll() is None:
            teacher.proc.send_signal(signal.SIGTERM)
    for teacher in teachers:
        teacher.stop()


async def _score_families(addresses: dict[int, str], examples: Sequence[dict]) -> list[TopK]:
    """Each family's sequences on one stream to its teacher, every family at once; results in order."""
    rows = {c: [i for i, e in enumerate(examples) if e["family"] == c] for c in addresses}

    async def one(c: int) -> list[TopK]:
        async with ProbeClient(addresses[c]) as client:
            return await client.score([examples[i]["input_ids"] for i in rows[c]], TOP_K)

    results: list[TopK | None] = [None] * len(examples)
    for c, topk in zip(addresses, await asyncio.gather(*(one(c) for c in addresses)), strict=True):
        for i, result in zip(rows[c], topk, strict=True):
            results[i] = result
    return results


def _render(variant: str, split: str, count: int, seed: int, tokenizer) -> list[dict]:
    samples = task.make_samples(variant, count, held_out=split == "eval", seed=seed)
    examples = []
    for i, sample in enumerate(samples):
        rendered = render_trajectory(sample.messages, [], tokenizer, MAX_LENGTH)
        examples.append(
            {
                "input_ids": np.asarray(rendered["input_ids"], dtype=np.int32),
                "loss_mask": np.asarray(rendered["loss_mask"], dtype=bool),
                "prompt_ids": np.asarray(rendered["prompt_ids"], dtype=np.int32),
                "trajectory_id": f"{variant}/{split}/{i}",
                "family": sample.family,
                "paraphrase": sample.paraphrase,
            }
        )
    return examples


def _key(teachers_key: str, examples: Sequence[dict]) -> str:
    """sha256 over the teachers, this module, top-K and every example's tokens, family and paraphrase."""
    digest = hashlib.sha256(f"{teachers_key} top_k={TOP_K}".encode())
    digest.update(Path(__file__).read_bytes())
    for e in examples:
        for name in ("input_ids", "loss_mask", "prompt_ids"):
            digest.update(e[name].tobytes())
        digest.update(f"{e['family']},{e['paraphrase']};".encode())
    return digest.hexdigest()


def _path(out: Path, part: tuple[str, str]) -> Path:
    return out / f"{part[0]}-{part[1]}.npz"


def _save(path: Path, key: str, examples: Sequence[dict], results: Sequence[TopK]) -> None:
    """Concatenated arrays plus lengths, written to a temp file and renamed into place."""
    arrays = {
        "key": np.asarray(key),
        "lengths": np.asarray([len(e["input_ids"]) for e in examples], dtype=np.int64),
        "prompt_lengths": np.asarray([len(e["prompt_ids"]) for e in examples], dtype=np.int64),
        "family": np.asarray([e["family"] for e in examples], dtype=np.int64),
        "paraphrase": np.asarray([e["paraphrase"] for e in examples], dtype=np.int64),
        "teacher_ids": np.concatenate([r.ids for r in results]).astype(np.int32),
        "teacher_logprobs": np.concatenate([r.logprobs for r in results]).astype(np.float32),
    }
    for name in ("input_ids", "loss_mask", "prompt_ids"):
        arrays[name] = np.concatenate([e[name] for e in examples])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def _load(path: Path, part: tuple[str, str]) -> list[dict]:
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    lengths, prompt_lengths = arrays["lengths"], arrays["prompt_lengths"]
    tokens = _split(arrays, ("input_ids", "loss_mask"), lengths)
    prompts = _split(arrays, ("prompt_ids",), prompt_lengths)
    teacher = _split(arrays, ("teacher_ids", "teacher_logprobs"), lengths - 1)
    return [
        {
            **tokens[i],
            **prompts[i],
            **teacher[i],
            "trajectory_id": f"{part[0]}/{part[1]}/{i}",
            "family": int(arrays["family"][i]),
            "paraphrase": int(arrays["paraphrase"][i]),
        }
        for i in range(len(lengths))
    ]


def _split(arrays: dict[str, np.ndarray], names: Sequence[str], lengths: np.ndarray) -> list[dict]:
    """Per example, views of the concatenated arrays `names` cut at `lengths`."""
    cuts = np.cumsum(lengths)[:-1]
    columns = {name: np.split(arrays[name], cuts) for name in names}
    return [{name: columns[name][i] for name in names} for i in range(len(lengths))]


def _stored_key(path: Path) -> str | None:
    try:
        with np.load(path) as data:
            return str(data["key"])
    except (OSError, KeyError, ValueError):
        return None
