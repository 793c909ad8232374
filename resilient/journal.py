"""The event journal: one JSON object per line in ``CKPT_DIR/journal.jsonl``.

Training processes and ``resilient run`` append to the same file. Each event
is written with one ``write`` on a descriptor opened with ``O_APPEND``, so
lines from different processes on one machine never interleave. On network
filesystems without atomic appends (NFS) a line can, rarely, be torn; readers
skip lines that do not parse and count them.

Every line has ``time`` (seconds since the epoch), ``event``, ``host`` and
``pid``; ``attempt`` when ``resilient run`` set ``RESILIENT_ATTEMPT``; the
rest depends on the event.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.jsonl"
ATTEMPT_ENV = "RESILIENT_ATTEMPT"

#: Event kinds, in the order they usually happen, with what each records.
EVENTS = {
    "start": "resilient run started the command (attempt, command, restart)",
    "resume": "training resumed from a checkpoint or started at step 0 (rank 0)",
    "signal": "a process received a stop signal (signal, pid, rank or relayed_to)",
    "stop": "the ranks agreed to stop at a step (step, reason)",
    "checkpoint": "a checkpoint was committed (step, reason, bytes, seconds)",
    "hang": "no rank made progress for the hang timeout (stacks, stopped processes)",
    "kill": "processes were SIGKILLed (why, processes)",
    "exit": "the command exited (status, outcome)",
    "restart": "resilient run starts the command again (delay, reason)",
    "startup_failure": "the command failed before its first step twice in a row",
    "requeue": "resilient run asked SLURM to requeue the job (target, accepted)",
    "finish": "resilient run exited (status, outcome)",
}


def journal_path(root: str | os.PathLike[str]) -> Path:
    return Path(root) / JOURNAL_NAME


def current_attempt() -> int | None:
    raw = os.environ.get(ATTEMPT_ENV, "").strip()
    return int(raw) if raw.isdigit() else None


class Journal:
    """Append events to ``root/journal.jsonl``. Write errors (``OSError``) are logged, not raised.

    A journal that cannot be written must not stop training or a save, so
    the first write error becomes one warning and the journal turns itself off.
    """

    def __init__(self, root: str | os.PathLike[str], **common: Any) -> None:
        self.path = journal_path(root)
        self._common = {"host": socket.gethostname(), **common}
        self._broken = False

    def append(self, event: str, **fields: Any) -> None:
        if self._broken:
            return
        attempt = current_attempt()
        record: dict[str, Any] = {"time": round(time.time(), 3), "event": event, **self._common,
                                  "pid": os.getpid()}
        if attempt is not None:
            record["attempt"] = attempt
        record.update(fields)
        line = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as err:
            self._broken = True
            log.warning("Cannot write the event journal %s (%s); events are no longer recorded there.",
                        self.path, err)


@dataclass(frozen=True)
class JournalContents:
    events: list[dict[str, Any]]
    skipped_lines: int


def read_journal(root: str | os.PathLike[str]) -> JournalContents:
    """Read every event of ``root/journal.jsonl`` in file order; a missing file has none."""
    path = journal_path(root)
    events: list[dict[str, Any]] = []
    skipped = 0
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return JournalContents([], 0)
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("event"), str):
            events.append(record)
        else:
            skipped += 1
    return JournalContents(events, skipped)
