"""transformers engine: batched forward, log-softmax and top-K in position chunks.

Concurrent requests are gathered, lowest ``priority`` first (then oldest), into one padded
forward under a token budget (``engine.max_num_batched_tokens`` counts padded tokens). The LM
head runs on at most ``engine.logits_chunk_positions`` positions at a time, so ``[T, V]``
float32 never exists whole.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hyperdistill.common.codec import TopK
from hyperdistill.teacher_service import metrics
from hyperdistill.teacher_service.config import EngineConfig
from hyperdistill.teacher_service.engine import EngineInfo

logger = logging.getLogger(__name__)

_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Pending:
    token_ids: np.ndarray
    top_k: int
    priority: int
    future: asyncio.Future = field(repr=False)


class HFEngine:
    """``TeacherEngine`` on a transformers causal LM, one forward batch at a time."""

    def __init__(self, config: EngineConfig, model: torch.nn.Module, info: EngineInfo):
        self.config = config
        self.info = info
        self._model = model
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._worker = asyncio.create_task(self._run(), name="hf-engine-batcher")

    @classmethod
    async def create(cls, config: EngineConfig) -> HFEngine:
        model = await asyncio.to_thread(AutoModelForCausalLM.from_pretrained, config.model, dtype=_DTYPES[config.dtype])
        model.eval().requires_grad_(False)
        vocab_size = AutoConfig.from_pretrained(config.model).vocab_size
        max_len = min(config.max_model_len, getattr(model.config, "max_position_embeddings", config.max_model_len))
        info = EngineInfo("hf", config.model, vocab_size, max_len, config.max_top_k)
        logger.info("hf engine ready: %s (vocab %d, max_model_len %d)", config.model, vocab_size, max_len)
        return cls(config, model, info)

    async def score(self, request_id: str, token_ids: np.ndarray, top_k: int, priority: int = 0) -> TopK:
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(token_ids, top_k, priority, future))
        metrics.QUEUED_POSITIONS.inc(len(token_ids) - 1)
        self._wake.set()
        # Cancelling the caller cancels the future; the batcher skips cancelled entries, and a
        # batch already running has its result dropped.
        return await future

    async def shutdown(self) -> None:
        self._worker.cancel()
        for pending in self._pending:
            pending.future.cancel()
        self._pending.clear()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while batch := self._take_batch():
                metrics.ENGINE_BATCH_SEQUENCES.observe(len(batch))
                try:
                    results = await asyncio.to_thread(self._score_batch, batch)
                except Exception as e:  # an engine fault fails this batch, not the service
                    logger.exception("hf engine batch of %d failed", len(batch))
                    for pending in batch:
                        if not pending.future.done():
                            pending.future.set_exception(e)
                    continue
                for pending, result in zip(batch, results, strict=True):
                    if not pending.future.done():
                        pending.future.set_result(result)

    def _take_batch(self) -> list[_Pending]:
        """Live requests, lowest priority then oldest first, whose padded size fits the budget (at least one)."""
        # A stable sort: equal priorities keep their arrival order.
        self._pending = sorted((p for p in self._pending if not p.future.done()), key=lambda p: p.priority)
        metrics.QUEUED_POSITIONS.set(sum(len(p.token_ids) - 1 for p in self._pending))
        batch: list[_Pending] = []
        longest = 0
        while self._pending:
            candidate = max(longest, len(self._pending[0].token_ids))
            if batch and candidate * (len(batch) + 1) > self.config.max_num_batched_tokens:
                break
            batch.append(self._pending.pop(0))
            longest = candidate
        metrics.QUEUED_POSITIONS.set(sum(len(p.token_ids) - 1 for p in self._pending))
        return batch

    @torch.inference_mode()
    def _score_batch(self, batch: list[_Pending]) -> list[TopK]:
        lengths = [len(p.token_ids) for p in batch]
        input_ids = torch.zeros(len(batch), max(lengths), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, pending in enumerate(batch):
            input_ids[row, : lengths[row]] = torch.from_numpy(pending.token_ids.astype(np.int64))
            attention_mask[row, : lengths[row]] = 1
        hidden = self._model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return [
            self._topk(hidden[row, : n - 1], input_ids[row, 1:n], p.top_k)
            for row, (n, p) in enumerate(zip(lengths, batch, strict=True))
        ]

    def _topk(self, hidden: torch.Tensor, targets: torch.Tensor, top_k: int) -> TopK:
        """hidden: [P, H], targets: int64 [P] -> TopK over the full vocabulary."""
        num = hidden.shape[0]
        ids = np.empty((num, top_k), dtype=np.int32)
        logprobs = np.empty((num, top_k), dtype=np.float32)
        target = np.empty((num,), dtype=np.float32)
        lm_head = self._model.get_output_embeddings()
        step = self.config.logits_chunk_positions
        for start in range(0, num, step):
            rows = slice(start, start + step)
            logp = torch.log_softmax(lm_head(hidden[rows]).float(), dim=-1)  # [p, V] float32
            values, indices = logp.topk(top_k, dim=-1)
            ids[rows] = indices.numpy()
            logprobs[rows] = values.numpy()
            target[rows] = logp.gather(-1, targets[rows, None]).squeeze(-1).numpy()
        return TopK(ids=ids, logprobs=logprobs, target=target)
