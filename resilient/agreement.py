"""Turn signals seen on some ranks into one stop decision that every rank shares."""

from __future__ import annotations

import contextlib
import enum
import time
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from resilient._logging import get_logger
from resilient.comm import Comm
from resilient.errors import AgreementError
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
        self._ready: tuple[StopReason, bool] | None = None
        #: Returns True on this rank once the job's end time is near (see resilient.deadline).
        self.deadline_due: Callable[[], bool] | None = None
        #: Returns True on this rank when a time-based save is due (see resilient.schedule).
        self.save_wanted: Callable[[], bool] | None = None
        #: Whether the last :meth:`agree` call agreed on a time-based save. Every rank reads the same value.
        self.save_agreed = False
        #: The step at which the ranks asked for the save that :attr:`save_agreed` reports.
        self.save_asked_at: int | None = None
        self._launched_at: int | None = None
        #: A stop agreed by :meth:`check_now` inside a step; the step loop acts on it at the step's end.
        self.forced = StopReason.NONE

    def due(self, step: int) -> bool:
        return step % self.check_every == 0

    def local_reason(self) -> StopReason:
        if self.recorder.events:
            return StopReason.PREEMPTION
        if self.deadline_due is not None and self.deadline_due():
            return StopReason.DEADLINE
        return StopReason.NONE

    def _local_vector(self) -> list[int]:
        wanted = self.save_wanted is not None and self.save_wanted()
        return [int(self.local_reason()), int(wanted)]

    def agree(self, step: int) -> StopReason:
        """Return the stop reason all ranks agree on at ``step``. Collective.

        Also sets :attr:`save_agreed`: whether any rank wants a time-based save.
        """
        self.recorder.ensure_installed()
        local = self._local_vector()
        start = time.perf_counter()
        if self.overlap:
            previous = self._ready if self._ready is not None else self._wait_pending()
            self._ready = None
            self.save_asked_at = self._launched_at
            self._pending = self._launch(local)
            self._launched_at = step
            agreed, self.save_agreed = previous if previous is not None else (StopReason.NONE, False)
        else:
            with self._failing_as_agreement(f"after step {step}"):
                reason, wanted = self.comm.all_reduce_max_vector(local)
            agreed, self.save_agreed = StopReason(reason), bool(wanted)
            self.save_asked_at = step
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
            ready_reason, ready_save = self._ready or (StopReason.NONE, False)
            self._ready = (max(ready_reason, result[0]), ready_save or result[1])

    def check_now(self) -> StopReason:
        """Agree on stopping right now, without the one-check delay of the overlap. Collective.

        For long loops inside one step (evaluation, gradient accumulation).
        A stop agreed here is kept in :attr:`forced` for the step loop.
        """
        self.drain()
        with self._failing_as_agreement("inside the current step"):
            reason, _wanted = self.comm.all_reduce_max_vector([int(self.local_reason()), 0])
        agreed = StopReason(reason)
        if agreed != StopReason.NONE:
            if self.decision == StopReason.NONE:
                self._log_decision(None, agreed)
            self.decision = max(self.decision, agreed)
            self.forced = max(self.forced, agreed)
        return agreed

    def _launch(self, local: list[int]) -> tuple[Any, torch.Tensor]:
        tensor = torch.tensor(local, dtype=torch.int64)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.comm.group, async_op=True)
        return work, tensor

    def _wait_pending(self) -> tuple[StopReason, bool] | None:
        if self._pending is None:
            return None
        work, tensor = self._pending
        self._pending = None
        with self._failing_as_agreement(f"after step {self._launched_at}"):
            work.wait()
        reason, wanted = tensor.tolist()
        return StopReason(reason), bool(wanted)

    @contextlib.contextmanager
    def _failing_as_agreement(self, where: str) -> Iterator[None]:
        """Turn a failed or timed-out agreement collective into an AgreementError that explains the cause."""
        try:
            yield
        except RuntimeError as err:  # gloo and NCCL raise RuntimeError subclasses (DistBackendError)
            local = "a stop signal arrived here" if self.recorder.events else "no stop signal arrived here"
            raise AgreementError(
                f"the stop agreement {where} did not complete within collective_timeout "
                f"({self.comm.timeout_seconds:g} s); {local}. Another rank is stopped (SIGSTOP, a debugger), hung "
                "or gone, so nothing is saved for this stop and the newest complete checkpoint stays the one to "
                "resume from. If the ranks are only slow, raise collective_timeout. Cause: "
                f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
            ) from err

    def _log_decision(self, step: int | None, agreed: StopReason) -> None:
        event = self.recorder.first_event
        if agreed == StopReason.DEADLINE:
            seen = "the job's end time is near"
        elif event is not None:
            seen = f"{event.name} arrived on this rank {time.monotonic() - event.monotonic:.2f} s ago"
        else:
            seen = "the signal arrived on another rank"
        where = f"after step {step}" if step is not None else "inside the current step"
        log.info("All ranks agreed to stop %s for %s (%s).", where, agreed.name.lower(), seen)

    @property
    def mean_seconds(self) -> float:
        """Mean time a call to :meth:`agree` blocked the caller."""
        return self.seconds / self.calls if self.calls else 0.0
