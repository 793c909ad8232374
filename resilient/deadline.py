"""Time budgets of a stop: the job's end time, and the grace period after a signal.

Two decisions live here:

- **Deadline**: a job with a time limit and no warning signal is killed at
  its end time. The ranks stop and save once the time left is below a margin
  derived from the measured save and step times.
- **Save or skip**: with only SIGTERM and ``grace_period`` seconds until
  SIGKILL, a save that cannot finish in the time left would be killed
  halfway. Then the job exits at once, and the previous complete checkpoint
  stays the newest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from resilient._logging import get_logger
from resilient.comm import Comm
from resilient.slurm import SlurmJob, query_end_time

log = get_logger(__name__)

#: The smallest margin before a deadline, for a first save whose cost is unknown.
MIN_DEADLINE_MARGIN = 30.0


def resolve_end_time(setting: float | str | None, comm: Comm) -> float | None:
    """Return the job's end time (seconds since the epoch) that every rank uses. Collective under SLURM.

    ``setting`` is a number, ``"slurm"`` (the SLURM job's end time, if any) or
    None. Only when SLURM did not export ``SLURM_JOB_END_TIME`` does rank 0 run
    ``squeue`` and broadcast the result, so a thousand ranks do not each query
    the controller. Every other case needs no communication.
    """
    if isinstance(setting, (int, float)):
        return float(setting)
    if setting != "slurm":
        return None
    job = SlurmJob.from_env()
    if job is None:
        return None
    if job.end_time is not None:
        return job.end_time
    end = query_end_time(job) if comm.rank == 0 else None
    return comm.broadcast_object(end) if comm.distributed else end


@dataclass
class Deadline:
    """When to stop before ``end_time``, given the measured save and step times."""

    end_time: float | None
    margin: float | None = None
    clock: Callable[[], float] = time.time

    def margin_seconds(self, save_seconds: float | None, step_seconds: float | None, check_every: int) -> float:
        if self.margin is not None:
            return self.margin
        # The stop takes effect up to two agreement checks later, and the save may be slower than the last one.
        derived = 2 * (save_seconds or 0.0) + 2 * check_every * (step_seconds or 0.0)
        return max(MIN_DEADLINE_MARGIN, derived)

    def due(self, save_seconds: float | None, step_seconds: float | None, check_every: int) -> bool:
        if self.end_time is None:
            return False
        return self.end_time - self.clock() <= self.margin_seconds(save_seconds, step_seconds, check_every)


def save_fits_grace(grace_period: float | None, first_signal_monotonic: float | None,
                    estimated_save_seconds: float | None) -> tuple[bool, str]:
    """Return whether an emergency save fits the grace period left, and why.

    Without a grace period, a signal time or a measured save, the result is
    to save. The caller must take this decision on one rank and broadcast it,
    because each rank has its own signal time.
    """
    if grace_period is None or first_signal_monotonic is None or estimated_save_seconds is None:
        return True, "no grace period or no measured save time, so the save is attempted"
    left = grace_period - (time.monotonic() - first_signal_monotonic)
    if estimated_save_seconds <= left:
        return True, f"the last save took {estimated_save_seconds:.1f} s and {left:.1f} s of the grace period are left"
    return False, (f"the last save took {estimated_save_seconds:.1f} s but only {left:.1f} s of the "
                   f"{grace_period:g} s grace period are left")
