"""Chat with the student plus the LoRA an exported hypernetwork generates for each prompt:

    python -m hyperdistill.trainer.generate --hypernetwork HYPER_DIR --student PATH --prompt "..." [--prompt ...]
        [--system "..."] [--max-new-tokens 256] [--no-lora]

transformers' ``generate`` with its KV cache: each prompt's LoRA (`hyper_lora` with any input
length) applies to the prompt's forward and then to every one-token decoding step; several prompts
run as one left-padded batch, each with its own LoRA. One prompt streams its tokens as they come;
``--no-lora`` answers with the plain student, for comparison. Greedy unless ``--temperature`` > 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, TextStreamer

from hyperdistill.common.log import setup_logging
from hyperdistill.common.tokenizer import load_tokenizer
from hyperdistill.trainer.adapt import generate_lora
from hyperdistill.trainer.data.render import render_prompt
from hyperdistill.trainer.export import load_hypernetwork
from hyperdistill.trainer.hypernetwork import Adapter
from hyperdistill.trainer.lora import GeneratedLoRA, LoRAWeights, hyper_lora

logger = logging.getLogger(__name__)


def batch_lora(adapter: Adapter, prompts: list[list[int]]) -> GeneratedLoRA:
    """One LoRA per prompt (token ids of system + first user message), stacked into a batch."""
    loras = [generate_lora(adapter, ids) for ids in prompts]
    weights = {
        name: LoRAWeights(
            torch.cat([lora.weights[name].A for lora in loras]),
            torch.cat([lora.weights[name].B for lora in loras]),
            w.kind,
        )
        for name, w in loras[0].weights.items()
    }
    return GeneratedLoRA(weights, loras[0].scale)


@torch.no_grad()
def generate(
    student,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict]],
    adapter: Adapter | None,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    stream: bool = False,
) -> list[list[int]]:
    """The student's answers (token ids, up to the end of turn) to ``conversations`` (each:
    optional system message + user message), each with the LoRA ``adapter`` generates for it
    (None: no LoRA)."""
    chats = [
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        for messages in conversations
    ]
    width = max(map(len, chats))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(c)) + c for c in chats])  # left-padded
    attention_mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chats])
    options = dict(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=None,
        top_k=None,
        pad_token_id=pad,
        use_cache=True,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None,
    )
    lora = batch_lora(adapter, [render_prompt(m, tokenizer) for m in conversations]) if adapter else None
    device = student.get_input_embeddings().weight.device
    with hyper_lora(student, lora, seq_len=None) if lora is not None else contextlib.nullcontext():
        out = student.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **options)
    return [_until_end(row.tolist(), {pad, tokenizer.eos_token_id}) for row in out[:, width:]]


def _until_end(ids: list[int], ends: set[int]) -> list[int]:
    """The answer up to and including its first end-of-turn token (the rest of a batch row is padding)."""
    for i, token in enumerate(ids):
        if token in ends:
            return ids[: i + 1]
    return ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Chat with the student plus each prompt's generated LoRA.")
    parser.add_argument("--hypernetwork", required=True, type=Path, help="an exported hypernetwork directory")
    parser.add_argument("--student", required=True, help="the student model directory")
    parser.add_argument("--prompt", required=True, action="append", help="a user message (repeat for a batch)")
    parser.add_argument("--system", help="a system message for every prompt")
    parser.add_argument("--chat-template", help="a Jinja file replacing the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-lora", action="store_true", help="the plain student, for comparison")
    args = parser.parse_args(argv)
    setup_logging()
    tokenizer = load_tokenizer(args.student, args.chat_template)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=getattr(torch, args.dtype)).eval()
    adapter = None
    if not args.no_lora:
        try:
            adapter = load_hypernetwork(args.hypernetwork, student)
        except (FileNotFoundError, ValueError) as e:
            parser.exit(2, f"error: {e}\n")
    student.to(args.device)
    if adapter is not None:
        adapter.to(args.device)
    system = [{"role": "system", "content": args.system}] if args.system else []
    conversations = [[*system, {"role": "user", "content": p}] for p in args.prompt]
    answers = generate(
        student,
        tokenizer,
        conversations,
        adapter,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        stream=len(conversations) == 1,
    )
    if len(conversations) > 1:
        for prompt, answer in zip(args.prompt, answers, strict=True):
            print(f"### {prompt}\n{tokenizer.decode(answer, skip_special_tokens=True)}\n")


if __name__ == "__main__":
    main()
