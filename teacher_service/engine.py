"""The small interface every teacher engine implements (`engine_factory.build_engine` picks one).

Engines never import grpc: they take token ids and return ``TopK`` arrays. Validation of
requests happens before an engine is called (``teacher_service.admission``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from hyperdistill.common.codec import TopK


@dataclass(frozen=True)
class EngineInfo:
    name: str
    model: str
    vocab_size: int
    max_model_len: int
    max_top_k: int


class TeacherEngine(Protocol):
    info: EngineInfo

    async def score(self, request_id: str, token_ids: np.ndarray, top_k: int, priority: int = 0) -> TopK:
        """Top-K log-probs of ``token_ids: int32 [T]`` at positions 0..T-2 (P = T - 1).

        Waiting requests are started lowest ``priority`` first, equal ones in arrival order.

        Cancelling the awaiting task aborts the engine work for ``request_id``.
        """
        ...

    async def shutdown(self) -> None:
        """Release the model and any worker processes."""
        ...
