"""Package logger with a rank/step context prefix.

The package never configures logging on import; applications decide where the
records go (``logging.basicConfig(level=logging.INFO)`` is enough to see them).
"""

from __future__ import annotations

import logging
import os
from typing import Any, MutableMapping


class _Context:
    """Process-wide context shown in front of every resilient log line."""

    rank: int | None = None
    world_size: int | None = None
    step: int | None = None


CONTEXT = _Context()


def _default_rank() -> tuple[int | None, int | None]:
    # Before init_process_group the launcher's environment already names the rank.
    rank = os.environ.get("RANK")
    world = os.environ.get("WORLD_SIZE")
    if rank is None or world is None:
        return None, None
    try:
        return int(rank), int(world)
    except ValueError:
        return None, None


class _ContextAdapter(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        rank, world = CONTEXT.rank, CONTEXT.world_size
        if rank is None:
            rank, world = _default_rank()
        parts = []
        if rank is not None:
            parts.append(f"rank {rank}/{world}")
        if CONTEXT.step is not None:
            parts.append(f"step {CONTEXT.step}")
        prefix = f"[{' '.join(parts)}] " if parts else ""
        return f"{prefix}{msg}", kwargs


def get_logger(name: str) -> logging.LoggerAdapter:
    """Return a logger for ``name`` that prefixes the rank and step context."""
    return _ContextAdapter(logging.getLogger(name), {})
