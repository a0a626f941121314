"""Per-prompt adapters from an exported hypernetwork, as standard PEFT LoRA adapters:

    python -m hyperdistill.trainer.adapt --hypernetwork HYPER_DIR --student PATH --prompt-file F --out ADAPTER_DIR
    python -m hyperdistill.trainer.adapt --hypernetwork HYPER_DIR --student PATH --prompts F.jsonl --out DIR

A prompt is the hypernetwork's input as in training: optional system message plus the first user
message, rendered with the student's chat template (``--system-file``; in JSONL, ``system``). Each
adapter directory holds ``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``,
``target_modules``, ``base_model_name_or_path``) and ``adapter_model.safetensors`` under PEFT's key
names (``base_model.model.<module>.lora_A.weight`` [r, in], ``lora_B.weight`` [out, r]), which
``peft.PeftModel.from_pretrained`` and vLLM's ``--enable-lora`` load. With JSONL (``{"prompt": ...,
"system"?: ..., "id"?: ...}`` per line) each line gets ``DIR/<id or line number>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from hyperdistill.common.dirs import default_permissions, replace_dir
from hyperdistill.common.log import setup_logging
from hyperdistill.common.tokenizer import load_tokenizer
from hyperdistill.trainer.data.render import render_prompt
from hyperdistill.trainer.export import load_hypernetwork, read_config, student_skeleton
from hyperdistill.trainer.hypernetwork import Adapter
from hyperdistill.trainer.lora import GeneratedLoRA

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@torch.no_grad()
def generate_lora(adapter: Adapter, prompt_ids: list[int]) -> GeneratedLoRA:
    """The LoRA ``adapter`` generates for one prompt (token ids); batch of one."""
    cap = adapter.config.max_prompt_tokens
    if len(prompt_ids) > cap:
        logger.warning(
            "the prompt is %d tokens; the encoder reads its last %d (hypernetwork.max_prompt_tokens): "
            "the system turn's start is dropped, the task at the end is kept",
            len(prompt_ids),
            cap,
        )
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=next(adapter.parameters()).device)
    return adapter(ids, torch.ones_like(ids, dtype=torch.bool))


def peft_config(adapter: Adapter, base_model: str, modules: list[str] | None = None) -> dict:
    """``adapter_config.json`` of a PEFT LoRA with the hypernetwork's rank, alpha and targets (or
    the module types ``modules`` of them)."""
    config = adapter.config
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "use_rslora": config.rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted(modules or {t.kind for t in adapter.targets}),
        "inference_mode": True,
    }


# vLLM fuses these projections into one layer and loads their LoRAs there (its packed_modules_mapping).
VLLM_PACKED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def vllm_target_modules(target_modules: list[str]) -> list[str]:
    """vLLM's ``--lora-target-modules`` for an adapter whose ``target_modules`` (module names without
    their parent, ``q_proj`` or ``self_attn.q_proj``) are these. vLLM loads an adapter with module
    types its list lacks without a word and drops their update, so the list must cover all of them."""
    names = {name.rsplit(".", 1)[-1] for name in target_modules}
    return sorted({VLLM_PACKED.get(name, name) for name in names})


def only_modules(lora: GeneratedLoRA, modules: list[str]) -> GeneratedLoRA:
    """``lora`` on the targets of the module types ``modules`` only (e.g. those a server supports)."""
    kinds = {w.kind for w in lora.weights.values()}
    if unknown := sorted(set(modules) - kinds):
        raise ValueError(
            f"--modules {', '.join(unknown)}: not targets of this hypernetwork ({', '.join(sorted(kinds))})"
        )
    return GeneratedLoRA({n: w for n, w in lora.weights.items() if w.kind in modules}, lora.scale)


def save_adapter(lora: GeneratedLoRA, config: dict, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write sample 0 of ``lora`` as a PEFT adapter directory ``out`` (float32), atomically."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if lora.batch_size != 1:
        raise ValueError(f"one adapter per prompt: got a LoRA for {lora.batch_size} prompts")
    tensors = {}
    for name, w in lora.weights.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = w.A[0].float().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = w.B[0].float().contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        (work / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(work / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        default_permissions(work)
        replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def read_prompts(args: argparse.Namespace) -> list[tuple[Path, list[dict]]]:
    """(output directory, prompt messages) per adapter to write."""
    system = Path(args.system_file).read_text() if args.system_file else None
    if args.prompt_file:
        return [(args.out, _messages(Path(args.prompt_file).read_text(), system))]
    jobs = []
    for number, line in enumerate(Path(args.prompts).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{args.prompts}:{number}: need a JSON object with a 'prompt' ({e})") from None
        name = str(row.get("id", number))
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"{args.prompts}:{number}: id {name!r} cannot name a directory")
        jobs.append((args.out / name, _messages(prompt, row.get("system", system))))
    if not jobs:
        raise ValueError(f"{args.prompts}: no prompts")
    return jobs


def _messages(prompt: str, system: str | None) -> list[dict]:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("a prompt must be non-empty text")
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the PEFT LoRA adapter a hypernetwork generates for a prompt.")
    parser.add_argument("--hypernetwork", required=True, type=Path, help="an exported hypernetwork directory")
    parser.add_argument("--student", required=True, help="the student model directory (config, tokenizer, weights)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt-file", help="a text file: the user message")
    source.add_argument("--prompts", help='a JSONL file: {"prompt": ..., "system"?: ..., "id"?: ...} per line')
    parser.add_argument("--system-file", help="a text file: the system message (default: none)")
    parser.add_argument("--chat-template", help="a Jinja file replacing the tokenizer's chat template")
    parser.add_argument("--out", required=True, type=Path, help="the adapter directory (with --prompts: their parent)")
    parser.add_argument("--base-model", help="base_model_name_or_path in adapter_config.json (default: --student)")
    parser.add_argument(
        "--modules",
        nargs="+",
        help="write only these module types of the hypernetwork's targets (e.g. the ones a server supports)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace adapter directories that exist")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        read_config(args.hypernetwork)
        jobs = read_prompts(args)
        if not args.overwrite and (existing := [str(out) for out, _ in jobs if out.exists()]):
            raise FileExistsError(f"{', '.join(existing[:3])} exist(s); pass --overwrite to replace")
        tokenizer = load_tokenizer(args.student, args.chat_template)
        adapter = load_hypernetwork(args.hypernetwork, student_skeleton(args.student))
        config = peft_config(adapter, args.base_model or args.student, args.modules)
        for out, messages in jobs:
            lora = generate_lora(adapter, render_prompt(messages, tokenizer))
            lora = only_modules(lora, args.modules) if args.modules else lora
            save_adapter(lora, config, out, overwrite=args.overwrite)
            logger.info("adapter written to %s", out)
        logger.info(
            "to serve with vLLM: --enable-lora --max-lora-rank %d --lora-target-modules %s "
            "(every module type of the adapter: vLLM drops the update of those its list lacks)",
            config["r"],
            " ".join(vllm_target_modules(config["target_modules"])),
        )
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
