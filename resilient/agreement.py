"""Turn signals seen on some ranks into one stop decision that every rank shares."""

from __future__ import annotations

import enum
import time

from resilient._logging import get_logger
from resilient.comm import Comm
from resilient.signals import SignalRecorder

log = get_logger(__name__)


class StopReason(enum.IntEnum):
    """Why the job should stop. Larger values win when ranks disagree."""

    NONE = 0
    PREEMPTION = 1


class Agreement:
    """Run an ``all_reduce(MAX)`` of each rank's stop reason at step boundaries.

    SLURM can signal only some processes, and a signal reaches each rank at a
    different moment, so each rank's local view is reduced to one decision that
    all ranks act on at the same step. The cost is one 8-byte all-reduce on the
    gloo group every ``check_every`` steps.
    """

    def __init__(self, comm: Comm, recorder: SignalRecorder, check_every: int) -> None:
        self.comm = comm
        self.recorder = recorder
        self.check_every = check_every
        self.decision = StopReason.NONE
        self.calls = 0
        self.seconds = 0.0

    def due(self, step: int) -> bool:
        return step % self.check_every == 0

    def local_reason(self) -> StopReason:
        return StopReason.PREEMPTION if self.recorder.events else StopReason.NONE

    def agree(self, step: int) -> StopReason:
        """Return the stop reason all ranks agree on after ``step``. Collective."""
        self.recorder.ensure_installed()
        local = self.local_reason()
        start = time.perf_counter()
        agreed = StopReason(self.comm.all_reduce_max(int(local)))
        self.seconds += time.perf_counter() - start
        self.calls += 1

        if agreed != StopReason.NONE and self.decision == StopReason.NONE:
            event = self.recorder.first_event
            if event is not None:
                seen = f"{event.name} arrived on this rank {time.monotonic() - event.monotonic:.2f} s ago"
            else:
                seen = "the signal arrived on another rank"
            log.info("All ranks agreed to stop after step %d for %s (%s).", step, agreed.name.lower(), seen)
        self.decision = max(self.decision, agreed)
        return agreed

    @property
    def mean_seconds(self) -> float:
        return self.seconds / self.calls if self.calls else 0.0
