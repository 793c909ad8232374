"""Background saves: copy the state on the training thread, write and commit it on a writer thread.

The training thread only copies the state into reused host buffers
(:mod:`resilient.checkpoint.staging`) and starts the writer thread. The writer
runs the same coordinated save as a synchronous one (:func:`save_checkpoint`),
on a process group of its own, so its collectives never interleave with the
stop agreement or a synchronous save on resilient's main group. The marker is
written after every rank's files are durable, and retention runs after it.

At most one background save is in flight per process. Its outcome (a
:class:`SaveResult` or an exception) is kept until the training thread
collects it; the writer thread itself never touches the Supervisor.

A writer thread was measured against a writer process on 2 cores (bench/run.py,
docs/benchmarks.md). The thread kept more of the training speed in 8 of 10
runs, and it needs no shared-memory copy of the state, so it is the writer.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from resilient._logging import get_logger
from resilient.checkpoint.commit import PublishGate, SaveResult, save_checkpoint
from resilient.checkpoint.retention import apply_retention
from resilient.checkpoint.staging import StagingBuffers
from resilient.comm import Comm
from resilient.errors import CheckpointError

log = get_logger(__name__)

#: Seconds the writer thread waits before writing. A test hook that keeps a
#: background save in flight while training changes the state.
DEBUG_WRITE_DELAY_ENV = "RESILIENT_DEBUG_WRITE_DELAY"


def _debug_write_delay() -> float:
    raw = os.environ.get(DEBUG_WRITE_DELAY_ENV, "").strip()
    try:
        return max(float(raw), 0.0) if raw else 0.0
    except ValueError:
        log.warning("Ignoring %s=%r: expected a number of seconds.", DEBUG_WRITE_DELAY_ENV, raw)
        return 0.0


@dataclass
class Flight:
    """One background save: what it saves, and its outcome once the thread ends."""

    step: int
    reason: str
    started: float
    gate: PublishGate = field(default_factory=PublishGate)
    thread: threading.Thread | None = None
    result: SaveResult | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class BackgroundSaver:
    """Runs one background save at a time for one rank; every rank owns one.

    ``writer`` must be a Comm of its own (see :meth:`Comm.sibling`), created
    at the same point on every rank.
    """

    def __init__(self, writer: Comm, root: Path, keep: int) -> None:
        self.writer = writer
        self.root = root
        self.keep = keep
        self.buffers = StagingBuffers()
        self.current: Flight | None = None
        self.abandoned: list[Flight] = []
        #: Seconds the last finished background save took from the save call to its commit.
        self.last_write_seconds: float | None = None

    def busy(self) -> bool:
        return self.current is not None and not self.current.done

    def start(self, *, run_id: str, step: int, reason: str,
              flatten_state: Callable[[], tuple[Mapping[str, torch.Tensor], list[str]]],
              trainer: Mapping[str, Any], layout: Mapping[str, Any]) -> Flight:
        """Collect the state, copy it into the staging buffers and start writing it.

        Returns once the copy is done. An error while collecting or copying is
        not raised here, where only this rank would see it: the writer reports
        it in the save's prepare phase, so every rank's save fails alike.
        """
        if self.current is not None:
            raise RuntimeError(f"the background save of step {self.current.step} was not collected")
        try:
            flat, json_keys = flatten_state()
            staged = self.buffers.stage(flat)

            def collected() -> tuple[Mapping[str, torch.Tensor], list[str]]:
                return staged, list(json_keys)
        except Exception as err:  # noqa: BLE001 - reported to every rank by the writer
            log.error("Collecting state for the background save of step %d failed:\n%s", step,
                      traceback.format_exc())
            failure = err

            def collected() -> tuple[Mapping[str, torch.Tensor], list[str]]:
                raise failure
        flight = Flight(step=step, reason=reason, started=time.monotonic())
        flight.thread = threading.Thread(
            target=self._write, name=f"resilient-save-{step}", daemon=True,
            args=(flight, collected, run_id, dict(trainer), dict(layout)))
        self.current = flight
        flight.thread.start()
        return flight

    def _write(self, flight: Flight, collected: Callable[[], tuple[Mapping[str, torch.Tensor], list[str]]],
               run_id: str, trainer: dict[str, Any], layout: dict[str, Any]) -> None:
        try:
            delay = _debug_write_delay()
            if delay:
                time.sleep(delay)
            flight.result = save_checkpoint(
                self.writer, self.root, run_id=run_id, step=flight.step, reason=flight.reason,
                flatten_state=collected, trainer=trainer, layout=layout, gate=flight.gate)
        except BaseException as err:  # noqa: BLE001 - handed to the training thread
            flight.error = err
            if not flight.gate.closed:
                log.error("The background save of step %d failed: %s", flight.step, err)
            return
        # From the save call to the commit, which is what a save still in flight is compared with.
        self.last_write_seconds = flight.elapsed
        if self.writer.rank == 0:
            try:
                apply_retention(self.root, run_id, self.keep, committed_step=flight.step)
            except (OSError, CheckpointError) as err:
                log.error("Retention after step %d failed: %s", flight.step, err)

    def take_finished(self) -> Flight | None:
        """Return the current save if its thread has ended, and forget it; None otherwise. Does not block."""
        flight = self.current
        if flight is None or not flight.done:
            return None
        self.current = None
        return flight

    def wait(self, timeout: float | None = None) -> Flight | None:
        """Wait for the current save to end and return it (forgotten), or None when there is none."""
        flight = self.current
        if flight is None:
            return None
        assert flight.thread is not None
        flight.thread.join(timeout)
        if flight.thread.is_alive():
            raise CheckpointError(f"the background save of step {flight.step} did not finish within {timeout:.0f} s")
        self.current = None
        return flight

    def remaining_estimate(self) -> float | None:
        """Estimated seconds until the current save commits, from the previous one's duration."""
        if self.current is None or self.current.done:
            return 0.0
        if self.last_write_seconds is None:
            return None
        return max(self.last_write_seconds - self.current.elapsed, 0.0)

    def close_gate(self) -> bool:
        """Stop the current save from publishing; False when it already is publishing or has published."""
        return self.current is None or self.current.gate.close()

    def abandon(self) -> Flight | None:
        """Forget the current save without waiting; it will not publish (see :meth:`close_gate`)."""
        flight, self.current = self.current, None
        if flight is not None:
            flight.gate.close()
            self.abandoned.append(flight)
        return flight

    def join_all(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every writer thread; True when none is left running."""
        deadline = time.monotonic() + timeout
        for flight in [*self.abandoned, *([self.current] if self.current else [])]:
            if flight.thread is not None:
                flight.thread.join(max(deadline - time.monotonic(), 0.0))
        return not any(not flight.done for flight in [*self.abandoned, *([self.current] if self.current else [])])
