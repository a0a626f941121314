"""Shared fixtures: the tiny models, a transformers reference, and real teacher servers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.teacher_process import TeacherProcess
from common.tiny_models import ensure_tiny_models

ROOT = Path(__file__).resolve().parents[1]
TEACHER_CPU_CONFIG = ROOT / "deploy/configs/teacher.cpu.yaml"


@pytest.fixture(scope="session")
def tiny_models():
    return ensure_tiny_models()


class Reference:
    """Full-vocabulary log-softmax of the tiny teacher in transformers (float32)."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.inference_mode()
    def logprobs(self, token_ids: np.ndarray) -> np.ndarray:
        """token_ids: int [T] -> float32 [T - 1, V]: position i is the distribution of token i+1."""
        ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))[None]
        return torch.log_softmax(self.model(ids).logits[0, :-1].float(), dim=-1).numpy()


@pytest.fixture(scope="session")
def reference(tiny_models):
    return Reference(tiny_models.teacher)


def start_teacher(tmp_path_factory, name: str, tiny_models, *overrides: str, port: int | None = None) -> TeacherProcess:
    """A (not yet started) teacher on the tiny model with its log in a fresh temp dir."""
    log = tmp_path_factory.mktemp(name) / "teacher.log"
    return TeacherProcess(TEACHER_CPU_CONFIG, [f"engine.model={tiny_models.teacher}", *overrides], log_path=log,
                          port=port)


@pytest.fixture(scope="session")
def vllm_teacher(tmp_path_factory, tiny_models):
    """The vLLM-CPU teacher, float32 on the wire, 64 KiB chunks (so long sequences need several)."""
    teacher = start_teacher(tmp_path_factory, "vllm", tiny_models, "engine.kind=vllm",
                            "server.logprob_dtype=float32", "server.max_message_bytes=65536")
    with teacher:
        yield teacher


@pytest.fixture(scope="session")
def hf_teacher(tmp_path_factory, tiny_models):
    """The transformers teacher, float16 on the wire, a small admission limit for queue tests."""
    teacher = start_teacher(tmp_path_factory, "hf", tiny_models, "engine.kind=hf",
                            "server.logprob_dtype=float16", "server.max_queued_positions=10000")
    with teacher:
        yield teacher
