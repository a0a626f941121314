"""Logging set-up shared by the services' entry points."""

from __future__ import annotations

import logging
import os

_FORMAT = "%(asctime)s %(levelname)s %(name)s%(rank)s: %(message)s"


class _RankFilter(logging.Filter):
    """Adds ``[rank N]`` to records of torchrun workers (empty for single processes)."""

    def __init__(self) -> None:
        super().__init__()
        rank = os.environ.get("RANK")
        self.rank = f" [rank {rank}]" if rank is not None else ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once for a CLI process."""
    handler = logging.StreamHandler()
    handler.addFilter(_RankFilter())
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
