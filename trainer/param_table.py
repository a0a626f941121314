"""`python -m hyperdistill.trainer.param_table [key=value ...]`: HyperLoRA sizes for the real Qwen3-Coder-Next.

Builds `Qwen3NextForCausalLM` from the published config values on the meta device (no
memory, no download), discovers the LoRA targets, builds the hypernetwork on meta and prints
per module type: layers, shapes, LoRA numbers per prompt, bank parameters (a static LoRA's),
the generated gates and head parameters, then the encoder / trunk / total trainable
parameters. Overrides are hypernetwork config fields, e.g. ``rank=32 trunk_dim=256``.
"""

from __future__ import annotations

import argparse

import torch
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

from hyperdistill.common.config import load_config
from hyperdistill.trainer.hypernetwork import HyperLoRA, HyperLoRAConfig, find_targets

# Qwen3-Coder-Next / Qwen3-Next-80B-A3B (DESIGN.md, Reference facts).
QWEN3_CODER_NEXT = dict(
    vocab_size=151936,
    hidden_size=2048,
    num_hidden_layers=48,
    layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(48)],
    num_attention_heads=16,
    num_key_value_heads=2,
    head_dim=256,
    linear_num_key_heads=16,
    linear_num_value_heads=32,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    num_experts=512,
    num_experts_per_tok=10,
    moe_intermediate_size=512,
    shared_expert_intermediate_size=512,
)


def build_meta(config: HyperLoRAConfig) -> tuple[Qwen3NextForCausalLM, HyperLoRA]:
    """The real-shape student and its hypernetwork, both on the meta device."""
    with torch.device("meta"):
        student = Qwen3NextForCausalLM(Qwen3NextConfig(**QWEN3_CODER_NEXT))
        hyper = HyperLoRA(config, find_targets(student, config.targets), student.get_input_embeddings())
    return student, hyper


def _count(params) -> int:
    return sum(p.numel() for p in params)


def table_rows(config: HyperLoRAConfig, hyper: HyperLoRA) -> list[tuple]:
    """Per module type: (target, layers, shape, A, B, LoRA per prompt, bank params, gates per prompt, head)."""
    r, groups, rows = config.rank, hyper.parameter_groups(), []
    for kind in hyper.bank.kinds:
        layers = hyper.bank.group(kind)
        i, o = layers[0].in_features, layers[0].out_features
        lora = r * (i + o) * len(layers)
        rows.append(
            (
                kind,
                len(layers),
                f"{i} -> {o}",
                f"[{r}, {i}]",
                f"[{o}, {r}]",
                lora,
                lora,
                config.experts * len(layers),
                _count(groups[f"head:{kind}"]),
            )
        )
    rows.append(
        ("total", sum(row[1] for row in rows), "", "", "", *(sum(row[j] for row in rows) for j in (5, 6, 7, 8)))
    )
    return rows


def format_table(rows: list[tuple]) -> list[str]:
    """Aligned text lines: header, rule, the module types, rule, the total row."""
    header = (
        "target",
        "layers",
        "in -> out",
        "A [r, in]",
        "B [out, r]",
        "LoRA/prompt",
        "bank params",
        "gates/prompt",
        "head params",
    )
    cells = [header] + [tuple(f"{c:,}" if isinstance(c, int) else c for c in row) for row in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if j < 5 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]
    rule = "  ".join("-" * w for w in widths)
    return [lines[0], rule, *lines[1:-1], rule, lines[-1]]


def render(config: HyperLoRAConfig, student: torch.nn.Module, hyper: HyperLoRA) -> str:
    """The table and totals as text."""
    rows = table_rows(config, hyper)
    per_prompt, groups = rows[-1][5], hyper.parameter_groups()
    heads = sum(_count(params) for name, params in groups.items() if name.startswith("head:"))
    cfg = student.config
    return "\n".join(
        [
            f"HyperLoRA for Qwen3-Coder-Next (Qwen3NextConfig on meta: {cfg.num_hidden_layers} layers, hidden "
            f"{cfg.hidden_size}, {_count(student.parameters()) / 1e9:.2f}B student params, frozen)",
            f"rank {config.rank}, scale {config.scale:g}{' (rsLoRA)' if config.rslora else ''}, encoder "
            f"{config.encoder_layers}x{config.encoder_dim}, trunk {config.trunk_layers}x{config.trunk_dim}, "
            f"prompt cap {config.max_prompt_tokens} tokens",
            "",
            *format_table(rows),
            "",
            f"per prompt: A_b = diag(g_b) A, B_b = B, with the bank's A, B and {config.experts} generated expert gates "
            f"g_b "
            f"per target (summing to {config.experts}, each over r / {config.experts} rank directions)",
            f"LoRA per prompt: {per_prompt:,} numbers = {per_prompt * 4 / 2**20:.1f} MiB in float32",
            f"trainable: encoder {_count(groups['encoder']):,} + trunk {_count(groups['trunk']):,} + heads "
            f"{heads:,} + bank {_count(groups['bank']):,} = {_count(hyper.parameters()):,}",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hyperdistill.trainer.param_table",
        description="Print HyperLoRA targets, shapes, generated numbers and parameters for the real Qwen3-Coder-Next.",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="hypernetwork config overrides, e.g. rank=32")
    args = parser.parse_args(argv)
    config = load_config(HyperLoRAConfig, overrides=args.overrides)
    student, hyper = build_meta(config)
    print(render(config, student, hyper))


if __name__ == "__main__":
    main()
