"""Turn signals seen on some ranks into one stop decision that every rank shares."""

from __future__ import annotations

import enum
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from resilient._logging import get_logger
from resilient.comm import Comm
from resilient.signals import SignalRecorder

log = get_logger(__name__)


class StopReason(enum.IntEnum):
    """Reason to stop the job. Larger values win when ranks disagree."""

    NONE = 0
    DEADLINE = 1
    PREEMPTION = 2


class Agreement:
    """Reduce each rank's stop reason with ``all_reduce(MAX)`` at step boundaries.

    SLURM can signal only some processes, and a signal reaches each rank at a
    different moment, so each rank's local view is reduced to one decision that
    all ranks act on at the same step.

    With ``overlap`` (the default) the all-reduce started at one check is
    waited for at the next one, so it runs during the training step instead of
    stalling it. A stop then takes effect one check later. Every rank calls
    :meth:`agree` and :meth:`drain` at the same steps, so every rank waits on
    the same collective and reads the same result.
    """

    def __init__(self, comm: Comm, recorder: SignalRecorder, check_every: int, *, overlap: bool = True) -> None:
        self.comm = comm
        self.recorder = recorder
        self.check_every = check_every
        self.overlap = overlap and comm.distributed
        self.decision = StopReason.NONE
        self.calls = 0
        self.seconds = 0.0
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._ready: StopReason | None = None
        #: Returns True on this rank once the job's end time is near (see resilient.deadline).
        self.deadline_due: Callable[[], bool] | None = None

    def due(self, step: int) -> bool:
        return step % self.check_every == 0

    def local_reason(self) -> StopReason:
        if self.recorder.events:
            return StopReason.PREEMPTION
        if self.deadline_due is not None and self.deadline_due():
            return StopReason.DEADLINE
        return StopReason.NONE

    def agree(self, step: int) -> StopReason:
        """Return the stop reason all ranks agree on at ``step``. Collective."""
        self.recorder.ensure_installed()
        local = self.local_reason()
        start = time.perf_counter()
        if self.overlap:
            previous = self._ready if self._ready is not None else self._wait_pending()
            self._ready = None
            self._pending = self._launch(local)
            agreed = previous if previous is not None else StopReason.NONE
        else:
            agreed = StopReason(self.comm.all_reduce_max(int(local)))
        self.seconds += time.perf_counter() - start
        self.calls += 1

        if agreed != StopReason.NONE and self.decision == StopReason.NONE:
            self._log_decision(step, agreed)
        self.decision = max(self.decision, agreed)
        return agreed

    def drain(self) -> None:
        """Finish an all-reduce still in flight, keeping its result for the next :meth:`agree`. Collective.

        Called before any other collective on resilient's group (a save) and
        when the loop ends, so no operation is left pending.
        """
        result = self._wait_pending()
        if result is not None:
            self._ready = max(self._ready or StopReason.NONE, result)

    def _launch(self, local: StopReason) -> tuple[Any, torch.Tensor]:
        tensor = torch.tensor([int(local)], dtype=torch.int64)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.comm.group, async_op=True)
        return work, tensor

    def _wait_pending(self) -> StopReason | None:
        if self._pending is None:
            return None
        work, tensor = self._pending
        self._pending = None
        work.wait()
        return StopReason(int(tensor.item()))

    def _log_decision(self, step: int, agreed: StopReason) -> None:
        event = self.recorder.first_event
        if agreed == StopReason.DEADLINE:
            seen = "the job's end time is near"
        elif event is not None:
            seen = f"{event.name} arrived on this rank {time.monotonic() - event.monotonic:.2f} s ago"
        else:
            seen = "the signal arrived on another rank"
        log.info("All ranks agreed to stop after step %d for %s (%s).", step, agreed.name.lower(), seen)

    @property
    def mean_seconds(self) -> float:
        """Mean time a call to :meth:`agree` blocked the caller."""
        return self.seconds / self.calls if self.calls else 0.0
