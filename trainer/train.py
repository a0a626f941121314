"""The distillation job: ``Trainer.setup / train / train_step / close``.

One optimizer step = ``optim.accumulation_steps`` micro-batches per rank. For each micro-batch
the teacher's top-K arrives through the prefetching client (requested N batches ahead); the
hypernetwork turns each prompt into LoRA factors; the frozen student runs with them inside
``hyper_lora``; the top-K KL over assistant positions, normalised by the assistant-token count
of the whole window on all ranks, is back-propagated into the hypernetwork only.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from hyperdistill.common.codec import TopK
from hyperdistill.common.config import config_to_dict
from hyperdistill.common.metrics import start_metrics_server
from hyperdistill.common.tokenizer import load_tokenizer, tokenizer_fingerprint
from hyperdistill.trainer import metrics
from hyperdistill.trainer.checkpoint import Checkpointer, resolve_resume
from hyperdistill.trainer.config import OptimConfig, PhaseConfig, TrainerConfig
from hyperdistill.trainer.data.phase import PhaseData, load_phase_data
from hyperdistill.trainer.data.sampler import Batch, batch_sequences, teacher_tensors
from hyperdistill.trainer.distributed import DistInfo, all_reduce_sum, close_distributed, init_distributed
from hyperdistill.trainer.eval import EvalReport, eval_adapters, evaluate_held_out, publish
from hyperdistill.trainer.hypernetwork import Adapter, HyperLoRA
from hyperdistill.trainer.lora import GeneratedLoRA, hyper_lora, lora_norms
from hyperdistill.trainer.loss import topk_kl_loss
from hyperdistill.trainer.model import build_models
from hyperdistill.trainer.routing import RoutingSchedule
from hyperdistill.trainer.teacher_client import CachedTeacher, TeacherClient, TeacherClientStats, connect_teacher
from hyperdistill.trainer.tracking import RunLog

logger = logging.getLogger(__name__)


@dataclass
class MicroBatch:
    """One micro-batch of a step's window, as the prefetching teacher client delivers it."""

    batch: Batch
    topk: list[TopK]
    """The teacher's top-K per sequence of ``batch`` (``TopK`` [T_i - 1, K])."""
    teacher_wait: float
    """Seconds the training loop blocked waiting for ``topk``."""


@dataclass
class StepStats:
    lr: float
    """The base learning rate of the step (each parameter group's is this times its scale)."""
    loss: float
    tokens: int
    assistant_tokens: int
    grad_norm: float
    teacher_wait: float
    seconds: float
    lora_norms: dict[str, dict[str, float]] | None = None
    """Per module type, at logging steps only (`lora_norms` syncs the device)."""


class Trainer:
    """``setup`` builds everything from the config, ``train`` runs every phase from the resumed
    position (checkpointing, evaluating, exporting metrics), ``close`` releases it all."""

    config: TrainerConfig
    step: int
    """Optimizer steps taken over the whole run (all phases)."""
    phase_index: int
    """Index into ``config.phases`` of the phase being trained."""
    phase_step: int
    """Optimizer steps taken in that phase."""
    sampler_state: dict | None
    """The phase sampler's position after the last step (checkpointed; None: phase start)."""
    # Built by `setup`:
    dist: DistInfo
    tokenizer: PreTrainedTokenizerBase
    student: torch.nn.Module
    """The frozen student, its targets wrapped for `hyper_lora` (FSDP-sharded when distributed)."""
    hyper: Adapter
    """The trained adapter: the hypernetwork, or the static LoRA (``hypernetwork.kind``)."""
    optimizer: torch.optim.AdamW
    teacher: TeacherClient | CachedTeacher | None
    checkpointer: Checkpointer
    routing: RoutingSchedule | None
    """``kind: routed``: the bootstrap / switch / re-warm schedule (`trainer.routing`); else None."""
    run_log: RunLog | None
    adapters: dict[str, torch.nn.Module]
    """The evaluation arms' adapters beside ``hyper`` (e.g. ``static``)."""
    metrics_server: object | None
    _steps_this_run: int
    _sigterm: bool
    _teacher_stats: TeacherClientStats
    """The teacher client's counters at the last metrics export (the counters advance by the difference)."""

    def __init__(self, config: TrainerConfig):
        self.config = config
        self.step = self.phase_index = self.phase_step = 0
        self.sampler_state = None
        self.teacher = self.run_log = self.metrics_server = self.routing = None
        self._steps_this_run = 0
        self._sigterm = False
        self._teacher_stats = TeacherClientStats()

    # ---- set-up -------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config
        self.dist = init_distributed()
        _seed_everything(cfg.seed)
        self.tokenizer = load_tokenizer(cfg.student.path, cfg.student.chat_template)
        self.student, self.hyper = build_models(cfg, self.dist, self.tokenizer)
        if cfg.hypernetwork.kind == "routed":  # before the optimizer's state is loaded: it freezes encoder + router
            self.routing = RoutingSchedule(
                self.hyper, cfg.seed, cfg.run_dir, student=self.student, optim=cfg.optim, device=self.dist.device
            )
        self.optimizer = build_optimizer(self.hyper, cfg.optim, cfg.phases[0].lr)
        self.teacher = connect_teacher(cfg.teacher)
        self.teacher.start(self.student.config.vocab_size, tokenizer_fingerprint(self.tokenizer))
        self.checkpointer = Checkpointer(cfg.checkpoint, self.dist.rank)
        self.run_log = RunLog(cfg, self.dist.rank)
        self.adapters = eval_adapters(cfg, self.student, self.hyper, self.dist.device) if cfg.eval.held_out else {}
        resume = resolve_resume(cfg.checkpoint)
        if resume is not None:
            self._restore(self.checkpointer.load(resume, self.hyper, self.optimizer))
            metrics.LAST_CHECKPOINT.labels(rank=self.dist.rank).set(self.checkpointer.last_save_time)
        # SIGTERM (docker stop, preemption): finish the step, checkpoint, exit 0.
        signal.signal(signal.SIGTERM, self._on_sigterm)
        if cfg.metrics.port:
            self.metrics_server = start_metrics_server(cfg.metrics.host, cfg.metrics.port + self.dist.rank)

    def _on_sigterm(self, signum, frame) -> None:
        logger.warning("SIGTERM: checkpointing after the current step, then exiting")
        self._sigterm = True

    def _should_stop(self) -> bool:
        """``stop_after_steps`` reached, or SIGTERM on any rank (agreed on by all ranks)."""
        if self._steps_this_run == self.config.stop_after_steps:
            return True
        (signalled,) = all_reduce_sum([float(self._sigterm)], self.dist.device)
        return signalled > 0

    def _restore(self, state: dict) -> None:
        self.step, self.phase_index, self.phase_step = state["step"], state["phase_index"], state["phase_step"]
        self.sampler_state = state["sampler"]
        _set_rng_state(state["rng"])
        if self.routing is not None:
            self.routing.load_state_dict(state.get("routing"))

    # ---- training -----------------------------------------------------------------------
    def train(self) -> None:
        """Every phase from the resumed position on; the evaluation arms before (fresh runs) and after."""
        data = None
        if self.config.eval.held_out and self.step == 0:
            self.evaluate()
        for index in range(self.phase_index, len(self.config.phases)):
            phase = self.config.phases[index]
            if index != self.phase_index:
                self.phase_index, self.phase_step, self.sampler_state = index, 0, None
            data = load_phase_data(self.config, phase, self.tokenizer, self.dist)
            if self.sampler_state is not None:
                data.sampler.load_state_dict(self.sampler_state)
            if not self._run_phase(phase, data):
                logger.info("stopping after %d steps in this run (stop_after_steps or SIGTERM)", self._steps_this_run)
                self.save_checkpoint()
                return
        self.save_checkpoint()
        if self.config.eval.held_out:
            self.evaluate(data)

    def _run_phase(self, phase: PhaseConfig, data: PhaseData) -> bool:
        """Train the rest of ``phase``; False when ``stop_after_steps`` ended it early."""
        accumulation = self.config.optim.accumulation_steps
        total = data.total_steps(phase, accumulation)
        metrics.PHASE.labels(rank=self.dist.rank).set(self.phase_index)
        logger.info(
            "phase %r begins at step %d (phase step %d of %d, epoch %d, lr %.2e, max_length %d)",
            phase.name,
            self.step,
            self.phase_step,
            total,
            data.sampler.epoch,
            phase.lr,
            data.max_length,
        )
        batches = data.batches((total - self.phase_step) * accumulation)
        window, started = [], time.perf_counter()
        stream = self.teacher.prefetch(batches, lambda item: batch_sequences(item[0]))
        for (batch, sampler_state), topk, waited in stream:
            window.append(MicroBatch(batch, topk, waited))
            if len(window) < accumulation:
                continue
            if self.routing is not None and self.routing.before_step(self.step):
                self.optimizer = build_optimizer(self.hyper, self.config.optim, phase.lr)
            stats = self.train_step(window, self._set_lr(phase, total))
            # Step time is wall time since the previous step ended: teacher waits included.
            stats.seconds = time.perf_counter() - started
            self.step, self.phase_step, self.sampler_state = self.step + 1, self.phase_step + 1, sampler_state
            for micro in window:
                self.run_log.batch(self.step, micro.batch.trajectory_ids)
            window = []
            self._after_step(phase, data, stats)
            self._steps_this_run += 1
            if self._should_stop():
                return False
            started = time.perf_counter()
        return True

    def train_step(self, window: list[MicroBatch], lr: float) -> StepStats:
        """One optimizer step over ``window`` (``optim.accumulation_steps`` micro-batches) at the
        base learning rate ``lr`` (already set on the optimizer's groups; reported in the stats).

        The host waits for the device once per step (the global loss and gradient norm), never
        per micro-batch: token counts come from the host-side masks.
        """
        start = time.perf_counter()
        device, world = self.dist.device, self.dist.world_size
        counts = sum(int(micro.batch.loss_mask[:, 1:].sum()) for micro in window)
        tokens = sum(int(micro.batch.attention_mask.sum()) for micro in window)
        window_tokens, global_tokens = all_reduce_sum([counts, tokens], device)
        loss_sum, norms = torch.zeros((), dtype=torch.float64, device=device), None
        for i, micro in enumerate(window):
            self.hyper.set_requires_gradient_sync(i == len(window) - 1)
            ids, logprobs, mask = teacher_tensors(micro.batch, micro.topk, device)
            loss, lora = distill_loss(
                self.student,
                self.hyper,
                micro.batch,
                ids,
                logprobs,
                mask,
                max(window_tokens, 1.0),
                self.config.optim,
                device,
            )
            if i == len(window) - 1 and (self.step + 1) % self.config.metrics.log_every_steps == 0:
                # Before backward: the factors may be views of parameters FSDP frees afterwards.
                norms = lora_norms(lora)
            # FSDP averages gradients over ranks; the loss is already a global mean.
            (loss * world).backward()
            if self.routing is not None:
                self.routing.after_backward(micro.batch, ids, logprobs, mask)
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.hyper.parameters(), self.config.optim.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        (global_loss,) = all_reduce_sum([loss_sum], device)
        return StepStats(
            lr,
            global_loss,
            int(global_tokens),
            int(window_tokens),
            grad_norm,
            sum(micro.teacher_wait for micro in window),
            time.perf_counter() - start,
            norms,
        )

    def _set_lr(self, phase: PhaseConfig, total: int) -> float:
        """Set this step's learning rate on every parameter group; returns the base rate
        (``kind: routed``: times the re-warm factor after the switch)."""
        lr = phase_lr(phase, self.phase_step, total)
        if self.routing is not None:
            lr *= self.routing.lr_factor(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        return lr

    def _after_step(self, phase: PhaseConfig, data: PhaseData, stats: StepStats) -> None:
        cfg = self.config
        record = {
            "step": self.step,
            "phase": phase.name,
            "loss": stats.loss,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "tokens": stats.tokens,
            "assistant_tokens": stats.assistant_tokens,
            "tokens_per_s": stats.tokens / stats.seconds,
            "step_s": stats.seconds,
            "teacher_wait_s": stats.teacher_wait,
        }
        self._export_metrics(stats)
        if stats.lora_norms is not None:
            norms = stats.lora_norms
            for module, values in norms.items():
                for factor, value in values.items():
                    metrics.LORA_NORM.labels(rank=self.dist.rank, module=module, factor=factor).set(value)
            self.run_log.step(record, norms)
        if self.step % cfg.checkpoint.every_steps == 0:
            self.save_checkpoint()
        if cfg.eval.held_out and cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0:
            self.evaluate(data)

    def _export_metrics(self, stats: StepStats) -> None:
        r = self.dist.rank
        metrics.STEP.labels(rank=r).set(self.step)
        metrics.LOSS.labels(rank=r).set(stats.loss)
        metrics.TOKENS.labels(rank=r).inc(stats.tokens)
        metrics.TOKENS_PER_SECOND.labels(rank=r).set(stats.tokens / stats.seconds)
        metrics.STEP_SECONDS.labels(rank=r).observe(stats.seconds)
        metrics.TEACHER_WAIT_SECONDS.labels(rank=r).observe(stats.teacher_wait)
        metrics.GRAD_NORM.labels(rank=r).set(stats.grad_norm)
        metrics.LEARNING_RATE.labels(rank=r).set(stats.lr)
        metrics.PREFETCH_DEPTH.labels(rank=r).set(self.teacher.prefetch_depth)
        teacher = self.teacher.stats()
        metrics.export_teacher_stats(r, teacher, self._teacher_stats)
        self._teacher_stats = teacher

    # ---- evaluation and checkpoints -----------------------------------------------------
    def evaluate(self, data: PhaseData | None = None) -> EvalReport:
        """Every evaluation arm on the held-out examples of ``data`` (default: the current phase's;
        all ranks), written to ``<run_dir>/eval``, log.jsonl, wandb and the ``trainer_eval_*``
        gauges (``trainer/eval.py``)."""
        data = data or load_phase_data(self.config, self.config.phases[self.phase_index], self.tokenizer, self.dist)
        report = evaluate_held_out(self.config, data, self.student, self.adapters, self.teacher, self.dist.device)
        publish(report, self.step, Path(self.config.run_dir) / "eval", self.dist.rank)
        self.run_log.eval(self.step, report.record(), report.scalars())
        return report

    def save_checkpoint(self) -> None:
        state = {
            "step": self.step,
            "phase_index": self.phase_index,
            "phase_step": self.phase_step,
            "sampler": self.sampler_state,
            "rng": _rng_state(),
            "routing": self.routing.state_dict() if self.routing is not None else None,
        }
        self.checkpointer.save(self.step, self.hyper, self.optimizer, state, config_to_dict(self.config))
        metrics.LAST_CHECKPOINT.labels(rank=self.dist.rank).set(self.checkpointer.last_save_time)

    def close(self) -> None:
        if self.teacher is not None:
            self.teacher.close()
        if self.run_log is not None:
            self.run_log.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        close_distributed()


def build_optimizer(adapter: torch.nn.Module, optim: OptimConfig, lr: float) -> torch.optim.AdamW:
    """AdamW over the adapter's parameter groups (``adapter.parameter_groups()``), each at the
    phase's learning rate times its ``optim.lr_scales`` entry (matched by the group name before
    ``:``, e.g. ``head`` for ``head:self_attn.q_proj``; 1 when absent)."""
    groups = [
        {"params": params, "name": name, "lr_scale": optim.lr_scales.get(name.split(":")[0], 1.0)}
        for name, params in adapter.parameter_groups().items()
    ]
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)


def phase_lr(phase: PhaseConfig, step: int, total: int) -> float:
    """Linear warmup to ``phase.lr`` then cosine to ``phase.lr * min_lr_ratio`` at ``total``."""
    if step < phase.warmup_steps:
        return phase.lr * (step + 1) / phase.warmup_steps
    progress = min(1.0, (step - phase.warmup_steps) / max(1, total - phase.warmup_steps))
    floor = phase.lr * phase.min_lr_ratio
    return floor + (phase.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def distill_loss(
    student,
    hyper: HyperLoRA,
    batch: Batch,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    num_tokens: float,
    optim: OptimConfig,
    device: torch.device,
) -> tuple[torch.Tensor, GeneratedLoRA]:
    """The summed top-K KL of one micro-batch / ``num_tokens``, and the LoRA generated for it.

    teacher_ids: int64 [B, T-1, K]; teacher_logprobs: float32 [B, T-1, K]; mask: bool [B, T-1].
    The hypernetwork reads each prompt, the student runs with the generated LoRA, and the loss
    is computed in chunks from the last hidden states (``[T, V]`` logits never exist whole).
    """
    lora = hyper(batch.prompt_ids.to(device), batch.prompt_mask.to(device))
    input_ids = batch.input_ids.to(device)
    with hyper_lora(student, lora, seq_len=input_ids.shape[1]):
        hidden = student.model(
            input_ids=input_ids, attention_mask=batch.attention_mask.to(device), use_cache=False
        ).last_hidden_state
    loss = topk_kl_loss(
        hidden[:, :-1],
        student.get_output_embeddings(),
        teacher_ids,
        teacher_logprobs,
        mask,
        num_tokens,
        temperature=optim.temperature,
        mode=optim.loss,
        chunk_size=optim.logits_chunk_positions,
    )
    return loss, lora


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
