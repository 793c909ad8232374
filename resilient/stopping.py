"""The Supervisor's decisions at stops and around background saves.

Split out of :mod:`resilient.supervisor` to keep it readable: these methods
use the Supervisor's state and are only meant to be mixed into it. They
decide whether a stop save fits the grace period, whether a background save
in flight is waited for or abandoned at a stop, when a due save starts in the
background, and whether to stop inside a step.
"""

from __future__ import annotations

import time
from typing import Any

from resilient._logging import get_logger
from resilient.agreement import StopReason
from resilient.checkpoint.background import Flight
from resilient.checkpoint.commit import SaveResult
from resilient.deadline import save_fits_grace
from resilient.errors import CheckpointError

log = get_logger(__name__)


class StopAndSaveDecisions:
    """Mixin for :class:`resilient.Supervisor`; see the module docstring."""

    # Set by Supervisor.__init__; listed for readers of this module.
    config: Any
    recorder: Any
    last_save: SaveResult | None
    last_blocking_seconds: float | None
    _background: Any
    _schedule: Any
    _agreement: Any
    _signal_at: float | None

    def _check_grace_period(self, step: int, seconds: float) -> None:
        """Warn once when a stop signal could not be turned into a committed checkpoint within the grace period."""
        # The deadline margin uses this moving average too.
        self._step_seconds = seconds if self._step_seconds is None else 0.9 * self._step_seconds + 0.1 * seconds
        grace = self.config.grace_period
        if grace is None or self._grace_warned:
            return
        if step < 3:
            return
        # With the overlapped agreement a signal takes effect up to two checks later.
        lag_steps = 2 * self.config.check_every
        save_seconds = self.last_save.seconds if self.last_save is not None else 0.0
        worst = lag_steps * self._step_seconds + save_seconds
        if worst <= grace:
            return
        self._grace_warned = True
        fitting = max(1, int((grace - save_seconds) / (2 * self._step_seconds))) if grace > save_seconds else None
        advice = (f"set check_every to {fitting} or less" if fitting is not None
                  else "the save alone takes longer, so make checkpoints smaller or ask for a longer grace period")
        log.warning("A stop signal may not be saved within grace_period=%.0f s: with check_every=%d and steps of "
                    "%.2f s it takes effect up to %.1f s later, and the last save took %.1f s; %s.", grace,
                    self.config.check_every, self._step_seconds, lag_steps * self._step_seconds, save_seconds,
                    advice)

    def _first_signal_anywhere(self) -> float | None:
        """Return when the first rank got its stop signal, on this rank's monotonic clock. Collective.

        Only some ranks may have been signalled, and the grace period runs
        from the earliest signal, so the ranks share the oldest signal's age.
        """
        if self.config.grace_period is None:
            return None
        comm = self._connect()
        assert self._agreement is not None
        self._agreement.drain()
        now = time.monotonic()
        first = self.recorder.first_event
        local_age_ms = int((now - first.monotonic) * 1000) if first is not None else -1
        oldest_ms = comm.all_reduce_max(local_age_ms)
        return None if oldest_ms < 0 else now - oldest_ms / 1000

    def _save_fits_grace(self, step: int) -> bool:
        """Decide on rank 0 whether the stop save fits the grace period left, for every rank. Collective."""
        comm = self._connect()
        if self.config.grace_period is None or self.last_save is None:
            return True
        decision = None
        if comm.rank == 0:
            fits, explanation = save_fits_grace(self.config.grace_period, self._signal_at,
                                        self.last_save.seconds)
            decision = (fits, explanation)
        fits, explanation = comm.broadcast_object(decision) if comm.distributed else decision
        if fits:
            log.info("Saving step %d before stopping: %s.", step, explanation)
        else:
            log.warning("Not saving step %d: %s. Exiting at once; the checkpoint of step %d stays the newest.",
                        step, explanation, self._last_saved_step)
        return fits

    def _scheduled_save(self, step: int, reason: str) -> None:
        """Save at a step boundary: synchronously, or in the background with ``async_save``. Collective."""
        if self._background is None:
            self.save(reason)
            return
        comm = self._connect()
        assert self._agreement is not None and self._run_id is not None
        started = time.monotonic()
        if self.config.async_busy == "skip":
            self._agreement.drain()
            # Every rank must take the same decision, so the busy flags are reduced across ranks.
            if comm.all_reduce_max(int(self._background.busy())):
                current = self._background.current
                log.info("Skipping the %s save of step %d: the background save of step %s is still being "
                         "written (async_busy='skip').", reason, step, current.step if current else "?")
                return
        self._collect(self._background.wait(), raise_errors=True)
        self._last_save_started_step = step
        self._background.start(run_id=self._run_id, step=step, reason=reason, flatten_state=self._flatten_for_save,
                               trainer=self.trainer.state_dict(), layout=self._registered.layout())
        blocked = time.monotonic() - started
        self.last_blocking_seconds = blocked
        self._schedule.saved(blocked)
        log.info("Started the background %s save of step %d; training was blocked %.3f s.", reason, step, blocked)

    def _collect(self, flight: Flight | None, *, raise_errors: bool) -> None:
        """Take the outcome of a finished background save into the Supervisor's state."""
        if flight is None:
            return
        if flight.result is not None:
            self._schedule.written(self._background.last_write_seconds or flight.result.seconds)
            self._record_commit(flight.result)
        elif flight.error is not None:
            if raise_errors:
                raise CheckpointError(f"the background save of step {flight.step} failed: {flight.error}") \
                    from flight.error
            log.warning("The background save of step %d failed (%s); the save that follows replaces it.",
                        flight.step, flight.error)

    def _collect_finished(self) -> None:
        """Record a background save that has ended, without waiting. Local to this rank.

        Errors wait for the next save, where every rank collects at the same step.
        """
        if self._background is None:
            return
        flight = self._background.current
        if flight is not None and flight.done and flight.result is not None:
            self._collect(self._background.take_finished(), raise_errors=False)

    def _settle_background(self) -> None:
        """Wait for a background save before the final save; its errors are superseded by that save."""
        if self._background is not None:
            self._collect(self._background.wait(), raise_errors=False)

    def _resolve_background(self, step: int, reason: str) -> None:
        """Before a stop save: wait for a background save that fits the grace period, else abandon it. Collective.

        Rank 0 decides, because it is the rank that would publish the save.
        """
        if self._background is None:
            return
        comm = self._connect()
        assert self._agreement is not None
        self._agreement.drain()
        decision: tuple[str, str] | None = None
        if comm.rank == 0:
            decision = self._in_flight_decision(reason)
        action, reason_text = comm.broadcast_object(decision) if comm.distributed else decision
        current = self._background.current
        if action == "abandon":
            self._background.abandon()
            log.warning("Abandoning the background save of step %s: %s. It will not be marked complete; "
                        "step %d is saved instead.", current.step if current else "?", reason_text, step)
        else:
            if current is not None and not current.done:
                log.info("Waiting for the background save of step %d before saving step %d: %s.",
                         current.step, step, reason_text)
            self._collect(self._background.wait(), raise_errors=False)

    def _in_flight_decision(self, reason: str) -> tuple[str, str]:
        """Return rank 0's choice for the background save in flight at a stop: ("wait" or "abandon", the reason)."""
        assert self._background is not None
        current = self._background.current
        if current is None or current.done:
            return "wait", "it has finished"
        grace = self.config.grace_period
        if reason != "preemption" or grace is None or self._signal_at is None:
            return "wait", "no grace period limits the stop"
        left = grace - (time.monotonic() - self._signal_at)
        remaining = self._background.remaining_estimate()
        next_save = self.last_save.seconds if self.last_save is not None else None
        if remaining is not None and next_save is not None and remaining + next_save <= left:
            return "wait", (f"about {remaining:.1f} s of it and {next_save:.1f} s for the stop save fit in the "
                            f"{left:.1f} s left of the grace period")
        if not self._background.close_gate():
            return "wait", "it is already writing its completion marker"
        if remaining is None or next_save is None:
            # The first background save has no measured duration, and the stop step matters more.
            return "abandon", f"its duration is not known yet and only {left:.1f} s of the grace period are left"
        return "abandon", (f"about {remaining:.1f} s of it plus {next_save:.1f} s for the stop save exceed the "
                           f"{left:.1f} s left of the grace period")

    def wait_for_save(self) -> SaveResult | None:
        """Wait for the background save in flight, if any; return its result. Raises its error.

        Call it on every rank at the same point (the Supervisor does so itself
        before the next save, the final save and a stop save).
        """
        if self._background is None:
            return None
        flight = self._background.wait()
        self._collect(flight, raise_errors=True)
        return flight.result if flight is not None else None

    @property
    def stop_signalled(self) -> bool:
        """True once this process received a stop signal. Local: other ranks may not know yet."""
        return bool(self.recorder.events)

    def should_stop(self) -> bool:
        """Agree across ranks, now, whether to stop. Collective; for long loops inside one step.

        Call it on every rank at the same points of an evaluation or gradient
        accumulation loop (every few batches, say). When it returns True, leave
        that loop and let the step's body return: the step loop then saves and
        stops after this step, without waiting for the next agreement check.
        """
        self._connect()
        if not self._resumed:
            raise RuntimeError("call should_stop() inside the step loop (after resume())")
        assert self._agreement is not None
        return self._agreement.check_now() != StopReason.NONE

    def _time_save_still_due(self) -> bool:
        """Return whether an agreed time-based save is still due: no save started since the ranks requested it.

        The agreement's result arrives one check later, so a step-based save
        may have happened meanwhile. Every rank started saves at the same
        steps, so every rank returns the same value.
        """
        assert self._agreement is not None
        asked_at = self._agreement.save_asked_at
        if asked_at is None:
            return False
        return self._last_save_started_step is None or self._last_save_started_step < asked_at
