"""``make learn-bench``: does a per-prompt hypernetwork beat one static LoRA where the answer is known?

For each prompt variant (`task.VARIANTS`), the samples scored by their family's teacher through
the teacher service (`scored.load_scored`) train the arms through the trainer's own pieces
(`build_hyper_lora`, `distill_loss`, `build_optimizer`, `phase_lr`, and for ``kind: routed`` the
Trainer's `trainer.routing.RoutingSchedule`: bootstrap, clustering, router pre-training, switch,
re-routing rounds): ``hypernetwork.kind: routed`` and ``kind: static`` by default (``--kinds``;
``kind: hyper``, the gated hypernetwork, on request), same rank, data order, steps and schedule.
They are then evaluated on held-out paraphrases by the trainer's evaluation
(`trainer.eval.evaluate_arms`): no LoRA, the generated LoRA (of the first of routed, hyper
trained), the prompt swap (each sample gets the LoRA of another sample's prompt), the static
LoRA, the oracle (the family's true LoRA_c), and for the other hypernetwork kind its rows
``<kind>`` and ``<kind>_prompt_swap``. Writes ``<out>/<variant>.json`` (one object per arm with
``gap_closed`` = 1 - KL_arm / KL_none), ``<out>/report.md`` and prints it; the routed arm's
switch and re-routing records go to ``<out>/<variant>-routed/``.

    python -m tests.learn_bench.run [--steps N] [--kinds routed static hyper] [--out runs/learn-bench] [key=value ...]

Overrides are trainer config fields (``hypernetwork.*``, ``optim.*``) applied to every arm.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hyperdistill.common.codec import TopK
from hyperdistill.common.config import load_config
from hyperdistill.common.log import setup_logging
from hyperdistill.trainer.config import TrainerConfig
from hyperdistill.trainer.data.sampler import collate, teacher_tensors
from hyperdistill.trainer.eval import HeldOut, evaluate_arms, swap_partners
from hyperdistill.trainer.hypernetwork import KINDS, build_hyper_lora
from hyperdistill.trainer.lora import GeneratedLoRA, LoRAWeights
from hyperdistill.trainer.routing import RoutingSchedule, purity
from hyperdistill.trainer.train import build_optimizer, distill_loss, phase_lr
from tests.learn_bench import task
from tests.learn_bench.scored import ScoredSet, load_scored
from tests.learn_bench.teachers import load_student

log = logging.getLogger(__name__)

CONFIG = Path(__file__).with_name("learn_bench.yaml")
PAD_ID = 151643
EVAL_BATCH = 16


def train_arm(
    cfg: TrainerConfig, student: nn.Module, data: ScoredSet, steps: int, batch_size: int, seed: int, run_dir: Path
) -> tuple[nn.Module, list[float]]:
    """Train one adapter (``cfg.hypernetwork.kind``) on `data.train`; returns it and the loss curve.

    ``kind: routed`` runs the Trainer's own schedule (`trainer.routing.RoutingSchedule`, its
    records under ``run_dir``): the bootstrap with the probe for ``route_after_steps`` steps, the
    switch (then a fresh optimizer) and the re-warm, the re-routing window and the re-routing;
    the schedule is kept as the adapter's ``schedule`` (read by `diagnose`)."""
    torch.manual_seed(seed)
    hp = cfg.hypernetwork
    adapter = build_hyper_lora(hp, student)
    phase = cfg.phases[0]
    optimizer = build_optimizer(adapter, cfg.optim, phase.lr)
    order = random.Random(seed).sample(range(len(data.train)), len(data.train))
    schedule = None
    if hp.kind == "routed":
        schedule = RoutingSchedule(adapter, seed, run_dir, student=student, optim=cfg.optim, device=torch.device("cpu"))
        adapter.schedule = schedule
    losses = []
    for step in range(steps):
        if schedule is not None and schedule.before_step(step):
            optimizer = build_optimizer(adapter, cfg.optim, phase.lr)
        rows = [data.train[order[(step * batch_size + i) % len(order)]] for i in range(batch_size)]
        batch = collate(rows, PAD_ID)
        ids, logprobs, mask = teacher_tensors(batch, [_topk(r) for r in rows], torch.device("cpu"))
        loss, _ = distill_loss(
            student, adapter, batch, ids, logprobs, mask, float(mask.sum()), cfg.optim, torch.device("cpu")
        )
        loss.backward()
        if schedule is not None:
            schedule.after_backward(batch, ids, logprobs, mask)
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), cfg.optim.grad_clip)
        lr = phase_lr(phase, step, steps) * (schedule.lr_factor(step) if schedule is not None else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0:
            log.info("%s step %d/%d: loss %.4f", cfg.hypernetwork.kind, step + 1, steps, np.mean(losses[-50:]))
    return adapter.eval(), losses


class Oracle(nn.Module):
    """The true LoRA_c of each prompt's family (found by the prompt's tokens)."""

    def __init__(self, data: ScoredSet):
        super().__init__()
        self.family = {tuple(e["prompt_ids"].tolist()): e["family"] for e in data.train + data.eval}
        self.loras = data.family_loras

    def forward(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> GeneratedLoRA:
        factors = [
            self.loras[self.family[tuple(ids[mask].tolist())]]
            for ids, mask in zip(prompt_ids, prompt_mask, strict=True)
        ]
        weights = {
            name: LoRAWeights(
                torch.stack([f[name][0] for f in factors]),
                torch.stack([f[name][1] for f in factors]),
                name.rsplit(".", 2)[-2],
            )
            for name in factors[0]
        }
        return GeneratedLoRA(weights, 1.0)


def evaluate(
    cfg: TrainerConfig, student: nn.Module, data: ScoredSet, adapters: dict[str, nn.Module], oracle: bool = True
) -> dict:
    """Every arm on the held-out samples: {arm: metrics} with ``gap_closed`` (and the oracle's)."""
    partners = swap_partners(len(data.eval), cfg.seed)
    items = []
    for start in range(0, len(data.eval), EVAL_BATCH):
        rows = data.eval[start : start + EVAL_BATCH]
        swap = collate([data.eval[partners[start + i]] for i in range(len(rows))], PAD_ID)
        items.append((HeldOut(collate(rows, PAD_ID), 1.0, swap), [_topk(r) for r in rows]))

    def run(found: dict[str, nn.Module]) -> dict:
        return evaluate_arms(student, found, items, optim=cfg.optim, edges=[0], device=torch.device("cpu")).arms

    arms = {name: asdict(m) for name, m in run(adapters).items()}
    if oracle:
        arms["oracle"] = asdict(run({"generated": Oracle(data)})["generated"])
    for m in arms.values():
        m.pop("kl_by_position", None)
    return arms


@torch.no_grad()
def diagnose(adapter: nn.Module, data: ScoredSet) -> dict:
    """Why the hypernetwork does (not) separate the families, on the held-out prompts:
    ``context_family_share``: share of the prompt encoder's output variance that lies between the
    families' means (1: the context is the family; ~0: it ignores it); ``delta_alignment``: per
    family, the cosine between the generated update's deviation from the all-family mean and the
    true LoRA_c's, averaged over families and targets (1: it learned what sets the families apart)."""
    batch = collate(data.eval, PAD_ID)
    families = torch.tensor([e["family"] for e in data.eval])
    context = adapter.encoder(batch.prompt_ids, batch.prompt_mask)
    means = torch.stack([context[families == c].mean(0) for c in range(len(data.family_loras))])
    share = float(((means[families] - context.mean(0)) ** 2).sum() / ((context - context.mean(0)) ** 2).sum())
    lora = adapter(batch.prompt_ids, batch.prompt_mask)
    cosines = []
    for name, w in lora.weights.items():
        generated = torch.stack(
            [(w.B[families == c] @ w.A[families == c]).mean(0) * lora.scale for c in range(len(data.family_loras))]
        )
        true = torch.stack([f[name][1] @ f[name][0] for f in data.family_loras])
        g, t = generated - generated.mean(0), true - true.mean(0)
        cosines += torch.nn.functional.cosine_similarity(g.flatten(1), t.flatten(1)).tolist()
    out = {"context_family_share": round(share, 4), "delta_alignment": round(float(np.mean(cosines)), 4)}
    if getattr(adapter, "routed", False):  # kind routed: which expert each held-out prompt gets
        experts = adapter.experts(batch.prompt_ids, batch.prompt_mask).tolist()
        family = {tuple(e["prompt_ids"].tolist()): e["family"] for e in data.train}
        for event, name in (("routing", "bootstrap_cluster_purity"), ("relabel", "relabel_purity")):
            found = adapter.schedule.events.get(event)
            if found is not None:  # the purity of the labels the router was trained on
                groups = [family[tuple(p.tolist())] for p in found.prompts]
                out[name] = round(purity(groups, found.labels.tolist(), adapter.config.experts), 4)
        out["routing_purity"] = round(purity(families.tolist(), experts, adapter.config.experts), 4)
        out["experts_by_family"] = [
            torch.bincount(torch.tensor(experts)[families == c], minlength=adapter.config.experts).tolist()
            for c in range(len(data.family_loras))
        ]
    return out


def _topk(row: dict) -> TopK:
    return TopK(row["teacher_ids"], row["teacher_logprobs"], np.zeros(len(row["teacher_ids"]), np.float32))


def report(results: dict[str, dict], meta: dict) -> str:
    """Markdown: one table per variant, arms as rows."""
    lines = ["# learn-bench", "", f"{meta}", ""]
    for variant, arms in results.items():
        lines += [
            f"## {variant}",
            "",
            "| arm | KL (nats/token) | top-1 agreement | teacher NLL | gap closed |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {arm} | {m['kl']:.4f} | {m['top1_agreement']:.3f} | {m['teacher_nll']:.3f} | "
            f"{(m['gap_closed'] if m['gap_closed'] is not None else 0.0):.1%} |"
            for arm, m in arms.items()
        ]
        lines += ["", f"generated ({meta['generated']}) diagnostics: {arms['generated'].get('diagnostics')}"]
        for kind in ("routed", "hyper"):
            if kind in arms:
                lines += ["", f"{kind} diagnostics: {arms[kind].get('diagnostics')}"]
        lines += [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per arm (3.3 passes over --n-train)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per step")
    parser.add_argument("--n-train", type=int, default=1200, help="training samples per variant (scored once)")
    parser.add_argument("--n-eval", type=int, default=64, help="held-out samples per variant")
    parser.add_argument("--variants", nargs="+", default=list(task.VARIANTS), choices=task.VARIANTS)
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["routed", "static"],
        choices=KINDS,
        help="hypernetwork kinds to train; the generated / prompt_swap arms are the first of routed, hyper "
        "given, the other's rows are <kind> and <kind>_prompt_swap",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/learn-bench"))
    parser.add_argument("overrides", nargs="*", help="trainer config overrides (hypernetwork.*, optim.*)")
    args = parser.parse_args()
    hypernetworks = [kind for kind in ("routed", "hyper") if kind in args.kinds]
    if not hypernetworks:
        parser.error("--kinds needs routed or hyper (the generated arm)")
    setup_logging()
    torch.set_num_threads(2)
    started = time.monotonic()
    sets = load_scored(args.variants, n_train=args.n_train, n_eval=args.n_eval)
    scored_s = time.monotonic() - started
    results = {}
    for variant in args.variants:
        data, trained = sets[variant], {}
        for kind in dict.fromkeys(args.kinds):
            cfg = load_config(TrainerConfig, CONFIG, overrides=[*args.overrides, f"hypernetwork.kind={kind}"])
            student = load_student_for(cfg)
            run_dir = args.out / f"{variant}-{kind}"
            trained[kind], _ = train_arm(cfg, student, data, args.steps, args.batch_size, cfg.seed, run_dir)
        main_kind, *others = hypernetworks
        arms = {"generated": trained[main_kind]} | ({"static": trained["static"]} if "static" in trained else {})
        results[variant] = evaluate(cfg, student, data, arms)
        results[variant]["generated"]["diagnostics"] = diagnose(trained[main_kind], data)
        for kind in others:
            extra = evaluate(cfg, student, data, {"generated": trained[kind]}, oracle=False)
            results[variant][kind] = extra["generated"] | {"diagnostics": diagnose(trained[kind], data)}
            results[variant][f"{kind}_prompt_swap"] = extra["prompt_swap"]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{variant}.json").write_text(json.dumps(results[variant], indent=2) + "\n")
    meta = {
        "generated": main_kind,
        "kinds": args.kinds,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "n_train": args.n_train,
        "n_eval": args.n_eval,
        "teacher_kl": [round(k, 3) for k in next(iter(sets.values())).family_kl],
        "scoring_s": round(scored_s),
        "total_s": round(time.monotonic() - started),
    }
    text = report(results, meta)
    (args.out / "report.md").write_text(text + "\n")
    print(text)


_STUDENT: dict = {}


def load_student_for(cfg: TrainerConfig) -> nn.Module:
    """The tiny student, loaded once, its targets wrapped (both arms share it; it is frozen)."""
    if "student" not in _STUDENT:
        _STUDENT["student"] = load_student(cfg.student.path)
    return _STUDENT["student"]


if __name__ == "__main__":
    main()
