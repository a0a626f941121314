"""P5: peak memory and time of the product's chunked top-K KL (``trainer.loss.topk_kl_loss``: one
[C, V] buffer per chunk, gradient computed in the forward) vs a naive one, and vs the product's
previous version (``checkpointed``: the same chunks under activation checkpointing), the "before"
of the P5 fix.

The naive version is the textbook code: full ``[T, V]`` float32 logits, ``log_softmax`` over the
vocabulary, gather at the teacher's ids, tails as ``log(1 - sum p)``, no chunking and no
recomputation. Both run forward + backward into ``hidden`` (the LM head is frozen, as in the
trainer) on the same inputs, one child process per variant, so ``ru_maxrss`` is that variant's
own high-water mark; the peak is reported above the RSS just before the first call (inputs
and LM head already allocated).

The naive run is sized to the memory free at the time (``naive_positions_that_fit``; ~12 B per
[T, V] element, 15 GiB at T=8k): on a shared machine it may run at T/2 and its peak and time
are then scaled linearly to T (both are linear in T: three [T, V] buffers, per-row work).
The chunked loss's peak is that of one chunk, so chunk 512 runs at T = 2,048 only.

Child: ``python -m tests.bench.bench_loss --variant chunked|checkpointed|naive --positions T --result out.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tests.bench.bench_common import TOP_K, current_rss_bytes, peak_rss_bytes, run_child, summarize, write_result

VOCAB = 151_936
HIDDEN = 128
# `optim.logits_chunk_positions`: the trainer's default, and deploy/configs/trainer.cpu.yaml's.
CHUNKS = (1024, 512)
# Bytes the naive variant holds at its peak per [T, V] element: float32 log-probs saved for
# backward, their gradient and the logits' gradient (measured here: 12.1 B).
NAIVE_BYTES_PER_ELEMENT = 12.5
# Left free for everything else on the machine when sizing the naive run.
HEADROOM_BYTES = 3 * 2**30


def inputs(positions: int, seed: int = 0):
    """hidden float32 [1, T, H] (requires grad), LM-head weight [V, H], teacher top-K: distinct ids
    int64 [1, T, K] and sorted log-probs [1, T, K] holding 90% of the mass; mask all-True [1, T]."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, positions, HIDDEN, generator=gen).requires_grad_(True)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen) * HIDDEN**-0.5
    base = torch.randint(0, VOCAB, (1, positions, 1), generator=gen)
    ids = (base + 7919 * torch.arange(TOP_K)) % VOCAB  # distinct: 7919 * K < V
    top = torch.sort(2 * torch.randn(1, positions, TOP_K, generator=gen), dim=-1, descending=True).values
    logprobs = torch.log_softmax(top, dim=-1) + torch.log(torch.tensor(0.9))
    return hidden, weight, ids, logprobs, torch.ones(1, positions, dtype=torch.bool)


def naive_topk_kl(hidden, weight, teacher_ids, teacher_logprobs, mask, num_tokens):
    """Tail-mode top-K KL on the whole [T, V] at once (same math as ``topk_kl_loss(mode="tail")``)."""
    rows = mask.reshape(-1)
    h = hidden.reshape(-1, hidden.shape[-1])[rows]
    ids = teacher_ids.reshape(-1, teacher_ids.shape[-1])[rows]
    teacher_top = teacher_logprobs.reshape(-1, teacher_logprobs.shape[-1])[rows].float()
    student = F.log_softmax(h @ weight.T, dim=-1)  # [T, V]
    student_top = student.gather(1, ids)
    tiny = torch.finfo(torch.float32).tiny
    teacher_tail = torch.log((1 - teacher_top.exp().sum(1, keepdim=True)).clamp_min(tiny))
    student_tail = torch.log((1 - student_top.exp().sum(1, keepdim=True)).clamp_min(tiny))
    teacher = torch.cat([teacher_top, teacher_tail], dim=1)
    student = torch.cat([student_top, student_tail], dim=1)
    return (teacher.exp() * (teacher - student)).sum() / num_tokens


def checkpointed_topk_kl(hidden, weight, teacher_ids, teacher_logprobs, mask, num_tokens, chunk: int):
    """The product's loss before P5 (commit 7dd378c): the same chunks, each under non-reentrant
    activation checkpointing, so backward recomputes the chunk's [C, V] logits and autograd holds
    several [C, V] buffers (logits, log-softmax, scatter, their gradients) at once."""
    from hyperdistill.trainer.loss import _LOG_TINY, _teacher_tail

    def chunk_kl(h, ids, lp):
        logits = (h @ weight.T).float()
        picked = logits.gather(1, ids)
        logz = torch.logsumexp(logits, dim=1, keepdim=True)
        rest = logits.scatter(1, ids, torch.finfo(logits.dtype).min)
        student_tail = (torch.logsumexp(rest, dim=1, keepdim=True) - logz).clamp_min(_LOG_TINY)
        teacher = torch.log_softmax(torch.cat([lp, _teacher_tail(lp)], dim=1), dim=1)
        student = torch.log_softmax(torch.cat([picked - logz, student_tail], dim=1), dim=1)
        return (teacher.exp() * (teacher - student)).sum(1).clamp_min(0).sum()

    rows = mask.reshape(-1)
    h = hidden.reshape(-1, hidden.shape[-1])[rows]
    ids = teacher_ids.reshape(-1, teacher_ids.shape[-1])[rows].long()
    lp = teacher_logprobs.reshape(-1, teacher_logprobs.shape[-1])[rows].float().clamp_min(_LOG_TINY)
    total = h[:0].float().sum()
    for start in range(0, h.shape[0], chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(chunk_kl, h[part], ids[part], lp[part], use_reentrant=False)
    return total / num_tokens


def measure(variant: str, positions: int, repeats: int, chunk: int) -> dict:
    from hyperdistill.trainer.loss import topk_kl_loss

    hidden, weight, ids, logprobs, mask = inputs(positions)
    base = current_rss_bytes()
    seconds, cpu_seconds, value = [], [], None
    for _ in range(repeats):
        hidden.grad = None
        start, cpu_start = time.perf_counter(), time.process_time()
        if variant == "chunked":
            loss = topk_kl_loss(hidden, weight, ids, logprobs, mask, positions, chunk_size=chunk)
        elif variant == "checkpointed":
            loss = checkpointed_topk_kl(hidden, weight, ids, logprobs, mask, positions, chunk)
        else:
            loss = naive_topk_kl(hidden, weight, ids, logprobs, mask, positions)
        loss.backward()
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
        value = float(loss.detach())
    return {
        "variant": variant,
        "positions": positions,
        "vocab": VOCAB,
        "hidden": HIDDEN,
        "top_k": TOP_K,
        "chunk": chunk if variant != "naive" else None,
        "seconds": summarize(seconds),
        "cpu_seconds": summarize(cpu_seconds),
        "peak_bytes_above_inputs": peak_rss_bytes() - base,
        "rss_inputs_bytes": base,
        "loss": value,
        "grad_checksum": float(hidden.grad.double().abs().sum()),
        "threads": torch.get_num_threads(),
    }


def naive_positions_that_fit(positions: int) -> int:
    """``positions``, halved until the naive variant's estimated peak leaves HEADROOM_BYTES free."""
    available = psutil.virtual_memory().available - HEADROOM_BYTES
    while positions > 512 and positions * VOCAB * NAIVE_BYTES_PER_ELEMENT > available:
        positions //= 2
    return positions


def run(out: Path, positions: int, repeats: int) -> dict:
    """P5: the product's loss at its default chunk, its previous version, the naive loss (sized to free
    memory), and the demo's chunk of 512 at T = 4 chunks (its peak does not depend on T)."""
    variants = {
        f"chunked_{CHUNKS[0]}": ("chunked", positions, CHUNKS[0]),
        f"checkpointed_{CHUNKS[0]}": ("checkpointed", positions, CHUNKS[0]),
        "naive": ("naive", naive_positions_that_fit(positions), 0),
        f"chunked_{CHUNKS[1]}": ("chunked", min(positions, 4 * CHUNKS[1]), CHUNKS[1]),
    }
    results = {}
    for name, (variant, t, chunk) in variants.items():
        results[name] = run_child(
            "bench_loss",
            ["--variant", variant, "--positions", str(t), "--repeats", str(repeats), "--chunk", str(chunk)],
            out / f"p5_{name}.json",
            timeout=1800,
            log_path=out / f"p5_{name}.log",
        )
    return summarize_p5(results, positions)


def summarize_p5(results: dict, positions: int) -> dict:
    """Ratios to the naive loss; the naive peak and every time are scaled linearly to T."""
    naive, chunked = results["naive"], results[f"chunked_{CHUNKS[0]}"]
    naive_peak = naive["peak_bytes_above_inputs"] * positions / naive["positions"]
    naive_per_position = naive["seconds"]["median"] / naive["positions"]
    summary = {
        "positions": positions,
        "vocab": VOCAB,
        "hidden": HIDDEN,
        "top_k": TOP_K,
        "naive_positions_measured": naive["positions"],
        "naive_peak_bytes_at_T": naive_peak,
        "variants": results,
    }
    for name, run_v in results.items():
        if name != "naive":
            summary[f"naive_vs_{name}_memory"] = naive_peak / run_v["peak_bytes_above_inputs"]
            summary[f"naive_vs_{name}_time"] = naive_per_position / (run_v["seconds"]["median"] / run_v["positions"])
    before = results[f"checkpointed_{CHUNKS[0]}"]
    summary["checkpointed_loss_rel_diff"] = abs(before["loss"] / chunked["loss"] - 1)
    summary["checkpointed_grad_checksum_rel_diff"] = abs(before["grad_checksum"] / chunked["grad_checksum"] - 1)
    if naive["positions"] == positions:
        summary["naive_loss_rel_diff"] = abs(naive["loss"] / chunked["loss"] - 1)
        summary["naive_grad_checksum_rel_diff"] = abs(naive["grad_checksum"] / chunked["grad_checksum"] - 1)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description="P5 child: one loss variant's time and peak memory.")
    parser.add_argument("--variant", choices=("chunked", "checkpointed", "naive"), required=True, help="which loss")
    parser.add_argument("--positions", type=int, default=8192, help="T: scored positions")
    parser.add_argument("--repeats", type=int, default=3, help="forward+backward repetitions")
    parser.add_argument("--chunk", type=int, default=CHUNKS[0], help="chunk_size of the chunked loss")
    parser.add_argument("--result", required=True, help="JSON result file")
    args = parser.parse_args()
    write_result(args.result, measure(args.variant, args.positions, args.repeats, args.chunk))


if __name__ == "__main__":
    main()
