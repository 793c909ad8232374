"""The run directory: its run identity, the write check, and explicit roll-backs. Rank 0 only."""

from __future__ import annotations

import os
import time
from pathlib import Path

from resilient._logging import get_logger
from resilient.checkpoint.discovery import COMPLETE, scan
from resilient.checkpoint.layout import (
    aside_name,
    new_run_id,
    parse_dir_name,
    read_run_id,
    resume_from_applied,
    write_run_id,
)
from resilient.errors import ConfigError

log = get_logger(__name__)


def prepare_run_dir(root: Path, requested_id: str | None) -> str:
    """Create ``root`` if needed, check that it is writable, and return the run id stored there.

    Without ``run.json`` the id is ``requested_id``, else the id of the newest
    complete checkpoint (adopted with a warning), else a new one. That id is
    written to ``run.json``. Raises ConfigError when ``requested_id`` differs
    from the stored id.
    """
    root.mkdir(parents=True, exist_ok=True)
    # Fail now rather than at the first save, possibly hours into the run.
    probe = root / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
    stored = read_run_id(root)
    if requested_id is not None and stored is not None and stored != requested_id:
        raise ConfigError(
            f"checkpoint directory {root} belongs to run {stored!r}, but run_id={requested_id!r} was requested. "
            "Use another directory for a different run, or drop run_id to continue the existing one."
        )
    if stored is not None:
        return stored
    run_id = requested_id
    if run_id is None:
        adopted = [info for info in scan(root) if info.status == COMPLETE and info.manifest is not None]
        if adopted:
            run_id = adopted[-1].manifest.run_id
            log.warning("%s has no run.json; adopting run id %s from %s.", root, run_id, adopted[-1].path)
        else:
            run_id = new_run_id()
    write_run_id(root, run_id)
    return run_id


def pending_resume_from(root: Path, resume_from: str | os.PathLike | None) -> Path | None:
    """Return ``resume_from`` unless an earlier start of this run already applied it.

    A job script that keeps the setting across requeues would otherwise roll
    back to the same checkpoint at every restart and lose its progress.
    """
    if resume_from is None:
        return None
    checkpoint = Path(resume_from).expanduser()
    applied_at = resume_from_applied(root, checkpoint)
    if applied_at is None:
        return checkpoint
    log.info("resume_from=%s was already applied at %s; resuming from the newest checkpoint instead.",
             checkpoint, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(applied_at)))
    return None


def set_aside_newer(root: Path, run_id: str, step: int) -> None:
    """Rename this run's checkpoints newer than ``step`` so discovery and retention ignore them.

    After an explicit roll-back to an older checkpoint, the abandoned newer
    ones would otherwise be picked again at the next restart.
    """
    for info in scan(root, run_id):
        if info.step <= step or parse_dir_name(info.path.name) != (info.step, "final"):
            continue
        if info.manifest is not None and info.manifest.run_id != run_id:
            continue
        aside = info.path.with_name(aside_name(info.step, "superseded"))
        try:
            os.rename(info.path, aside)
        except OSError as err:
            log.error("Could not set aside %s after resuming from step %d: %s", info.path, step, err)
            continue
        log.warning("Resumed from the older step %d, so %s was renamed to %s.", step, info.path, aside)
