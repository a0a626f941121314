"""Evaluation arms on the held-out trajectories: what the generated LoRA gains, and how much of
that gain is per-prompt.

``[torchrun --nproc_per_node N] python -m hyperdistill.trainer.eval --config C --checkpoint DIR
[--static-checkpoint DIR]``

Arms, one student forward each per held-out example:

- ``none``: the student alone;
- ``generated``: the LoRA the hypernetwork generates from the example's own prompt;
- ``prompt_swap``: the hypernetwork's LoRA generated from another held-out example's prompt
  (`swap_partners`, a fixed derangement): the gap to ``generated`` is what reading this very
  prompt is worth;
- ``static``: the adapter of a static-LoRA run (one LoRA for every prompt), when one is given
  (``eval.static_checkpoint`` or ``--static-checkpoint``).

Metrics per arm over the assistant tokens: ``kl``, the top-K KL per token (the training loss's
mode and temperature, `loss.topk_kl_per_position`); ``top1_agreement``, the share of tokens where
the student's argmax is the teacher's top-1 id; ``teacher_nll``, the student's -log q of the
teacher's top-1 token (untempered); ``kl_by_position``, the mean KL by position of the target
token (``eval.position_buckets``); ``gap_closed`` = 1 - kl / kl of ``none``. Sums are all-reduced
across ranks; logits are computed in chunks of ``optim.logits_chunk_positions`` positions.

Outputs (`publish`): ``<out>/step-000120.json`` per evaluation, ``<out>/eval.md`` (the latest
table, arms as rows), ``<out>/eval.png`` (KL per arm over the steps evaluated so far, and by
position at the latest), the gauges ``trainer_eval_{kl,top1_agreement,teacher_nll,gap_closed}``
labelled by arm. The trainer evaluates into ``<run_dir>/eval`` at the start of a fresh run, every
``eval.every_steps`` and at the end, and also logs each evaluation to ``log.jsonl`` and wandb.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hyperdistill.common.codec import TopK
from hyperdistill.common.config import config_from_dict, load_config
from hyperdistill.common.log import setup_logging
from hyperdistill.common.tokenizer import load_tokenizer, tokenizer_fingerprint
from hyperdistill.trainer import metrics
from hyperdistill.trainer.checkpoint import checkpoint_path, load_weights, read_train_state
from hyperdistill.trainer.config import OptimConfig, TrainerConfig
from hyperdistill.trainer.data.phase import PhaseData, load_phase_data
from hyperdistill.trainer.data.sampler import Batch, batch_sequences, collate, teacher_tensors
from hyperdistill.trainer.distributed import all_reduce_sum, close_distributed, init_distributed
from hyperdistill.trainer.hypernetwork import HyperLoRAConfig, build_hyper_lora
from hyperdistill.trainer.lora import GeneratedLoRA, hyper_lora
from hyperdistill.trainer.loss import topk_kl_per_position
from hyperdistill.trainer.model import build_models, shard_adapter
from hyperdistill.trainer.teacher_client import CachedTeacher, TeacherClient, connect_teacher

logger = logging.getLogger(__name__)

ARMS = ("none", "generated", "prompt_swap", "static")
_SUMS = 3  # per arm: KL, top-1 agreements, teacher NLL; then KL and token count per position bucket


@dataclass
class HeldOut:
    """One held-out micro-batch and what the arms need besides the teacher's answer."""

    batch: Batch
    weight: float
    """1, or 0 for a repeat that only keeps the ranks' collective forwards in step."""
    swap: Batch
    """The batch whose prompts (row for row) the ``prompt_swap`` arm reads instead of ``batch``'s."""


@dataclass
class ArmMetrics:
    kl: float
    """Top-K KL per assistant token (nats)."""
    top1_agreement: float
    """Share of assistant tokens where the student's argmax is the teacher's top-1 id."""
    teacher_nll: float
    """Mean -log q(teacher's top-1 token) (nats)."""
    gap_closed: float | None
    """1 - kl / kl of the ``none`` arm (None when that is 0)."""
    kl_by_position: dict[str, float | None]
    """Position bucket (``0-512``, ..., ``32768+``) -> mean KL of its tokens (None: no token there)."""


@dataclass
class EvalReport:
    examples: int
    """Held-out examples evaluated (all ranks)."""
    tokens: int
    """Assistant tokens scored per arm."""
    tokens_by_position: dict[str, int]
    """Assistant tokens per position bucket."""
    arms: dict[str, ArmMetrics]
    """By arm, in `ARMS` order."""

    def record(self) -> dict:
        """Plain data for log.jsonl and the JSON file; ``held_out_kl`` is the generated arm's KL."""
        return {"held_out_kl": self.arms["generated"].kl, **dataclasses.asdict(self)}

    def scalars(self) -> dict[str, float]:
        """Flat numbers for wandb: ``held_out_kl``, ``eval/<arm>/<metric>``, ``eval/<arm>/kl_by_position/<bucket>``."""
        flat = {"held_out_kl": self.arms["generated"].kl}
        for arm, m in self.arms.items():
            values = {
                "kl": m.kl,
                "top1_agreement": m.top1_agreement,
                "teacher_nll": m.teacher_nll,
                "gap_closed": m.gap_closed,
                **{f"kl_by_position/{b}": v for b, v in m.kl_by_position.items()},
            }
            flat.update({f"eval/{arm}/{name}": v for name, v in values.items() if v is not None})
        return flat


# ---- the held-out examples and the prompt swap ---------------------------------------------------
def swap_partners(count: int, seed: int) -> list[int]:
    """A derangement of range(count) (count >= 2): example i reads example partners[i]'s prompt.

    One cycle through a seeded random order: the same on every rank and at every evaluation of a
    run, never i itself, and not merely a neighbour in the dataset's order (neighbours may share
    an issue, hence a prompt).
    """
    if count < 2:
        raise ValueError(f"the prompt swap needs at least 2 held-out examples, got {count}")
    order = np.random.default_rng(seed).permutation(count)
    partners = np.empty(count, dtype=np.int64)
    partners[order] = np.roll(order, -1)
    return partners.tolist()


def held_out_items(data: PhaseData, seed: int) -> Iterator[HeldOut]:
    """This rank's held-out batches (``PhaseData.held_out_batches``), each with its swap partner,
    precomputed over the whole held-out set by `swap_partners` (so one-row batches work)."""
    partners = swap_partners(len(data.held_out), seed)
    for batch, weight, index in data.held_out_batches():
        yield HeldOut(batch, weight, collate([data.held_out[partners[index]]], data.pad_id))


# ---- the arms ------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_arms(
    student: nn.Module,
    adapters: Mapping[str, nn.Module],
    items: Iterable[tuple[HeldOut, Sequence[TopK]]],
    *,
    optim: OptimConfig,
    edges: Sequence[int],
    device: torch.device,
) -> EvalReport:
    """Every arm over ``items`` = (held-out batch, the teacher's ``TopK`` per row); collective.

    adapters: ``generated`` (the hypernetwork, also read by the ``prompt_swap`` arm) and optionally
    ``static``, each a module ``(prompt_ids [B, P], prompt_mask [B, P]) -> GeneratedLoRA``.
    edges: left edges of the position buckets, starting at 0. Every rank must pass the same
    number of items (FSDP forwards are collective).
    """
    arms = [arm for arm in ARMS if arm != "static" or "static" in adapters]
    bounds = torch.tensor(edges[1:], device=device)
    sums = {arm: torch.zeros(_SUMS + 2 * len(edges), dtype=torch.float64, device=device) for arm in arms}
    examples = 0.0
    for item, topk in items:
        ids, logprobs, mask = teacher_tensors(item.batch, topk, device)
        for arm in arms:
            lora = _arm_lora(arm, adapters, item, device)
            sums[arm] += item.weight * _score(student, lora, item.batch, ids, logprobs, mask, optim, bounds)
        examples += item.weight * item.batch.input_ids.shape[0]
    totals = all_reduce_sum([examples, *torch.cat([sums[arm] for arm in arms])], device)
    width = _SUMS + 2 * len(edges)
    per_arm = {arm: totals[1 + i * width : 1 + (i + 1) * width] for i, arm in enumerate(arms)}
    return _report(int(totals[0]), per_arm, bucket_labels(edges))


def _arm_lora(arm: str, adapters: Mapping[str, nn.Module], item: HeldOut, device: torch.device) -> GeneratedLoRA | None:
    if arm == "none":
        return None
    prompts = item.swap if arm == "prompt_swap" else item.batch
    adapter = adapters["static" if arm == "static" else "generated"]
    return adapter(prompts.prompt_ids.to(device), prompts.prompt_mask.to(device))


def _score(
    student: nn.Module,
    lora: GeneratedLoRA | None,
    batch: Batch,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    optim: OptimConfig,
    bounds: torch.Tensor,
) -> torch.Tensor:
    """One batch, one arm: float64 [3 + 2 * buckets] = summed KL, top-1 agreements, teacher NLL,
    then the summed KL and the token count of each position bucket.

    teacher_ids: int64 [B, T-1, K]; teacher_logprobs: float32 [B, T-1, K]; mask: bool [B, T-1];
    bounds: the buckets' inner edges [buckets - 1].
    """
    input_ids = batch.input_ids.to(mask.device)
    active = hyper_lora(student, lora, seq_len=input_ids.shape[1]) if lora is not None else contextlib.nullcontext()
    with active:
        hidden = student.model(
            input_ids=input_ids, attention_mask=batch.attention_mask.to(mask.device), use_cache=False
        ).last_hidden_state
    h, ids, logprobs = hidden[:, :-1][mask], teacher_ids[mask], teacher_logprobs[mask]  # [M, H], [M, K], [M, K]
    head, chunk = student.get_output_embeddings(), optim.logits_chunk_positions
    kl = topk_kl_per_position(
        h, head, ids, logprobs, temperature=optim.temperature, mode=optim.loss, chunk_size=chunk
    ).double()
    top1 = ids.gather(1, logprobs.argmax(1, keepdim=True))[:, 0]
    agree, nll = _top1_stats(h, head.weight, top1, chunk)
    # Position t scores token t + 1: the target's position in its sequence.
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device).expand_as(mask)[mask]
    bucket = torch.bucketize(positions, bounds, right=True)
    by_kl = torch.zeros(len(bounds) + 1, dtype=torch.float64, device=mask.device).index_add_(0, bucket, kl)
    by_count = torch.bincount(bucket, minlength=len(bounds) + 1).double()
    return torch.cat([torch.stack([kl.sum(), agree.sum(), nll.sum()]), by_kl, by_count])


def _top1_stats(
    h: torch.Tensor, weight: torch.Tensor, top1: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """h [M, H], the LM head's weight [V, H], the teacher's top-1 ids int64 [M] -> per position,
    float64 [M]: 1 where the student's argmax is top-1, and -log q(top-1). ``[chunk, V]`` at a time."""
    agree, nll = [], []
    for part, ids in zip(h.split(chunk_size), top1.split(chunk_size), strict=True):
        logits = (part @ weight.T).float()  # as the loss computes them
        nll.append((torch.logsumexp(logits, 1) - logits.gather(1, ids[:, None])[:, 0]).double())
        agree.append((logits.argmax(1) == ids).double())
    return torch.cat(agree), torch.cat(nll)


def bucket_labels(edges: Sequence[int]) -> list[str]:
    """``[0, 512, 2048]`` -> ``["0-512", "512-2048", "2048+"]``."""
    return [f"{a}-{b}" for a, b in pairwise(edges)] + [f"{edges[-1]}+"]


def _report(examples: int, per_arm: dict[str, list[float]], labels: list[str]) -> EvalReport:
    """Means from the all-reduced sums of `_score`."""
    counts = per_arm["none"][_SUMS + len(labels) :]
    tokens = sum(counts)
    kl_none = per_arm["none"][0] / max(tokens, 1.0)
    arms = {}
    for arm, sums in per_arm.items():
        kl, top1, nll = (value / max(tokens, 1.0) for value in sums[:_SUMS])
        by_position = {label: sums[_SUMS + i] / counts[i] if counts[i] else None for i, label in enumerate(labels)}
        arms[arm] = ArmMetrics(
            kl=kl,
            top1_agreement=top1,
            teacher_nll=nll,
            gap_closed=1 - kl / kl_none if kl_none > 0 else None,
            kl_by_position=by_position,
        )
    return EvalReport(examples, int(tokens), {label: int(c) for label, c in zip(labels, counts, strict=True)}, arms)


def evaluate_held_out(
    config: TrainerConfig,
    data: PhaseData,
    student: nn.Module,
    adapters: Mapping[str, nn.Module],
    teacher: TeacherClient | CachedTeacher,
    device: torch.device,
) -> EvalReport:
    """Every arm over ``data``'s held-out examples, their top-K prefetched from ``teacher``; collective."""
    stream = teacher.prefetch(held_out_items(data, config.seed), lambda item: batch_sequences(item.batch))
    return evaluate_arms(
        student,
        adapters,
        ((item, topk) for item, topk, _ in stream),
        optim=config.optim,
        edges=config.eval.position_buckets,
        device=device,
    )


# ---- adapters from checkpoints -------------------------------------------------------------------
def eval_adapters(
    config: TrainerConfig, student: nn.Module, hyper: nn.Module, device: torch.device
) -> dict[str, nn.Module]:
    """The arms' adapters: the run's hypernetwork, and the static run's of ``eval.static_checkpoint``."""
    adapters = {"generated": hyper}
    if config.eval.static_checkpoint:
        path = checkpoint_path(config.eval.static_checkpoint)
        adapters["static"] = load_adapter(path, stored_hypernetwork(path, config), student, device)
    return adapters


def stored_hypernetwork(path: Path, config: TrainerConfig) -> HyperLoRAConfig:
    """The ``hypernetwork`` config stored in checkpoint ``path``; its LoRA targets must be
    ``config``'s (every arm adapts the same wrapped modules of the one student)."""
    raw = json.loads((path / "config.json").read_text())["hypernetwork"]
    stored = config_from_dict(type(config.hypernetwork), raw, prefix="hypernetwork.")
    if sorted(stored.targets) != sorted(config.hypernetwork.targets):
        raise ValueError(
            f"checkpoint {path} adapts hypernetwork.targets {stored.targets}, this run "
            f"{config.hypernetwork.targets}: the arms must adapt the same modules"
        )
    return stored


def load_adapter(path: Path, hyper_config: HyperLoRAConfig, student: nn.Module, device: torch.device) -> nn.Module:
    """Build the adapter ``hyper_config`` describes on ``student`` (whose targets are already
    wrapped: wrapping again is a no-op), shard it and load its weights from checkpoint ``path``."""
    with torch.random.fork_rng(devices=[]):  # the run's own random stream stays as it was
        adapter = build_hyper_lora(hyper_config, student)
    adapter = shard_adapter(adapter, device)
    load_weights(path, adapter)
    return adapter


# ---- outputs -------------------------------------------------------------------------------------
def publish(report: EvalReport, step: int, out_dir: Path, rank: int) -> None:
    """The gauges on every rank; on rank 0 ``step-<N>.json``, ``eval.md`` and ``eval.png`` in ``out_dir``."""
    for arm, values in report.arms.items():
        metrics.EVAL_KL.labels(rank=rank, arm=arm).set(values.kl)
        metrics.EVAL_TOP1_AGREEMENT.labels(rank=rank, arm=arm).set(values.top1_agreement)
        metrics.EVAL_TEACHER_NLL.labels(rank=rank, arm=arm).set(values.teacher_nll)
        if values.gap_closed is not None:
            metrics.EVAL_GAP_CLOSED.labels(rank=rank, arm=arm).set(values.gap_closed)
    if rank != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"step-{step:06d}.json").write_text(json.dumps({"step": step, **report.record()}, indent=2))
    (out_dir / "eval.md").write_text(markdown_table(report, step))
    plot(out_dir)


def markdown_table(report: EvalReport, step: int) -> str:
    """Arms as rows: KL, gap closed, top-1 agreement, teacher NLL and KL of each non-empty position bucket."""
    buckets = [label for label, count in report.tokens_by_position.items() if count]
    lines = [
        f"# Held-out evaluation at step {step}",
        "",
        f"{report.examples} examples, {report.tokens} assistant tokens. KL: top-K KL per assistant token (nats); "
        "gap closed: 1 - KL / KL(none); NLL: -log q(teacher's top-1 token).",
        "",
        "| arm | KL | gap closed | top-1 agreement | teacher NLL | " + " | ".join(f"KL @ {b}" for b in buckets) + " |",
        "|---|" + "---:|" * (4 + len(buckets)),
    ]
    for arm, m in report.arms.items():
        cells = [
            f"{m.kl:.4f}",
            _fmt(m.gap_closed, "{:.1%}"),
            f"{m.top1_agreement:.1%}",
            f"{m.teacher_nll:.4f}",
            *(_fmt(m.kl_by_position[b], "{:.4f}") for b in buckets),
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def plot(out_dir: Path) -> Path:
    """``eval.png``: KL per arm over every ``step-*.json`` in ``out_dir``, and KL by position at the latest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = sorted((json.loads(p.read_text()) for p in out_dir.glob("step-*.json")), key=lambda r: r["step"])
    latest = records[-1]
    fig, (over_steps, by_position) = plt.subplots(1, 2, figsize=(12, 4))
    for arm in latest["arms"]:
        points = [(r["step"], r["arms"][arm]["kl"]) for r in records if arm in r["arms"]]
        over_steps.plot(*zip(*points, strict=True), marker=".", label=arm)
        buckets = [(label, kl) for label, kl in latest["arms"][arm]["kl_by_position"].items() if kl is not None]
        by_position.plot(*zip(*buckets, strict=True), marker="o", label=arm)
    over_steps.set(xlabel="optimizer step", ylabel="held-out top-K KL per assistant token (nats)", title="KL by arm")
    by_position.set(
        xlabel="position of the target token", ylabel="KL (nats)", title=f"KL by position at step {latest['step']}"
    )
    for ax in (over_steps, by_position):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out_dir / "eval.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- the command line ----------------------------------------------------------------------------
def prepare(config: TrainerConfig, checkpoint: str, static: str | None) -> tuple[TrainerConfig, Path, dict]:
    """Check the arguments before anything is loaded: the config (with the hypernetwork stored in
    the checkpoint and the static checkpoint resolved), the checkpoint's path and its train state."""
    if not config.eval.held_out:
        raise ValueError("eval.held_out is 0: there are no held-out examples to evaluate; set it to the run's value")
    path = checkpoint_path(checkpoint)
    config = dataclasses.replace(config, hypernetwork=stored_hypernetwork(path, config))
    if static:
        static = checkpoint_path(static)
        stored_hypernetwork(static, config)
    static_eval = dataclasses.replace(config.eval, static_checkpoint=str(static) if static else None)
    config = dataclasses.replace(config, eval=static_eval)
    state = read_train_state(path)
    if state["phase_index"] >= len(config.phases):
        raise ValueError(f"checkpoint {path} is in phase {state['phase_index']}, the config has {len(config.phases)}")
    return config, path, state


def evaluate_checkpoint(config: TrainerConfig, path: Path, state: dict, out_dir: Path) -> str | None:
    """Evaluate checkpoint ``path`` (of `prepare`) with the trainer's own set-up, on the held-out set
    of the phase it was in; collective. Rank 0 gets the markdown table."""
    dist = init_distributed()
    try:
        tokenizer = load_tokenizer(config.student.path, config.student.chat_template)
        student, hyper = build_models(config, dist, tokenizer)
        load_weights(path, hyper)
        adapters = eval_adapters(config, student, hyper, dist.device)
        data = load_phase_data(config, config.phases[state["phase_index"]], tokenizer, dist)
        with connect_teacher(config.teacher) as teacher:
            teacher.start(student.config.vocab_size, tokenizer_fingerprint(tokenizer))
            report = evaluate_held_out(config, data, student, adapters, teacher, dist.device)
        publish(report, state["step"], out_dir, dist.rank)
        return markdown_table(report, state["step"]) if dist.rank == 0 else None
    finally:
        close_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Evaluate a checkpoint on the held-out examples: no LoRA, "
        "generated LoRA, prompt-swapped LoRA and a static LoRA."
    )
    parser.add_argument("--config", required=True, help="the run's YAML config (student, data, teacher, eval)")
    parser.add_argument(
        "--checkpoint", required=True, help="a step_* checkpoint directory, or a directory of them (the latest is used)"
    )
    parser.add_argument(
        "--static-checkpoint",
        default=None,
        help="a static-LoRA run's checkpoint for the static arm (default: eval.static_checkpoint)",
    )
    parser.add_argument("--out", default=None, help="output directory (default: <run_dir>/eval)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. teacher.addresses=[host:50051]")
    args = parser.parse_args()
    config = load_config(TrainerConfig, args.config, args.overrides)
    setup_logging(config.log_level)
    try:
        config, path, state = prepare(config, args.checkpoint, args.static_checkpoint or config.eval.static_checkpoint)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    out_dir = Path(args.out or Path(config.run_dir) / "eval")
    table = evaluate_checkpoint(config, path, state, out_dir)
    if table is not None:
        print(table)
        print(f"written to {out_dir}")


if __name__ == "__main__":
    main()
