"""Using a trained hypernetwork: export from a checkpoint, reload on a student (refusing another
student's shapes), and per-prompt PEFT adapters that `peft` loads with the logits of our own
`hyper_lora` forward."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hyperdistill.common.config import config_to_dict
from hyperdistill.common.tokenizer import load_tokenizer
from hyperdistill.trainer import adapt
from hyperdistill.trainer.checkpoint import CheckpointConfig, Checkpointer
from hyperdistill.trainer.data.render import render_prompt
from hyperdistill.trainer.export import (
    export_checkpoint,
    load_hypernetwork,
    save_hypernetwork,
    student_skeleton,
)
from hyperdistill.trainer.hypernetwork import HyperLoRAConfig, build_hyper_lora
from hyperdistill.trainer.lora import GeneratedLoRA, LoRAWeights, hyper_lora

TARGETS = ["linear_attn.in_proj_qkvz", "linear_attn.out_proj", "self_attn.q_proj", "self_attn.o_proj"]


def small_config(**overrides) -> HyperLoRAConfig:
    fields = dict(targets=TARGETS, rank=8, experts=4, alpha=16.0, encoder_dim=32, encoder_heads=4, trunk_dim=32)
    return HyperLoRAConfig(**{**fields, **overrides})


def trained(adapter):
    """Move every parameter off its init (B = 0 and zero heads would make every adapter trivial)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return adapter


def student(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_models):
    out = tmp_path_factory.mktemp("export") / "hyper"
    hyper = trained(build_hyper_lora(small_config(), student(tiny_models.student)))
    save_hypernetwork(hyper, "tiny-student", out)
    return out, hyper


def test_export_reloads_on_a_weightless_student_with_the_same_weights(exported, tiny_models):
    out, hyper = exported
    config = json.loads((out / "config.json").read_text())
    assert config["student"] == "tiny-student" and config["hypernetwork"]["rank"] == 8
    assert [t["name"] for t in config["targets"]] == [t.name for t in hyper.targets]
    loaded = load_hypernetwork(out, student_skeleton(tiny_models.student))
    want, got = hyper.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    prompt = torch.tensor([[11, 22, 33, 44, 55]])
    mask = torch.ones_like(prompt, dtype=torch.bool)
    with torch.no_grad():
        a, b = hyper.eval()(prompt, mask), loaded(prompt, mask)
    for name in a.weights:
        assert torch.allclose(a.weights[name].A, b.weights[name].A) and torch.equal(
            a.weights[name].B, b.weights[name].B
        )


def test_export_refuses_a_student_with_other_targets(exported, tiny_models, tmp_path):
    out, _ = exported
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    config = json.loads((out / "config.json").read_text())
    config["targets"][0]["out_features"] += 1
    gone = config["targets"].pop()
    (tampered / "config.json").write_text(json.dumps(config))
    (tampered / "model.safetensors").symlink_to(out / "model.safetensors")
    first = config["targets"][0]
    n_in, n_out = first["in_features"], first["out_features"]
    shapes = rf"\[{n_in}, {n_out - 1}\], the export's \[{n_in}, {n_out}\]"
    with pytest.raises(ValueError, match=rf"{gone['name']}: not in the export; {first['name']}: \[in, out\] {shapes}"):
        load_hypernetwork(tampered, student_skeleton(tiny_models.student))
    with pytest.raises(FileNotFoundError, match="not an exported hypernetwork"):
        load_hypernetwork(tmp_path, student_skeleton(tiny_models.student))
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_hypernetwork(exported[1], "x", out)


def test_peft_loads_the_adapter_with_our_logits(exported, tiny_models, tmp_path):
    """The adapter written for a prompt, loaded by peft.PeftModel on the plain student, gives the
    logits of the student under our `hyper_lora` with the LoRA generated for that prompt."""
    from peft import PeftModel

    out, _ = exported
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Write a docstring for the function below.\n\ndef add(a, b):\n    return a + b\n")
    adapter_dir = tmp_path / "adapter"
    adapt.main(["--hypernetwork", str(out), "--student", str(tiny_models.student), "--prompt-file",
                str(prompt_file), "--out", str(adapter_dir)])  # fmt: skip
    assert adapter_dir.stat().st_mode & 0o055 == 0o055  # readable by a serving process of another user
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16.0 and set(config["target_modules"]) == set(TARGETS)

    tokenizer = load_tokenizer(tiny_models.student)
    prompt_ids = render_prompt([{"role": "user", "content": prompt_file.read_text()}], tokenizer)
    ids = torch.tensor([prompt_ids + tokenizer.encode("Adds two numbers.")])
    ours = student(tiny_models.student)
    hyper = load_hypernetwork(out, ours)
    lora = adapt.generate_lora(hyper, prompt_ids)
    with torch.no_grad(), hyper_lora(ours, lora, seq_len=ids.shape[1]):
        want = ours(input_ids=ids).logits
    with torch.no_grad():
        plain = student(tiny_models.student)
        base = plain(input_ids=ids).logits
        got = PeftModel.from_pretrained(plain, str(adapter_dir)).eval()(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3  # the adapter changes the logits
    assert (got - want).abs().max() <= 1e-5


def test_adapt_refuses_an_existing_directory_and_writes_one_adapter_per_jsonl_line(exported, tiny_models, tmp_path):
    out, _ = exported
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "doc", "prompt": "Write a docstring."}\n{"prompt": "Review this code."}\n')
    args = ["--hypernetwork", str(out), "--student", str(tiny_models.student), "--prompts", str(prompts)]
    adapt.main([*args, "--out", str(tmp_path / "adapters")])
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["2", "doc"]
    with pytest.raises(SystemExit) as exited:
        adapt.main([*args, "--out", str(tmp_path / "adapters")])
    assert exited.value.code == 2
    adapt.main([*args, "--out", str(tmp_path / "adapters"), "--overwrite"])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the checkpoint is written without a group
def test_export_from_a_training_checkpoint(tmp_path, tiny_models):
    from hyperdistill.common.config import load_config
    from hyperdistill.trainer.config import TrainerConfig
    from tests.test_eval import CPU_CONFIG

    config = load_config(TrainerConfig, CPU_CONFIG, [f"student.path={tiny_models.student}"])
    hyper = trained(build_hyper_lora(config.hypernetwork, student(tiny_models.student)))
    checkpointer = Checkpointer(CheckpointConfig(dir=str(tmp_path / "checkpoints")), rank=0)
    checkpointer.save(3, hyper, torch.optim.AdamW(hyper.parameters()), {"step": 3}, config_to_dict(config))
    out = export_checkpoint(tmp_path / "checkpoints", tmp_path / "hyper", student="Qwen/Qwen3-Coder-Next")
    assert json.loads((out / "config.json").read_text())["student"] == "Qwen/Qwen3-Coder-Next"
    loaded = load_hypernetwork(out, student_skeleton(tiny_models.student))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in hyper.state_dict().items())


def test_generate_with_the_kv_cache_and_a_batch_of_prompts(exported, tiny_models):
    """Each prompt's LoRA applies to its prompt and to every one-token decoding step: cached,
    left-padded batched generation gives the tokens of a greedy loop over full forwards without a
    cache, prompt by prompt; and the LoRA changes the answer."""
    from hyperdistill.trainer.generate import generate

    out, _ = exported
    tokenizer = load_tokenizer(tiny_models.student)
    ours = student(tiny_models.student)
    hyper = load_hypernetwork(out, ours)
    conversations = [
        [{"role": "user", "content": "Write tests for the parser."}],
        [{"role": "system", "content": "You review code."}, {"role": "user", "content": "Review this: x = 1 / 0"}],
    ]
    steps = 6
    batched = generate(ours, tokenizer, conversations, hyper, max_new_tokens=steps)
    assert [len(a) for a in batched] == [steps, steps]  # no early end of turn: every step is compared
    plain = generate(ours, tokenizer, conversations, None, max_new_tokens=steps)
    for messages, answer in zip(conversations, batched, strict=True):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = torch.tensor([ids["input_ids"]])
        lora = adapt.generate_lora(hyper, render_prompt(messages, tokenizer))
        reference = []
        with torch.no_grad(), hyper_lora(ours, lora, seq_len=None):
            for _ in range(len(answer)):
                token = int(ours(input_ids=ids, use_cache=False).logits[0, -1].argmax())
                reference.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        assert answer == reference
    assert batched != plain


def test_a_prompt_over_the_encoder_cap_is_said_to_be_cut_to_its_end(exported, tiny_models, caplog):
    out, _ = exported
    hyper = load_hypernetwork(out, student_skeleton(tiny_models.student))
    cap = hyper.config.max_prompt_tokens
    long_prompt = list(range(100, 100 + cap + 7))
    with caplog.at_level("WARNING", logger="hyperdistill.trainer.adapt"):
        cut = adapt.generate_lora(hyper, long_prompt)
    assert f"the prompt is {cap + 7} tokens; the encoder reads its last {cap}" in caplog.text
    kept = adapt.generate_lora(hyper, long_prompt[-cap:])  # the same LoRA as the prompt's last `cap` tokens
    assert all(torch.equal(cut.weights[n].A, kept.weights[n].A) for n in cut.weights)


def test_an_adapter_of_some_module_types_is_the_lora_without_the_others(exported, tiny_models, tmp_path):
    """--modules: the subset a server supports; peft then gives our logits with the other targets' LoRA off."""
    from peft import PeftModel

    out, _ = exported
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Review this code.")
    args = ["--hypernetwork", str(out), "--student", str(tiny_models.student), "--prompt-file", str(prompt_file)]
    adapt.main([*args, "--out", str(tmp_path / "sub"), "--modules", "self_attn.o_proj", "linear_attn.out_proj"])
    config = json.loads((tmp_path / "sub" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["linear_attn.out_proj", "self_attn.o_proj"]
    with pytest.raises(SystemExit):
        adapt.main([*args, "--out", str(tmp_path / "bad"), "--modules", "mlp.gate_proj"])
    assert not (tmp_path / "bad").exists()

    tokenizer = load_tokenizer(tiny_models.student)
    prompt_ids = render_prompt([{"role": "user", "content": "Review this code."}], tokenizer)
    ids = torch.tensor([prompt_ids + tokenizer.encode("Looks fine.")])
    ours = student(tiny_models.student)
    full = adapt.generate_lora(load_hypernetwork(out, ours), prompt_ids)
    kept = ("self_attn.o_proj", "linear_attn.out_proj")
    weights = {
        n: w if w.kind in kept else LoRAWeights(w.A, torch.zeros_like(w.B), w.kind) for n, w in full.weights.items()
    }
    lora = GeneratedLoRA(weights, full.scale)
    with torch.no_grad(), hyper_lora(ours, lora, seq_len=ids.shape[1]):
        want = ours(input_ids=ids).logits
    with torch.no_grad():
        got = (
            PeftModel.from_pretrained(student(tiny_models.student), str(tmp_path / "sub")).eval()(input_ids=ids).logits
        )
    assert (got - want).abs().max() <= 1e-5


def test_vllm_target_modules_cover_every_module_type_of_the_adapter():
    # vLLM loads q/k/v into its fused qkv_proj (gate/up into gate_up_proj) and silently drops an
    # adapter's module types its --lora-target-modules lacks: adapt prints the list that covers them.
    targets = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "linear_attn.in_proj_ba", "mlp.up_proj"]
    assert adapt.vllm_target_modules(targets) == ["gate_up_proj", "in_proj_ba", "qkv_proj"]
    assert adapt.vllm_target_modules(["o_proj", "out_proj"]) == ["o_proj", "out_proj"]
