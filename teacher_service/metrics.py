"""Every Prometheus metric of the teacher service, declared once.

vLLM's own engine metrics (``vllm:*``) register in the same default registry and are served
on the same ``/metrics`` endpoint.
"""

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)

REQUESTS = Counter("teacher_requests_total", "Score requests finished, by gRPC status code name.", ["status"])
POSITIONS = Counter(
    "teacher_positions_total", "Positions of finished Score requests, by gRPC status code name.", ["status"]
)
RESPONSE_BYTES = Counter("teacher_response_bytes_total", "Bytes of top-K payload sent in ScoreChunks.")
REQUEST_LATENCY = Histogram(
    "teacher_request_latency_seconds",
    "Time from a Score request's arrival to its last chunk being queued for sending.",
    buckets=_LATENCY_BUCKETS,
)
ENGINE_LATENCY = Histogram(
    "teacher_engine_latency_seconds", "Time the engine took to score one request.", buckets=_LATENCY_BUCKETS
)
INFLIGHT_REQUESTS = Gauge("teacher_inflight_requests", "Score requests admitted and not yet finished.")
INFLIGHT_POSITIONS = Gauge("teacher_inflight_positions", "Positions admitted and not yet finished.")
QUEUED_POSITIONS = Gauge(
    "teacher_queued_positions",
    "Positions waiting for an engine batch (hf engine; vLLM reports vllm:num_requests_waiting).",
)
ENGINE_BATCH_SEQUENCES = Histogram(
    "teacher_engine_batch_sequences",
    "Sequences per forward batch (hf engine).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
ENGINE_ERRORS = Counter("teacher_engine_errors_total", "Engine failures while scoring a request.", ["engine"])
ACTIVE_STREAMS = Gauge("teacher_active_streams", "Open Score streams.")

# Every status a request can end with (`scoring`): each series exists from the start at 0, so a
# panel or an alert on errors shows 0 rather than "no data" until the first one.
STATUSES = ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "CANCELLED", "INTERNAL")


def initialise(engine: str) -> None:
    """Create the labelled series of a serving teacher at 0 (``engine``: the engine's name)."""
    for status in STATUSES:
        REQUESTS.labels(status=status)
        POSITIONS.labels(status=status)
    ENGINE_ERRORS.labels(engine=engine)
