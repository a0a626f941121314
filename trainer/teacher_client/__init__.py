"""The trainer's teacher client: top-K log-probs of the next batches, fetched while a step runs.

    config    TeacherClientConfig (``teacher:``), the errors, TeacherClientStats
    client    TeacherClient: the blocking API (caller thread) over its event-loop thread
    core      StreamCore: the loop thread (channels, streams, deadlines, retries) and its records
    prefetch  Prefetcher: the next batches kept submitted while the current one trains
    cached    CachedTeacher: the top-K cache in front of the client; connect_teacher picks one

The public names are importable from here.
"""

from hyperdistill.trainer.teacher_client.cached import CachedTeacher, connect_teacher
from hyperdistill.trainer.teacher_client.client import TeacherClient
from hyperdistill.trainer.teacher_client.config import (
    RETRYABLE_CODES,
    TeacherClientConfig,
    TeacherClientStats,
    TeacherError,
    TeacherMismatchError,
    TeacherRequestError,
    TeacherUnavailableError,
)
from hyperdistill.trainer.teacher_client.prefetch import Prefetcher

__all__ = [
    "RETRYABLE_CODES",
    "CachedTeacher",
    "Prefetcher",
    "TeacherClient",
    "TeacherClientConfig",
    "TeacherClientStats",
    "TeacherError",
    "TeacherMismatchError",
    "TeacherRequestError",
    "TeacherUnavailableError",
    "connect_teacher",
]
