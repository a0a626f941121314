"""The factory that loads the configured teacher engine.

Apart from `engine` (the interface), so that the engines can import the interface without an
import cycle through the factory that imports them.
"""

from __future__ import annotations

from hyperdistill.teacher_service.config import EngineConfig
from hyperdistill.teacher_service.engine import TeacherEngine


async def build_engine(config: EngineConfig) -> TeacherEngine:
    """Load the configured engine (imports only the backend it needs)."""
    if config.kind == "vllm":
        from hyperdistill.teacher_service.vllm_engine import VllmEngine

        return await VllmEngine.create(config)
    from hyperdistill.teacher_service.hf_engine import HFEngine

    return await HFEngine.create(config)
