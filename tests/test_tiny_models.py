"""Tiny teacher/student checkpoints, the shared tokenizer and our chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from jinja2.exceptions import TemplateError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hyperdistill.common.tokenizer import load_tokenizer, qwen_tokenizer_dir, tokenizer_fingerprint
from tests.devtools import tiny_models
from tests.devtools.tiny_models import STAMP_FILE, TinyModels, ensure_tiny_models

VOCAB_SIZE = 151936

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "execute_bash",
            "description": "Run a bash command.",
            "parameters": {
                "type": "object",
                "properties": {"command": {"type": "string"}},
                "required": ["command"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "str_replace_editor",
            "description": "View or edit a file.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "view_range": {"type": "array"}},
            },
        },
    },
]
ASSISTANT_1 = "Let me look at the code."
ASSISTANT_2 = "Fixed: `add` now returns a + b."
MESSAGES = [
    {"role": "system", "content": "You are a coding agent."},
    {"role": "user", "content": "Fix the bug in add()."},
    {
        "role": "assistant",
        "content": ASSISTANT_1,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "execute_bash", "arguments": {"command": "ls -la"}}},
            {
                "id": "c2",
                "type": "function",
                "function": {"name": "str_replace_editor", "arguments": {"path": "/repo/m.py", "view_range": [1, 20]}},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "m.py\ntest_m.py"},
    {"role": "tool", "tool_call_id": "c2", "content": "def add(a, b):\n    return a - b"},
    {"role": "user", "content": "Please finish."},
    {"role": "assistant", "content": ASSISTANT_2},
]
CALLS = (
    "<tool_call>\n<function=execute_bash>\n<parameter=command>\nls -la\n</parameter>\n</function>\n</tool_call>\n"
    "<tool_call>\n<function=str_replace_editor>\n<parameter=path>\n/repo/m.py\n</parameter>\n"
    "<parameter=view_range>\n[1, 20]\n</parameter>\n</function>\n</tool_call>"
)
ASSISTANT_SPANS = [f"{ASSISTANT_1}\n{CALLS}<|im_end|>", f"{ASSISTANT_2}<|im_end|>"]


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return ensure_tiny_models(tmp_path_factory.mktemp("tiny") / "models")


@pytest.fixture(scope="session")
def tokenizer(models: TinyModels):
    return load_tokenizer(models.student)


def test_models_load_with_real_vocab(models: TinyModels) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(models.teacher)
    student = AutoModelForCausalLM.from_pretrained(models.student)
    assert type(teacher).__name__ == "Qwen3MoeForCausalLM"
    assert type(student).__name__ == "Qwen3NextForCausalLM"
    for model in (teacher, student):
        assert model.config.vocab_size == VOCAB_SIZE
        assert model.get_output_embeddings().weight.shape == (VOCAB_SIZE, 128)
        assert model.dtype == torch.float32
    assert student.config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert hasattr(student.model.layers[0], "linear_attn")
    assert hasattr(student.model.layers[3], "self_attn")


def test_build_is_deterministic(models: TinyModels, tmp_path: Path) -> None:
    again = ensure_tiny_models(tmp_path / "models")
    for first, second in ((models.teacher, again.teacher), (models.student, again.student)):
        a = load_file(first / "model.safetensors")
        b = load_file(second / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[name], b[name]) for name in a)
    teacher = load_file(models.teacher / "model.safetensors")
    student = load_file(models.student / "model.safetensors")
    assert not torch.equal(teacher["model.embed_tokens.weight"], student["model.embed_tokens.weight"])


def test_cache_is_reused_rebuilt_when_stale_and_swapped_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "models"
    ensure_tiny_models(root)
    weights = root / "teacher" / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    ensure_tiny_models(root)
    assert weights.stat().st_mtime_ns == built_at

    def killed(out: Path) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(tiny_models, "build_student", killed)
        with pytest.raises(KeyboardInterrupt):
            ensure_tiny_models(root, force=True)
    assert weights.stat().st_mtime_ns == built_at  # the finished build is untouched
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".models-")]

    (root / STAMP_FILE).write_text(json.dumps({"key": "stale"}))
    ensure_tiny_models(root)
    assert json.loads((root / STAMP_FILE).read_text())["key"] == tiny_models.build_key()
    assert weights.stat().st_mtime_ns != built_at


def test_tokenizer_fingerprints(models: TinyModels, tokenizer) -> None:
    assert len(tokenizer) == 151669  # 151,643 BPE tokens + 26 specials
    student = tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(load_tokenizer(models.teacher)) == student
    assert tokenizer_fingerprint(load_tokenizer(qwen_tokenizer_dir())) == student
    extended = load_tokenizer(models.student)
    extended.add_tokens(["<|hyperdistill_extra|>"])
    assert tokenizer_fingerprint(extended) != student


def test_chat_template_renders_qwen3_coder_format(tokenizer) -> None:
    text = tokenizer.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False)
    expected_order = [
        "<|im_start|>system\nYou are a coding agent.\n\n# Tools\n",
        "<tools>\n<function>\n<name>execute_bash</name>\n<description>Run a bash command.</description>\n"
        '<parameters>{"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}'
        "</parameters>\n</function>\n<function>\n<name>str_replace_editor</name>",
        "</tools>",
        "<function=example_function_name>",
        "<|im_end|>\n<|im_start|>user\nFix the bug in add().<|im_end|>\n",
        f"<|im_start|>assistant\n{ASSISTANT_SPANS[0]}\n",
        "<|im_start|>user\n<tool_response>\nm.py\ntest_m.py\n</tool_response>\n"
        "<tool_response>\ndef add(a, b):\n    return a - b\n</tool_response><|im_end|>\n",
        "<|im_start|>user\nPlease finish.<|im_end|>\n",
        f"<|im_start|>assistant\n{ASSISTANT_SPANS[1]}\n",
    ]
    positions = [text.find(piece) for piece in expected_order]
    assert -1 not in positions, [p for p, at in zip(expected_order, positions, strict=True) if at == -1]
    assert positions == sorted(positions)
    assert text.endswith(f"{ASSISTANT_SPANS[1]}\n")
    assert text.count("<|im_start|>") == 6
    prompt = tokenizer.apply_chat_template(MESSAGES[:2], add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|im_start|>system\nYou are a coding agent.<|im_end|>\n"
        "<|im_start|>user\nFix the bug in add().<|im_end|>\n<|im_start|>assistant\n"
    )


def test_assistant_mask_covers_exactly_the_assistant_spans(tokenizer) -> None:
    out = tokenizer.apply_chat_template(MESSAGES, tools=TOOLS, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    spans, current = [], []
    for token, keep in zip(ids, mask, strict=True):
        if keep:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    assert not current
    assert [tokenizer.decode(span) for span in spans] == ASSISTANT_SPANS


def test_string_arguments_are_rejected(tokenizer) -> None:
    call = {"type": "function", "function": {"name": "execute_bash", "arguments": '{"command": "ls"}'}}
    with pytest.raises(TemplateError, match="json.loads"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "", "tool_calls": [call]}], tokenize=False)


def _logprobs(model_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token logprobs, float32 [T, V], of the model in `model_dir`."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids).logits[0].float(), dim=-1)


@pytest.fixture(scope="module")
def trajectory_ids(tokenizer) -> torch.Tensor:
    return tokenizer.apply_chat_template(MESSAGES, tools=TOOLS, return_dict=True, return_tensors="pt")["input_ids"]


def test_teacher_top20_is_peaked_and_distinct(models: TinyModels, trajectory_ids: torch.Tensor) -> None:
    top = _logprobs(models.teacher, trajectory_ids).topk(20, dim=-1).values  # [T, 20]
    gaps = (top[:, :-1] - top[:, 1:]).min(dim=-1).values  # [T]
    assert (gaps > 0).all(), "tied top-20 logprobs"
    assert (gaps > 1e-3).float().mean() > 0.8
    top1 = top[:, 0].exp()
    assert top1.median() > 0.1
    assert top1.min() > 0.01


def test_student_starts_far_from_teacher(models: TinyModels, trajectory_ids: torch.Tensor) -> None:
    teacher = _logprobs(models.teacher, trajectory_ids)
    student = _logprobs(models.student, trajectory_ids)
    assert (teacher.argmax(-1) == student.argmax(-1)).float().mean() < 0.05
    kl = (teacher.exp() * (teacher - student)).sum(-1)  # KL(teacher || student) [T]
    assert kl.mean() > 1.0
