"""`trainer.plan`: the layer calibration still holds, the memory model predicts measured CPU peaks of
small models within 25%, and the planner runs on the production config (with and without a GPU
check's measurements)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

from hyperdistill.trainer import plan
from hyperdistill.trainer.hypernetwork import DEFAULT_TARGETS, find_targets
from hyperdistill.trainer.lora import (
    GeneratedLoRA,
    LoRAWeights,
    enable_gradient_checkpointing,
    hyper_lora,
    wrap_targets,
)
from hyperdistill.trainer.loss import topk_kl_loss
from hyperdistill.trainer.param_table import QWEN3_CODER_NEXT
from tests.devtools.tiny_models import STUDENT_CONFIG

H200_CONFIG = "deploy/configs/trainer.h200.yaml"


@pytest.mark.parametrize("kind", plan.KINDS)
def test_layer_calibration_is_current(kind):
    """A real-width layer (16 experts, bf16, LoRA active) re-measured at T = 128 is within 25% of the
    stored constants; the stored numbers came from the same function (`--calibrate`)."""
    experts, tokens = plan.CALIBRATION_EXPERTS, plan.CALIBRATION_TOKENS[0]
    m = plan.measure_layer(dict(QWEN3_CODER_NEXT, num_experts=experts), kind, tokens)
    for what, measured in (("saved", m.saved_bytes), ("peak", m.peak_bytes)):
        stored = plan.calibrated_per_token(kind, experts, what)
        assert measured / tokens == pytest.approx(stored, rel=0.25), (kind, what, measured / tokens, stored)
    assert m.peak_bytes > m.saved_bytes  # the backward's transients come on top of what is saved


@pytest.mark.parametrize("kind", plan.KINDS)
def test_layer_activations_are_linear_in_tokens(kind):
    """Per-token bytes at two T agree within 5% (SDPA keeps no [T, T] matrix): the linear model holds."""
    small, large = (plan.measure_layer(STUDENT_CONFIG, kind, t, dtype=torch.float32) for t in (256, 512))
    assert large.saved_bytes / 512 == pytest.approx(small.saved_bytes / 256, rel=0.05)
    assert large.peak_bytes / 512 == pytest.approx(small.peak_bytes / 256, rel=0.05)


def _tiny_student_with_lora(rank: int = 16) -> tuple[Qwen3NextForCausalLM, GeneratedLoRA]:
    """The tiny student (random, float32, frozen) with its LoRA targets wrapped, random factors
    requiring grad, per-layer checkpointing on and in training mode: the trainer's set-up."""
    torch.manual_seed(0)
    student = Qwen3NextForCausalLM(Qwen3NextConfig(**STUDENT_CONFIG)).float().requires_grad_(False)
    targets = find_targets(student, DEFAULT_TARGETS)
    wrap_targets(student, [t.name for t in targets])
    lora = GeneratedLoRA(
        {
            t.name: LoRAWeights(
                (0.01 * torch.randn(1, rank, t.in_features)).requires_grad_(),
                (0.01 * torch.randn(1, t.out_features, rank)).requires_grad_(),
                t.kind,
            )
            for t in targets
        },
        2.0,
    )
    enable_gradient_checkpointing(student)
    return student.train(), lora


def test_predicted_peak_matches_tiny_student():
    """One forward + backward of the tiny student's decoder with per-layer checkpointing: the plan's
    activation model (checkpointed inputs + one layer's calibrated forward+backward, the layer measured
    alone at T/4 and scaled) is within 25% of the CPU allocator's measured peak."""
    tokens = 512
    student, lora = _tiny_student_with_lora()
    cfg = student.config
    per_token = max(
        plan.measure_layer(STUDENT_CONFIG, kind, tokens // 4, dtype=torch.float32).peak_bytes for kind in plan.KINDS
    ) / (tokens // 4)
    inputs, layer = plan.decoder_activation_bytes(cfg.num_hidden_layers, cfg.hidden_size, 4, tokens, per_token)
    ids = torch.randint(0, 151_000, (1, tokens))
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in student.model.layers]

    def step() -> None:
        with hyper_lora(student, lora, seq_len=tokens):
            hidden = student.model(input_ids=ids, use_cache=False).last_hidden_state
        hidden.backward(torch.ones_like(hidden))

    measured = plan.cpu_peak_bytes(step)
    for h in hooks:
        h.remove()
    assert len(calls) == 2 * cfg.num_hidden_layers  # every layer ran twice: checkpointing recomputed it
    assert (inputs + layer) / measured == pytest.approx(1.0, abs=0.25), (inputs, layer, measured)


def test_loss_buffers_match_measured_peak():
    """The chunked top-K KL in bf16 (logits of one chunk in bf16 + float32): the plan's loss item is
    within 25% of the measured peak of its forward + backward (matmul arithmetic skipped, as in
    `measure_layer`: allocations only)."""
    tokens, hidden_size, vocab, top_k, chunk = 1024, 64, 151_936, 20, 128
    hidden = torch.randn(1, tokens, hidden_size, dtype=torch.bfloat16, requires_grad=True)
    head = torch.randn(vocab, hidden_size, dtype=torch.bfloat16)
    ids = (torch.randint(0, vocab, (1, tokens, 1)) + 7919 * torch.arange(top_k)) % vocab  # distinct per row
    logprobs = torch.log_softmax(torch.randn(1, tokens, top_k), -1) - 0.1
    mask = torch.ones(1, tokens, dtype=torch.bool)

    def step() -> None:
        with plan._AllocateOnly():
            topk_kl_loss(hidden, head, ids, logprobs, mask, tokens, chunk_size=chunk).backward()

    measured = plan.cpu_peak_bytes(step)
    items = plan.loss_items(vocab, hidden_size, tokens, top_k, chunk, dtype_bytes=2)
    predicted = sum(i.bytes for i in items if i.when == "loss")
    assert predicted / measured == pytest.approx(1.0, abs=0.25), (predicted, measured)


def test_plan_h200_config(capsys):
    """The production config: every phase planned, per-GPU components present, a verdict printed."""
    plan.main(["--config", H200_CONFIG])
    out = capsys.readouterr().out
    for phase in ("warmup", "main", "anneal"):
        assert f"== phase {phase}" in out
    assert "student shards" in out and "one layer's recompute" in out and "verdict:" in out
    assert "goal: per-GPU peak at 32,768 tokens" in out


def test_plan_json_and_arithmetic(capsys):
    """JSON output; shards are the decoder over the world size; hours follow tokens / rate."""
    plan.main(["--config", H200_CONFIG, "--phase", "main", "--gpus", "8", "--json"])
    result = json.loads(capsys.readouterr().out)
    (main,) = result["phases"]
    shards = next(i for i in main["gpu"] if i["name"].startswith("student shards"))
    assert shards["bytes"] == pytest.approx(result["student"]["decoder_params"] * 2 / 8)
    t = main["time"]
    assert t["examples"] == plan.GOLD_EXAMPLES - 64 and t["mean_tokens"] == 14_500 and t["epochs"] == 20
    assert t["trainer_hours"] == pytest.approx(t["tokens"] / main["trainer_tokens_per_s"] / 3600)
    assert t["teacher_hours"] == pytest.approx(t["tokens"] / 30_000 / 3600)
    assert t["hours"] == pytest.approx(max(t["trainer_hours"], t["teacher_hours"]))
    assert t["hours_cached"] == pytest.approx(
        max(t["trainer_hours"], t["teacher_hours"]) / 20 + t["trainer_hours"] * 19 / 20
    )


def test_plan_uses_measured_numbers(tmp_path, capsys):
    """A GPU check's JSON replaces the layer activations, fragmentation and tokens/s."""
    shape = plan.student_shape(QWEN3_CODER_NEXT)
    tokens, per_token, tps = 16384, 200_000, 12_000.0
    param_bytes = 4 * shape.largest_layer_params * 2
    hyper = plan.hyper_shape(plan_config().hypernetwork)
    peak = param_bytes + hyper.params * 12 + 4 * tokens * 2048 * 2 + tokens * 20 * 12 + per_token * tokens
    report = {
        "device": "NVIDIA H200",
        "world_size": 1,
        "config": {"num_hidden_layers": 4, "hidden_size": 2048},
        "runs": [
            {
                "tokens": tokens,
                "kernels": "fla",
                "ok": True,
                "peak_allocated_bytes": peak,
                "peak_reserved_bytes": int(peak * 1.05),
                "param_bytes": param_bytes,
                "step_seconds": 1.0,
                "tokens_per_s": tps,
                "error": None,
            },
            {
                "tokens": tokens,
                "kernels": "torch",
                "ok": False,
                "peak_allocated_bytes": 0,
                "peak_reserved_bytes": 0,
                "param_bytes": 0,
                "step_seconds": 0.0,
                "tokens_per_s": 0.0,
                "error": "skipped",
            },
        ],
    }
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(report))
    plan.main(["--config", H200_CONFIG, "--phase", "main", "--measured", str(path), "--json"])
    (main,) = json.loads(capsys.readouterr().out)["phases"]
    layer = next(i for i in main["gpu"] if i["name"].startswith("one layer's recompute"))
    assert layer["source"].startswith("measured") and layer["bytes"] == pytest.approx(per_token * tokens)
    assert main["fragmentation"] == pytest.approx(0.05, abs=1e-3)
    assert main["trainer_tokens_per_s"] == pytest.approx(tps * 4 / 48 * 4)


def plan_config():
    from hyperdistill.common.config import load_config
    from hyperdistill.trainer.config import TrainerConfig

    return load_config(TrainerConfig, H200_CONFIG)
