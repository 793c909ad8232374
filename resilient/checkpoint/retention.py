"""Delete old complete checkpoints of this run, keeping the newest ``keep``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from resilient._logging import get_logger
from resilient.checkpoint.discovery import COMPLETE, scan
from resilient.checkpoint.layout import aside_name

log = get_logger(__name__)


def apply_retention(root: Path, run_id: str, keep: int, committed_step: int | None = None) -> list[Path]:
    """Remove complete checkpoints of ``run_id`` beyond the newest ``keep``; return what was removed.

    Only directories with this layout's names and a manifest of this run are
    candidates, so files the run did not create are never touched. Each victim
    is first renamed (so a half-deleted directory never looks complete), then
    removed. The newest complete checkpoint is never removed because ``keep``
    is at least 1. With ``committed_step``, checkpoints of later steps (left by
    an abandoned branch) are neither counted nor removed, so the checkpoint
    just committed always survives.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    complete = [info for info in scan(root, run_id) if info.status == COMPLETE
                and (committed_step is None or info.step <= committed_step)]
    victims = complete[:-keep] if len(complete) > keep else []
    removed = []
    for info in victims:
        aside = info.path.with_name(aside_name(info.step, "deleting"))
        try:
            os.rename(info.path, aside)
        except OSError as err:
            log.error("Could not remove old checkpoint %s: %s. It is left in place.", info.path, err)
            continue
        try:
            shutil.rmtree(aside)
        except OSError as err:
            log.error("Could not finish removing old checkpoint %s, now named %s: %s", info.path, aside, err)
            continue
        removed.append(info.path)
        log.info("Removed old checkpoint %s (keeping the newest %d).", info.path, keep)
    return removed
