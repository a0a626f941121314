"""Every Prometheus metric of the trainer, declared once; each rank serves its own ``/metrics``
(on ``metrics.port + rank``) and labels every sample with ``rank``."""

from prometheus_client import Counter, Gauge, Histogram

from hyperdistill.trainer.teacher_client import TeacherClientStats

_STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

STEP = Gauge("trainer_step", "Optimizer steps completed.", ["rank"])
LOSS = Gauge("trainer_loss", "Training loss of the last optimizer step (KL per assistant token).", ["rank"])
TOKENS_PER_SECOND = Gauge("trainer_tokens_per_second", "Tokens (all positions) per second of the last step.", ["rank"])
TOKENS = Counter("trainer_tokens_total", "Tokens trained on.", ["rank"])
STEP_SECONDS = Histogram("trainer_step_seconds", "Wall time of one optimizer step.", ["rank"], buckets=_STEP_BUCKETS)
TEACHER_WAIT_SECONDS = Histogram(
    "trainer_teacher_wait_seconds",
    "Time a micro-batch blocked waiting for the teacher's top-K.",
    ["rank"],
    buckets=_WAIT_BUCKETS,
)
PREFETCH_DEPTH = Gauge("trainer_prefetch_queue_depth", "Batches submitted to the teacher ahead of the step.", ["rank"])
TEACHER_RETRIES = Counter(
    "trainer_teacher_retries_total", "Teacher sequence attempts resubmitted after a failed one.", ["rank"]
)
TEACHER_FAILURES = Counter(
    "trainer_teacher_failures_total",
    "Teacher batches that failed for good (refused, malformed or retry budget spent).",
    ["rank"],
)
TEACHER_CACHE_POSITIONS = Counter(
    "trainer_teacher_cache_positions_total",
    "Teacher positions looked up in the top-K cache, by result: hit (read from disk) or miss (asked of a teacher).",
    ["rank", "result"],
)
GRAD_NORM = Gauge("trainer_grad_norm", "Hypernetwork gradient norm before clipping.", ["rank"])
LEARNING_RATE = Gauge("trainer_learning_rate", "Current learning rate.", ["rank"])
LORA_NORM = Gauge(
    "trainer_lora_norm", "Mean norm of the generated LoRA by module type and factor.", ["rank", "module", "factor"]
)
LAST_CHECKPOINT = Gauge(
    "trainer_last_checkpoint_timestamp_seconds", "Unix time of the last saved checkpoint.", ["rank"]
)
PHASE = Gauge("trainer_phase_index", "Index of the current training phase in the config's phase list.", ["rank"])
# The latest held-out evaluation (trainer/eval.py), one series per arm: none, generated, prompt_swap, static.
EVAL_KL = Gauge("trainer_eval_kl", "Held-out top-K KL per assistant token, by evaluation arm.", ["rank", "arm"])
EVAL_TOP1_AGREEMENT = Gauge(
    "trainer_eval_top1_agreement",
    "Held-out share of assistant tokens where the student's argmax is the teacher's top-1.",
    ["rank", "arm"],
)
EVAL_TEACHER_NLL = Gauge(
    "trainer_eval_teacher_nll",
    "Held-out student negative log-likelihood of the teacher's top-1 token (nats).",
    ["rank", "arm"],
)
EVAL_GAP_CLOSED = Gauge(
    "trainer_eval_gap_closed", "1 - KL(arm) / KL(no LoRA) on the held-out examples.", ["rank", "arm"]
)


def export_teacher_stats(rank: int, now: TeacherClientStats, before: TeacherClientStats) -> None:
    """Advance the teacher counters by what the client counted since `before` (its last snapshot)."""
    TEACHER_RETRIES.labels(rank=rank).inc(now.retries - before.retries)
    TEACHER_FAILURES.labels(rank=rank).inc(now.failures - before.failures)
    TEACHER_CACHE_POSITIONS.labels(rank=rank, result="hit").inc(now.cache_hit_positions - before.cache_hit_positions)
    TEACHER_CACHE_POSITIONS.labels(rank=rank, result="miss").inc(now.cache_miss_positions - before.cache_miss_positions)
