"""The evaluation arms (`trainer/eval.py`): metrics on the tiny student in process (no FSDP, a
teacher that is the student itself) against naive references, the prompt-swap derangement, the
outputs, the CLI's argument checks, and the CLI end to end against the real gRPC teacher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from torch import nn

from hyperdistill.common.codec import TopK
from hyperdistill.common.config import config_to_dict, load_config
from hyperdistill.trainer.checkpoint import CheckpointConfig, Checkpointer
from hyperdistill.trainer.config import OptimConfig, TrainerConfig
from hyperdistill.trainer.data.sampler import collate
from hyperdistill.trainer.eval import (
    EvalReport,
    HeldOut,
    bucket_labels,
    evaluate_arms,
    prepare,
    publish,
    swap_partners,
)
from hyperdistill.trainer.hypernetwork import HyperLoRAConfig, build_hyper_lora
from hyperdistill.trainer.loss import topk_kl_loss, topk_kl_per_position
from tests.devtools.teacher_process import free_port

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "deploy/configs/trainer.cpu.yaml"
K = 8
EDGES = [0, 8, 16]  # short sequences still fill every bucket
OPTIM = OptimConfig(logits_chunk_positions=7)  # chunks that do not divide the positions
HYPER = HyperLoRAConfig(
    rank=4,
    alpha=8.0,
    encoder_dim=32,
    encoder_layers=1,
    encoder_heads=2,
    trunk_dim=32,
    trunk_layers=1,
    max_prompt_tokens=64,
)


def _trained(adapter: nn.Module) -> nn.Module:
    """``adapter`` moved off its init (where the LoRA is zero and ignores the prompt): noise on every parameter."""
    torch.manual_seed(2)
    with torch.no_grad():
        for param in adapter.parameters():
            param.add_(torch.randn_like(param), alpha=0.05)
    return adapter


@pytest.fixture(scope="module")
def models(tiny_models):
    """The tiny student and a hypernetwork whose generated LoRA is not zero and depends on the prompt."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(tiny_models.student, dtype=torch.float32).eval()
    return student, _trained(build_hyper_lora(HYPER, student))


class FixedPrompt(nn.Module):
    """A static adapter: the hypernetwork's LoRA of one fixed prompt, for every row."""

    def __init__(self, hyper: nn.Module, prompt: torch.Tensor):
        super().__init__()
        self.hyper, self.prompt = hyper, prompt

    def forward(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        rows = prompt_ids.shape[0]
        return self.hyper(self.prompt.expand(rows, -1), torch.ones(rows, self.prompt.shape[1], dtype=torch.bool))


def _example(seed: int, length: int, prompt: list[int] | None = None) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 5000, length).tolist()
    mask = [i >= 4 and i % 5 != 0 for i in range(length)]  # "assistant" tokens, with gaps
    return {"input_ids": ids, "loss_mask": mask, "prompt_ids": prompt or ids[:6], "trajectory_id": f"t{seed}"}


def _own_topk(student, batch) -> list[TopK]:
    """A teacher whose top-K is the student's own (no LoRA), one TopK per row."""
    with torch.no_grad():
        logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    logprobs = torch.log_softmax(logits, -1)
    values, ids = logprobs.topk(K, dim=-1)
    lengths = batch.attention_mask.sum(1).tolist()
    return [
        TopK(ids[r, : n - 1].numpy().astype(np.int32), values[r, : n - 1].numpy(), np.zeros(n - 1, np.float32))
        for r, n in enumerate(lengths)
    ]


def _items(student, examples: list[dict], weights: list[float] | None = None) -> list[tuple[HeldOut, list[TopK]]]:
    """One-row held-out items; example i reads example i+1's prompt in the prompt-swap arm."""
    items = []
    for i, example in enumerate(examples):
        batch = collate([example], pad_id=0)
        swap = collate([examples[(i + 1) % len(examples)]], pad_id=0)
        items.append((HeldOut(batch, 1.0 if weights is None else weights[i], swap), _own_topk(student, batch)))
    return items


def _evaluate(student, adapters, items) -> EvalReport:
    return evaluate_arms(student, adapters, items, optim=OPTIM, edges=EDGES, device=torch.device("cpu"))


def test_swap_partners_is_a_fixed_derangement():
    for count in (2, 3, 7, 50):
        for seed in range(5):
            partners = swap_partners(count, seed)
            assert sorted(partners) == list(range(count))
            assert all(p != i for i, p in enumerate(partners)), (count, seed, partners)
            assert partners == swap_partners(count, seed)
    assert swap_partners(50, 0) != swap_partners(50, 1)
    with pytest.raises(ValueError, match="at least 2"):
        swap_partners(1, 0)


def test_bucket_labels():
    assert bucket_labels([0, 512, 2048, 8192, 32768]) == ["0-512", "512-2048", "2048-8192", "8192-32768", "32768+"]


def test_per_position_kl_sums_to_the_loss(models):
    student, _ = models
    torch.manual_seed(1)
    h = torch.randn(23, student.config.hidden_size)
    ids = torch.stack([torch.randperm(5000)[:K] for _ in range(23)])
    logprobs = torch.log_softmax(torch.randn(23, K), -1) - 0.3
    for mode in ("tail", "renorm"):
        per = topk_kl_per_position(h, student.lm_head, ids, logprobs, mode=mode, temperature=2.0, chunk_size=5)
        total = topk_kl_loss(
            h[None],
            student.lm_head,
            ids[None],
            logprobs[None],
            torch.ones(1, 23, dtype=torch.bool),
            1,
            mode=mode,
            temperature=2.0,
            chunk_size=5,
        )
        assert per.shape == (23,) and (per >= 0).all()
        assert float(per.sum()) == pytest.approx(float(total), rel=1e-5)


def test_metrics_against_a_teacher_that_is_the_student(models):
    student, hyper = models
    examples = [_example(seed, length) for seed, length in ((1, 30), (2, 21), (3, 26))]
    items = _items(student, examples, weights=[1.0, 1.0, 0.0])  # the last is a padding repeat
    report = _evaluate(student, {"generated": hyper}, items)
    assert list(report.arms) == ["none", "generated", "prompt_swap"]
    counted = [collate([e], 0).loss_mask[:, 1:] for e in examples[:2]]
    assert report.examples == 2 and report.tokens == sum(int(m.sum()) for m in counted)
    none = report.arms["none"]
    assert none.kl == pytest.approx(0.0, abs=1e-4)
    assert none.top1_agreement == 1.0
    # The NLL of the teacher's top-1 = the student's own max log-prob, from full logits.
    reference = []
    for example, mask in zip(examples[:2], counted, strict=True):
        batch = collate([example], 0)
        with torch.no_grad():
            logprobs = torch.log_softmax(student(input_ids=batch.input_ids).logits[0, :-1].float(), -1)
        reference.append(-logprobs.max(-1).values[mask[0]])
    assert none.teacher_nll == pytest.approx(float(torch.cat(reference).mean()), rel=1e-5)
    generated = report.arms["generated"]
    assert generated.kl > 1e-3 and generated.gap_closed == pytest.approx(1 - generated.kl / none.kl)
    assert report.arms["prompt_swap"].kl != pytest.approx(generated.kl, rel=1e-6)  # the prompts differ
    assert report.record()["held_out_kl"] == generated.kl


def test_buckets_recombine_to_the_totals(models):
    student, hyper = models
    report = _evaluate(student, {"generated": hyper}, _items(student, [_example(4, 30), _example(5, 17)]))
    assert list(report.tokens_by_position) == ["0-8", "8-16", "16+"]
    assert all(report.tokens_by_position.values())
    assert sum(report.tokens_by_position.values()) == report.tokens
    for arm in report.arms.values():
        combined = sum(arm.kl_by_position[b] * n for b, n in report.tokens_by_position.items()) / report.tokens
        assert combined == pytest.approx(arm.kl, rel=1e-9)


def test_identical_prompts_make_prompt_swap_and_static_equal_generated(models):
    student, hyper = models
    prompt = [11, 12, 13, 14, 15]
    examples = [_example(6, 25, prompt), _example(7, 19, prompt)]
    static = FixedPrompt(hyper, torch.tensor([prompt]))
    report = _evaluate(student, {"generated": hyper, "static": static}, _items(student, examples))
    assert list(report.arms) == ["none", "generated", "prompt_swap", "static"]
    generated = report.arms["generated"]
    for arm in ("prompt_swap", "static"):
        assert report.arms[arm].kl == pytest.approx(generated.kl, rel=1e-6)
        assert report.arms[arm].teacher_nll == pytest.approx(generated.teacher_nll, rel=1e-6)
    assert report.arms["none"].gap_closed == 0.0


def test_publish_writes_json_table_plot_and_gauges(models, tmp_path):
    student, hyper = models
    items = _items(student, [_example(8, 22), _example(9, 27)])
    for step in (0, 5):
        report = _evaluate(student, {"generated": hyper}, items)
        publish(report, step, tmp_path, rank=0)
    saved = json.loads((tmp_path / "step-000005.json").read_text())
    assert saved["step"] == 5 and saved["held_out_kl"] == report.arms["generated"].kl
    assert set(saved["arms"]) == {"none", "generated", "prompt_swap"}
    table = (tmp_path / "eval.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| arm")]
    assert [row.split("|")[1].strip() for row in rows] == ["none", "generated", "prompt_swap"]
    assert (tmp_path / "eval.png").stat().st_size > 1000
    for arm, values in report.arms.items():
        labels = {"rank": "0", "arm": arm}
        assert REGISTRY.get_sample_value("trainer_eval_kl", labels) == values.kl
        assert REGISTRY.get_sample_value("trainer_eval_top1_agreement", labels) == values.top1_agreement
        assert REGISTRY.get_sample_value("trainer_eval_gap_closed", labels) == values.gap_closed
    scalars = report.scalars()
    assert scalars["eval/generated/kl_by_position/0-8"] == report.arms["generated"].kl_by_position["0-8"]
    assert "eval/none/gap_closed" in scalars and scalars["held_out_kl"] == report.arms["generated"].kl


def _config(*overrides: str, **eval_fields) -> TrainerConfig:
    return load_config(TrainerConfig, CPU_CONFIG, [*overrides, *(f"eval.{k}={v}" for k, v in eval_fields.items())])


def _fake_checkpoint(path: Path, targets: list[str]) -> Path:
    """A directory that passes for a complete checkpoint of a run with these LoRA targets."""
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"")
    (path / "config.json").write_text(json.dumps({"hypernetwork": {"targets": targets}}))
    torch.save({"step": 7, "phase_index": 1}, path / "train_state_rank0.pt")
    return path


def test_cli_checks_its_arguments_before_loading(tmp_path):
    config = _config()
    targets = config.hypernetwork.targets
    good = _fake_checkpoint(tmp_path / "run" / "step_000007", targets)
    prepared, path, state = prepare(config, str(tmp_path / "run"), None)  # a directory of checkpoints: the latest
    assert path == good and state["step"] == 7 and prepared.eval.static_checkpoint is None
    with pytest.raises(FileNotFoundError, match="no .metadata"):
        prepare(config, str(tmp_path / "missing"), None)
    with pytest.raises(ValueError, match="eval.held_out is 0"):
        prepare(_config(held_out=0), str(good), None)
    other = _fake_checkpoint(tmp_path / "static" / "step_000003", targets[:2])
    with pytest.raises(ValueError, match="same modules"):
        prepare(config, str(good), str(other))
    static = _fake_checkpoint(tmp_path / "static2" / "step_000003", targets)
    assert prepare(config, str(good), str(static))[0].eval.static_checkpoint == str(static)


def test_eval_config_is_checked():
    with pytest.raises(ValueError, match="held_out"):
        _config(held_out=1)
    with pytest.raises(ValueError, match="position_buckets"):
        _config(position_buckets="[0, 512, 512]")
    with pytest.raises(ValueError, match="static_checkpoint needs"):
        _config(held_out=0, static_checkpoint="x")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the checkpoint is written without a group
def test_cli_end_to_end(tmp_path, tiny_models, hf_teacher):
    """A checkpoint of the CPU config's hypernetwork (moved off its init), written by the trainer's
    Checkpointer in this process, evaluated by ``python -m hyperdistill.trainer.eval`` against the real teacher,
    with the same checkpoint as the static arm."""
    from transformers import AutoModelForCausalLM

    config = _config(f"student.path={tiny_models.student}", f"checkpoint.dir={tmp_path / 'checkpoints'}")
    student = AutoModelForCausalLM.from_pretrained(tiny_models.student, dtype=torch.float32)
    hyper = _trained(build_hyper_lora(config.hypernetwork, student))
    checkpointer = Checkpointer(CheckpointConfig(dir=str(tmp_path / "checkpoints")), rank=0)
    path = checkpointer.save(
        3, hyper, torch.optim.AdamW(hyper.parameters()), {"step": 3, "phase_index": 0}, config_to_dict(config)
    )
    command = [
        sys.executable,
        "-m",
        "hyperdistill.trainer.eval",
        "--config",
        str(CPU_CONFIG),
        "--checkpoint",
        str(path.parent),
        "--static-checkpoint",
        str(path),
        "--out",
        str(tmp_path / "out"),
        f"student.path={tiny_models.student}",
        f"teacher.addresses=[{hf_teacher.address}]",
        "eval.held_out=2",
        f"data.cache_dir={tmp_path / 'data'}",
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "MASTER_PORT": str(free_port())},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "# Held-out evaluation at step 3" in result.stdout
    saved = json.loads((tmp_path / "out" / "step-000003.json").read_text())
    arms = {arm: values["kl"] for arm, values in saved["arms"].items()}
    assert list(arms) == ["none", "generated", "prompt_swap", "static"] and saved["examples"] == 2
    assert arms["static"] == arms["generated"] != arms["none"]
    assert arms["prompt_swap"] != arms["generated"]
    assert (tmp_path / "out" / "eval.md").read_text() in result.stdout
