"""The teacher client's configuration (``teacher:`` in the trainer config), errors and counters."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from hyperdistill.common.security import check_tls_config
from hyperdistill.trainer.teacher_cache import CacheConfig

# Codes after which a stream's unanswered requests are resubmitted. A non-retryable code whose
# message names none of the stream's requests is treated the same way (grpc reports some
# connection drops as UNKNOWN), so it is retried until the budget runs out.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)


class TeacherError(RuntimeError):
    """Base class of the teacher client's errors."""


class TeacherMismatchError(TeacherError):
    """A teacher serves another vocabulary or tokenizer than the student's, or a smaller top-K."""


class TeacherUnavailableError(TeacherError):
    """No teacher answered in time (at start, or within a request's retry budget)."""


class TeacherRequestError(TeacherError):
    """A teacher refused a request with a non-retryable status (e.g. INVALID_ARGUMENT)."""


@dataclass(kw_only=True)
class TeacherClientConfig:
    """Where the teachers are, what to ask them, and how long to wait and retry."""

    addresses: list[str] = field(default_factory=lambda: ["127.0.0.1:50051"])
    """Teacher gRPC addresses (``host:port``); requests are spread over them round robin. Empty:
    no live teacher, every sequence must be in ``cache`` (training on all 8 GPUs after precompute)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """The teacher top-K cache (``trainer.teacher_cache``): read before asking a teacher."""
    top_k: int = 20
    """K of the top-K log-probs asked for; must not exceed any teacher's ``max_top_k``."""
    prefetch_batches: int = 2
    """N: batches ``prefetch`` keeps submitted ahead of the one being trained on."""
    request_timeout_seconds: float = 300.0
    """Deadline of one attempt of one sequence, from being written to a stream to its last
    chunk. It includes queueing behind this client's other requests, so it must cover the
    scoring of ``prefetch_batches`` whole batches. A missed deadline fails the attempt and the
    stream it was on (cancelling that stream aborts its work on the teacher)."""
    retry_budget_seconds: float = 900.0
    """Time a sequence may spend being retried, counted from its first failed attempt, before
    its batch fails with ``TeacherUnavailableError``. Covers a teacher restart (vLLM loading a
    480B FP8 checkpoint takes minutes)."""
    backoff_initial_seconds: float = 0.5
    """First wait before an address whose stream failed is used again; doubles per failure."""
    backoff_max_seconds: float = 15.0
    """Cap of that wait (each wait is drawn uniformly in [0.5, 1] x the exponential value)."""
    connect_timeout_seconds: float = 300.0
    """``start``: how long to wait for each teacher to answer GetInfo (it may be loading)."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest gRPC message sent or received; must be >= the teachers' ``max_message_bytes``."""
    tls_ca_file: str | None = None
    """PEM CA certificates that signed the teachers' certificates. Set: TLS to every address
    (the teachers' ``server.tls_cert_file``); unset: plaintext."""
    tls_cert_file: str | None = None
    """PEM client certificate chain, for teachers that require one (``server.tls_client_ca_file``:
    mutual TLS); with ``tls_key_file``. Needs ``tls_ca_file``."""
    tls_key_file: str | None = None
    """PEM private key of ``tls_cert_file``."""
    tls_server_name: str | None = None
    """Name to check the teachers' certificates against instead of the host in ``addresses`` (e.g.
    when they are reached by an IP their certificate does not list). Needs ``tls_ca_file``."""
    auth_token_env: str | None = None
    """Name of the environment variable holding the bearer token sent with every call (the
    teachers' ``server.auth_token_env``); ``start`` fails when it is unset or empty. Needs
    ``tls_ca_file``: the token is sent as call credentials, which gRPC sends only over TLS."""

    def __post_init__(self) -> None:
        check_tls_config(self, switch="tls_ca_file", dependents=("tls_cert_file", "tls_server_name", "auth_token_env"))
        if not all(isinstance(a, str) and a for a in self.addresses):
            raise ValueError(f"addresses must be a list of host:port strings, got {self.addresses!r}")
        if not self.addresses and not (self.cache.dir and self.cache.teacher_model):
            raise ValueError(
                "addresses is empty: set cache.dir and cache.teacher_model to train from a precomputed cache alone"
            )
        if self.top_k < 1 or self.prefetch_batches < 0:
            raise ValueError(f"top_k must be >= 1 and prefetch_batches >= 0, got {self.top_k}, {self.prefetch_batches}")
        for name in (
            "request_timeout_seconds",
            "retry_budget_seconds",
            "backoff_initial_seconds",
            "backoff_max_seconds",
            "connect_timeout_seconds",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise ValueError(
                f"backoff_max_seconds {self.backoff_max_seconds} < backoff_initial_seconds "
                f"{self.backoff_initial_seconds}"
            )
        if self.max_message_bytes < 64 * 1024:
            raise ValueError(f"max_message_bytes must be >= 65536, got {self.max_message_bytes}")


@dataclass
class TeacherClientStats:
    """Counters for the trainer's metrics (a snapshot; ``TeacherClient.stats``)."""

    retries: int = 0
    """Sequence attempts resubmitted after a failed one."""
    failures: int = 0
    """Batches whose future failed (refused, malformed answer or retry budget exhausted)."""
    bytes_received: int = 0
    """Serialized bytes of all ScoreChunks received."""
    last_wait_seconds: float = 0.0
    """Seconds the last ``result`` call blocked."""
    cache_hit_positions: int = 0
    """Positions answered from the teacher cache (`CachedTeacher`; 0 without a cache)."""
    cache_miss_positions: int = 0
    """Positions the cache lacked, asked of the live teachers (`CachedTeacher`)."""
