"""P7a: bytes per position of each teacher-cache encoding and its effect on the loss.

The demo teacher (the tiny student plus a merged LoRA) scores the demo's prepared trajectories in
float32 with transformers; its top-K (K = 20) is stored in each encoding of
``trainer.teacher_cache`` and decoded, and the trainer's own ``topk_kl_loss`` (tail mode, the
default) is computed against the tiny student's hidden states with the float32 and the decoded
top-K. Reported per encoding: bytes per position, the relative error of the loss (the mean KL
over the positions) and of its gradient with respect to the hidden states (L2 norm of the
difference over the norm), and the largest per-position KL error.

Two teacher temperatures: the demo teacher as it is, and sharpened (logits x 3), closer to a
large code model, whose top-1 often holds > 90% of the mass (the tail bucket is then small and
most sensitive to errors in the top-K). The median top-1 probability of each is reported.

    .venv/bin/python -m tests.bench.bench_cache_encoding [--positions 16384] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from hyperdistill.common.codec import TopK
from hyperdistill.trainer.loss import topk_kl_loss, topk_kl_per_position
from hyperdistill.trainer.teacher_cache import ENCODINGS, bytes_per_position, decode, encode
from tests.bench.bench_common import TOP_K, _tiny, demo_sequences
from tests.devtools.tiny_models import ensure_demo_teacher

SHARPEN = (1.0, 3.0)


@torch.no_grad()
def _forward(model, sequences: list[np.ndarray]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per sequence: final hidden states [T - 1, H] and logits [T - 1, V] (float32)."""
    hidden, logits = [], []
    for ids in sequences:
        out = model(torch.from_numpy(ids.astype(np.int64))[None], output_hidden_states=True)
        hidden.append(out.hidden_states[-1][0, :-1].float())
        logits.append(out.logits[0, :-1].float())
    return hidden, logits


def _topk(logits: torch.Tensor, ids: np.ndarray) -> TopK:
    logprobs = torch.log_softmax(logits, dim=-1)
    values, indices = logprobs.topk(TOP_K, dim=-1)
    target = logprobs.gather(1, torch.from_numpy(ids[1:].astype(np.int64))[:, None])[:, 0]
    return TopK(indices.numpy().astype(np.int32), values.numpy(), target.numpy())


def _loss_and_grad(hidden: torch.Tensor, head: torch.Tensor, topk: TopK) -> tuple[float, torch.Tensor, torch.Tensor]:
    h = hidden.clone().requires_grad_(True)
    ids, lp = torch.from_numpy(topk.ids.astype(np.int64)), torch.from_numpy(topk.logprobs)
    mask = torch.ones(1, len(h), dtype=torch.bool)
    loss = topk_kl_loss(h[None], head, ids[None], lp[None], mask, len(h))
    loss.backward()
    return float(loss.detach()), h.grad, topk_kl_per_position(hidden, head, ids, lp)


def measure(positions: int) -> dict:
    torch.manual_seed(0)
    models = _tiny()
    student = AutoModelForCausalLM.from_pretrained(models.student, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(ensure_demo_teacher(), dtype=torch.float32).eval()
    sequences = demo_sequences(positions)
    hidden, _ = _forward(student, sequences)
    _, teacher_logits = _forward(teacher, sequences)
    hidden_all, head = torch.cat(hidden), student.get_output_embeddings().weight.detach().float()
    results = {"positions": positions, "top_k": TOP_K, "sharpen": {}}
    for sharpen in SHARPEN:
        exact = [_topk(lg * sharpen, ids) for lg, ids in zip(teacher_logits, sequences, strict=True)]
        exact_all = _cat(exact)
        loss, grad, per_pos = _loss_and_grad(hidden_all, head, exact_all)
        row = {"median_top1_prob": float(np.median(np.exp(exact_all.logprobs[:, 0]))), "kl_float32": loss}
        for encoding in ENCODINGS:
            decoded = _cat([decode(encode(t, encoding), t.num_positions, TOP_K, encoding) for t in exact])
            assert (decoded.ids == exact_all.ids).all()
            e_loss, e_grad, e_per_pos = _loss_and_grad(hidden_all, head, decoded)
            row[encoding] = {
                "bytes_per_position": bytes_per_position(encoding, TOP_K),
                "kl_rel_error": abs(e_loss - loss) / loss,
                "grad_rel_error": float((e_grad - grad).norm() / grad.norm()),
                "max_position_kl_abs_error": float((e_per_pos - per_pos).abs().max()),
            }
        results["sharpen"][str(sharpen)] = row
    return results


def _cat(parts: list[TopK]) -> TopK:
    return TopK(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "logprobs", "target")))


def table(results: dict) -> str:
    lines = [
        "| teacher | median top-1 p | encoding | B/position | KL rel. error | grad rel. error "
        "| max per-position KL error |",
        "|---|---|---|---|---|---|---|",
    ]
    for sharpen, row in results["sharpen"].items():
        for encoding in ENCODINGS:
            e = row[encoding]
            lines.append(
                f"| logits x {sharpen} (KL {row['kl_float32']:.4f}) | {row['median_top1_prob']:.3f} | {encoding} "
                f"| {e['bytes_per_position']} | {e['kl_rel_error']:.1e} | {e['grad_rel_error']:.1e} "
                f"| {e['max_position_kl_abs_error']:.1e} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=16384, help="teacher positions measured")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = measure(args.positions)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
