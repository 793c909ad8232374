"""Progress reports of a training process: journal events and heartbeats.

The journal (:mod:`resilient.journal`) is written whenever a checkpoint
directory exists. Heartbeats exist only under ``resilient run``, which sets
``RESILIENT_LAUNCHER_DIR`` to a directory of the current attempt on this
machine. There each rank keeps ``heartbeat-rank<R>.json`` up to date: its pid,
last completed step and state (``running``, ``saving``, ``preempted``,
``finished``). The launcher reads them to detect hangs, to tell a start-up
failure from a later crash, and to learn that workers behind torchrun exited
75 although torchrun reports 1.

Each rank also registers :mod:`faulthandler` on :data:`DUMP_SIGNAL`, writing
every thread's Python stack to ``stacks-rank<R>.txt`` in the same directory.
The handler runs in C, so it works while the main thread is stuck in a
collective.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import IO, Any

from resilient.journal import Journal
from resilient.signals import SignalRecorder

log = logging.getLogger(__name__)

LAUNCHER_DIR_ENV = "RESILIENT_LAUNCHER_DIR"
HEARTBEAT_INTERVAL_ENV = "RESILIENT_HEARTBEAT_INTERVAL"
CKPT_DIR_ENV = "RESILIENT_CKPT_DIR"

#: The signal on which workers dump their Python stacks. A real-time signal,
#: so no library or scheduler uses it for anything else.
DUMP_SIGNAL = signal.SIGRTMIN + 4

RUNNING, SAVING, PREEMPTED, FINISHED = "running", "saving", "preempted", "finished"


def heartbeat_name(rank: int) -> str:
    return f"heartbeat-rank{rank:05d}.json"


def stacks_name(rank: int) -> str:
    return f"stacks-rank{rank:05d}.txt"


def _interval_from_env() -> float:
    raw = os.environ.get(HEARTBEAT_INTERVAL_ENV, "").strip()
    try:
        return max(0.0, float(raw)) if raw else 1.0
    except ValueError:
        log.warning("Ignoring %s=%r: not a number of seconds; heartbeats are written every 1 s.",
                    HEARTBEAT_INTERVAL_ENV, raw)
        return 1.0


class _Heartbeat:
    """One rank's heartbeat file, rewritten atomically at most every ``interval`` seconds."""

    def __init__(self, directory: Path, rank: int) -> None:
        self.path = directory / heartbeat_name(rank)
        self._tmp = directory / f".{heartbeat_name(rank)}.{os.getpid()}"
        self.interval = _interval_from_env()
        self._record: dict[str, Any] = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(),
                                        "step": None, "state": RUNNING, "dump_signal": int(DUMP_SIGNAL),
                                        "stacks": stacks_name(rank)}
        self._written = float("-inf")

    def beat(self, step: int | None, state: str, *, stepped: bool = False, force: bool = False) -> None:
        """Record ``state``; ``stepped`` means a training step just completed.

        ``active_time`` moves on every completed step and every state change;
        the launcher's hang watchdog compares it with the clock.
        """
        now = time.time()
        changed = state != self._record["state"]
        self._record["state"] = state
        if step is not None:
            self._record["step"] = step
        if stepped:
            self._record["steps_done"] = self._record.get("steps_done", 0) + 1
        if stepped or changed or force:
            self._record["active_time"] = now
        if not (force or changed or now - self._written >= self.interval):
            return
        self._record["time"] = now
        try:
            self._tmp.write_text(json.dumps(self._record))
            os.replace(self._tmp, self.path)
        except OSError as err:
            log.warning("Cannot write heartbeat %s: %s", self.path, err)
        self._written = now


class ProgressReporter:
    """Journal events and heartbeats of one rank. File errors are logged, not raised."""

    def __init__(self, root: Path, rank: int, recorder: SignalRecorder) -> None:
        self.rank = rank
        self._recorder = recorder
        self._signals_logged = 0
        self._signals_seen: set[str] = set()
        self.journal = Journal(root, rank=rank)
        self._heartbeat: _Heartbeat | None = None
        self._stacks: IO[str] | None = None
        self._warn_on_other_dir(root)
        launcher_dir = os.environ.get(LAUNCHER_DIR_ENV, "").strip()
        if launcher_dir:
            self._start_heartbeat(Path(launcher_dir))

    @staticmethod
    def _warn_on_other_dir(root: Path) -> None:
        expected = os.environ.get(CKPT_DIR_ENV, "").strip()
        if expected and os.path.realpath(expected) != os.path.realpath(root):
            log.warning("resilient run was given --ckpt-dir %s but this process checkpoints to %s; the launcher "
                        "cannot see this run's journal or progress. Pass the same directory to both.",
                        expected, root)

    def _start_heartbeat(self, directory: Path) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._stacks = open(directory / stacks_name(self.rank), "a")  # noqa: SIM115 - held until close()
            faulthandler.register(DUMP_SIGNAL, file=self._stacks, all_threads=True, chain=False)
        except (OSError, RuntimeError, ValueError) as err:
            log.warning("Cannot prepare stack dumps in %s (%s); a hang will be reported without stacks.",
                        directory, err)
        self._heartbeat = _Heartbeat(directory, self.rank)
        self._heartbeat.beat(None, RUNNING, force=True)

    # -- events ---------------------------------------------------------------

    def resumed(self, step: int, checkpoint: Path | None) -> None:
        if self.rank == 0:
            restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT")
            self.journal.append("resume", step=step, checkpoint=str(checkpoint) if checkpoint else None,
                                torchelastic_restart=int(restarts) if restarts and restarts.isdigit() else None)

    def step_done(self, step: int) -> None:
        events = self._recorder.events
        for event in events[self._signals_logged:]:
            # torchrun and resilient run may both deliver one stop signal; journal each kind once.
            if event.name not in self._signals_seen:
                self._signals_seen.add(event.name)
                self.journal.append("signal", signal=event.name, received_at=round(event.wall_time, 3))
        self._signals_logged = len(events)
        if self._heartbeat is not None:
            self._heartbeat.beat(step, RUNNING, stepped=True)

    def stopping(self, step: int, reason: str) -> None:
        if self.rank == 0:
            self.journal.append("stop", step=step, reason=reason)

    def saving(self, step: int) -> None:
        if self._heartbeat is not None:
            self._heartbeat.beat(step, SAVING, force=True)

    def committed(self, step: int, reason: str, total_bytes: int, seconds: float, path: Path) -> None:
        if self.rank == 0:
            self.journal.append("checkpoint", step=step, reason=reason, bytes=total_bytes,
                                seconds=round(seconds, 3), path=str(path))
        if self._heartbeat is not None:
            self._heartbeat.beat(step, RUNNING, force=True)

    def exiting(self, step: int, state: str) -> None:
        if self._heartbeat is not None:
            self._heartbeat.beat(step, state, force=True)

    def close(self) -> None:
        if self._stacks is not None:
            faulthandler.unregister(DUMP_SIGNAL)
            self._stacks.close()
            self._stacks = None
