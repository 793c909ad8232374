"""Read the workers' heartbeats; detect a hang and collect every rank's stack.

Workers write ``heartbeat-rank<R>.json`` into this attempt's launcher
directory (see :mod:`resilient.progress`). The watchdog starts once some rank
has completed a step, so process-group set-up and loading a checkpoint do not
count against the timeout. From then on, a hang is ``hang_timeout`` seconds in
which no rank completed a step or changed state. A save starting or ending
counts as a change.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil

from resilient.progress import PREEMPTED

log = logging.getLogger(__name__)

#: How long to wait for stack dumps to appear after asking for them.
DUMP_WAIT_SECONDS = 5.0


def read_heartbeats(directory: Path) -> list[dict[str, Any]]:
    records = []
    try:
        paths = sorted(directory.glob("heartbeat-rank*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # replaced between listing and reading, or written by something else
        if isinstance(record, dict):
            records.append(record)
    return records


def reached_step(records: list[dict[str, Any]]) -> bool:
    return any(int(record.get("steps_done") or 0) > 0 for record in records)


def all_preempted(records: list[dict[str, Any]]) -> bool:
    """Return True when every rank's heartbeat records a stop for preemption after its checkpoint."""
    return bool(records) and all(record.get("state") == PREEMPTED for record in records)


@dataclass
class HangReport:
    idle_seconds: float
    last_steps: dict[int, Any]
    stacks: dict[int, str] = field(default_factory=dict)
    stopped: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)


class Watchdog:
    """Detects that no local rank progressed for ``timeout`` seconds."""

    def __init__(self, directory: Path, timeout: float | None, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.timeout = timeout
        self._clock = clock

    def check(self) -> HangReport | None:
        if self.timeout is None:
            return None
        records = read_heartbeats(self.directory)
        if not reached_step(records):
            return None
        last_active = max(float(record.get("active_time") or 0.0) for record in records)
        idle = self._clock() - last_active
        if idle < self.timeout:
            return None
        return HangReport(idle, {int(record["rank"]): record.get("step") for record in records if "rank" in record})

    def dump_stacks(self, report: HangReport, tree_pids: set[int]) -> HangReport:
        """Ask every rank of the tree for its stacks and wait until they are written."""
        targets: dict[int, tuple[int, Path, int]] = {}
        for record in read_heartbeats(self.directory):
            pid, rank = record.get("pid"), record.get("rank")
            if not isinstance(pid, int) or not isinstance(rank, int) or pid not in tree_pids:
                continue
            path = self.directory / str(record.get("stacks", f"stacks-rank{rank:05d}.txt"))
            targets[rank] = (pid, path, _size(path))
            self._request_dump(pid, int(record.get("dump_signal") or 0), report)
        deadline = time.monotonic() + DUMP_WAIT_SECONDS
        pending = dict(targets)
        while pending and time.monotonic() < deadline:
            for rank, (pid, path, before) in list(pending.items()):
                if _size(path) > before and _settled(path):
                    report.stacks[rank] = _read_from(path, before)
                    del pending[rank]
            time.sleep(0.1)
        report.missing = sorted(pending)
        return report

    @staticmethod
    def _request_dump(pid: int, dump_signal: int, report: HangReport) -> None:
        if not dump_signal:
            return
        try:
            process = psutil.Process(pid)
            stopped = process.status() == psutil.STATUS_STOPPED
            os.kill(pid, dump_signal)
            if stopped:
                # A stopped process handles the dump signal only once continued.
                # It is about to be killed anyway, so continuing it costs nothing.
                report.stopped.append(pid)
                os.kill(pid, signal.SIGCONT)
        except (psutil.Error, ProcessLookupError, PermissionError) as err:
            log.warning("Cannot ask pid %d for its stacks: %s", pid, err)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _settled(path: Path) -> bool:
    """True once the file stopped growing for a moment (faulthandler writes in pieces)."""
    first = _size(path)
    time.sleep(0.2)
    return _size(path) == first


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, errors="replace") as handle:
            handle.seek(offset)
            return handle.read()
    except OSError:
        return ""
