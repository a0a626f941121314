"""P6: the tiny Qwen3-Next student's forward + backward with per-sample HyperLoRA, a static PEFT
LoRA of the same rank, alpha and targets, and no LoRA.

One micro-batch of the demo (two prepared trajectories, B=2 x T=2048, the demo's 4096-token
budget) through the decoder (``student.model``); the loss is the mean square of the final hidden
states, because the LM head and the KL are the same for all three and are P5's subject. The
inputs are embeddings that require grad, so the backward runs through every layer in all three
variants (without LoRA it computes activation gradients only). Variants:

- ``none``: the frozen student.
- ``peft``: ``peft.get_peft_model`` with ``LoraConfig(r, lora_alpha, target_modules=<the
  hypernetwork's targets>)``, gradients into the LoRA A and B.
- ``hyper``: the trainer's path: hypernetwork(prompt) -> ``GeneratedLoRA``, then the student
  under ``hyper_lora``, gradients into the hypernetwork.
- ``hyper_apply``: the per-sample LoRA alone: factors generated once, then held as leaf
  tensors; separates the cost of applying per-sample factors from the hypernetwork's.

Variants run interleaved (one of each per round, the order rotating) after a warm-up round, so
load changes on a shared machine spread over all of them. One torch thread, as each of the
demo's two trainer ranks runs (torchrun sets OMP_NUM_THREADS=1): with two threads on two busy
cores, the DeltaNet reference kernels' thousands of small parallel regions stall on descheduled
threads and one step's time varied 20x between identical rounds.

Child: ``python -m tests.bench.bench_lora --repeats N --result out.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from tests.bench.bench_common import TRAINER_CPU_CONFIG, run_child, summarize, write_result

VARIANTS = ("none", "peft", "hyper", "hyper_apply")
BATCH_ROWS = 2
SEQ_LEN = 2048


def demo_config():
    from hyperdistill.common.config import load_config
    from hyperdistill.trainer.config import TrainerConfig
    from tests.devtools.tiny_models import ensure_tiny_models

    return load_config(TrainerConfig, TRAINER_CPU_CONFIG, [f"student.path={ensure_tiny_models().student}"])


def demo_batch(config):
    """The two longest prepared trajectories cut to SEQ_LEN, collated as the trainer does."""
    from hyperdistill.common.tokenizer import load_tokenizer
    from hyperdistill.trainer.data.prepare import load_prepared
    from hyperdistill.trainer.data.sampler import collate
    from tests.bench.bench_common import trainer_data_config

    tokenizer = load_tokenizer(config.student.path)
    dataset = load_prepared(trainer_data_config(), tokenizer)
    order = sorted(range(len(dataset)), key=lambda i: -dataset[i]["length"])[:BATCH_ROWS]
    examples = []
    for i in order:
        example = dict(dataset[i])
        example["input_ids"] = example["input_ids"][:SEQ_LEN]
        example["loss_mask"] = example["loss_mask"][:SEQ_LEN]
        examples.append(example)
    return collate(examples, tokenizer.pad_token_id)


def load_student(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)


def build_variants(config, batch) -> dict:
    """({variant: step function running one forward + backward}, parameter counts)."""
    from peft import LoraConfig, get_peft_model

    from hyperdistill.trainer.hypernetwork import build_hyper_lora
    from hyperdistill.trainer.lora import GeneratedLoRA, LoRAWeights, hyper_lora

    hcfg = config.hypernetwork
    embeds = load_student(config.student.path).get_input_embeddings()(batch.input_ids).detach()
    mask = batch.attention_mask

    def run(model, context):
        x = embeds.clone().requires_grad_(True)
        with context():
            hidden = model(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
        hidden.float().pow(2).mean().backward()

    plain = load_student(config.student.path)
    peft_cfg = LoraConfig(
        r=hcfg.rank, lora_alpha=hcfg.alpha, target_modules=list(hcfg.targets), lora_dropout=0.0, bias="none"
    )
    peft_model = get_peft_model(load_student(config.student.path), peft_cfg)
    hyper_student = load_student(config.student.path)
    torch.manual_seed(0)
    hyper = build_hyper_lora(hcfg, hyper_student)
    fixed = hyper(batch.prompt_ids, batch.prompt_mask)
    fixed = GeneratedLoRA(
        {
            n: LoRAWeights(w.A.detach().requires_grad_(True), w.B.detach().requires_grad_(True), w.kind)
            for n, w in fixed.weights.items()
        },
        fixed.scale,
    )

    def hyper_step():
        lora = hyper(batch.prompt_ids, batch.prompt_mask)
        run(hyper_student.model, lambda: hyper_lora(hyper_student, lora, seq_len=SEQ_LEN))

    return {
        "none": lambda: run(plain.model, _null),
        "peft": lambda: run(peft_model.base_model.model.model, _null),
        "hyper": hyper_step,
        "hyper_apply": lambda: run(hyper_student.model, lambda: hyper_lora(hyper_student, fixed, seq_len=SEQ_LEN)),
    }, _counts(peft_model, hyper)


def _null():
    return contextlib.nullcontext()


def _counts(peft_model, hyper) -> dict:
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad)
    wrapped = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
    return {
        "peft_trainable_params": lora_params,
        "peft_wrapped_modules": wrapped,
        "hyper_trainable_params": sum(p.numel() for p in hyper.parameters()),
        "hyper_targets": len(hyper.targets),
    }


def measure(repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    config = demo_config()
    batch = demo_batch(config)
    steps, counts = build_variants(config, batch)
    for name in VARIANTS:  # warm-up round
        steps[name]()
    seconds = {name: [] for name in VARIANTS}
    cpu_seconds = {name: [] for name in VARIANTS}
    for r in range(repeats):
        for name in VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]:
            start, cpu_start = time.perf_counter(), time.process_time()
            steps[name]()
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name].append(time.process_time() - cpu_start)
    return {
        "batch": list(batch.input_ids.shape),
        "prompt_tokens": batch.prompt_mask.sum(1).tolist(),
        "rank": config.hypernetwork.rank,
        "alpha": config.hypernetwork.alpha,
        "targets": list(config.hypernetwork.targets),
        "threads": torch.get_num_threads(),
        **counts,
        "seconds": {name: summarize(values) for name, values in seconds.items()},
        "cpu_seconds": {name: summarize(values) for name, values in cpu_seconds.items()},
    }


def run(out: Path, repeats: int) -> dict:
    """P6 in a child process; adds the ratios to PEFT and to no LoRA (medians of wall time)."""
    result = run_child(
        "bench_lora",
        ["--repeats", str(repeats)],
        out / "p6.json",
        timeout=1800,
        log_path=out / "p6.log",
        env={"OMP_NUM_THREADS": "1"},
    )
    median = {name: s["median"] for name, s in result["seconds"].items()}
    result["hyper_vs_peft"] = median["hyper"] / median["peft"]
    result["hyper_apply_vs_peft"] = median["hyper_apply"] / median["peft"]
    result["peft_vs_none"] = median["peft"] / median["none"]
    result["hyper_vs_none"] = median["hyper"] / median["none"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="P6 child: student forward+backward with and without LoRA.")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a demo trainer rank has 1)")
    parser.add_argument("--result", required=True, help="JSON result file")
    args = parser.parse_args()
    write_result(args.result, measure(args.repeats, args.threads))


if __name__ == "__main__":
    main()
