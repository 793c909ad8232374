"""The job-wide attempt counter, kept beside the checkpoints.

``CKPT_DIR/.resilient/attempts.json`` lists recent attempts: number, key,
start and end time, exit status, and whether any rank finished a training
step. It lives with the checkpoints so it survives requeues, and every node's
launcher uses the same file: launchers that start with the same *key* share
one attempt number. Under SLURM the key is the job id and restart count, so
the launchers on all nodes of one allocation agree without talking to each
other. Elsewhere each launcher start is its own attempt unless
``RESILIENT_ATTEMPT_KEY`` gives a shared key.

Updates hold an exclusive ``flock`` on ``attempts.lock`` and replace the
file atomically.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from resilient.checkpoint.fsutil import write_json_atomic

STATE_DIR = ".resilient"
ATTEMPTS_FILE = "attempts.json"
ATTEMPT_KEY_ENV = "RESILIENT_ATTEMPT_KEY"
KEEP_RECORDS = 100

log = logging.getLogger(__name__)


def default_key(local_start: int) -> str:
    """Return the attempt key of this launcher's ``local_start``-th start of the command (0-based)."""
    shared = os.environ.get(ATTEMPT_KEY_ENV, "").strip()
    if shared:
        return f"{shared}:{local_start}"
    job = os.environ.get("SLURM_JOB_ID", "").strip()
    if job:
        restart = os.environ.get("SLURM_RESTART_COUNT", "0").strip() or "0"
        return f"slurm:{job}:{restart}:{local_start}"
    return f"local:{socket.gethostname()}:{os.getpid()}:{local_start}"


class AttemptStore:
    """Read and update ``attempts.json`` under a lock."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir
        self.path = self.directory / ATTEMPTS_FILE

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "attempts.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            yield data
            data["attempts"] = data["attempts"][-KEEP_RECORDS:]
            write_json_atomic(self.path, data)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"attempts": []}
        except (OSError, ValueError) as err:
            return self._reset(f"is unreadable ({err})")
        if not isinstance(data, dict) or not isinstance(data.get("attempts"), list):
            return self._reset("does not contain an object with an 'attempts' list")
        records = [record for record in data["attempts"]
                   if isinstance(record, dict) and isinstance(record.get("attempt"), int)]
        if len(records) != len(data["attempts"]):
            log.warning("Ignoring %d malformed records in %s.", len(data["attempts"]) - len(records), self.path)
        data["attempts"] = records
        if not isinstance(data.get("next"), int):
            data.pop("next", None)
        return data

    def _highest_directory(self) -> int:
        """Return the highest attempt number that has a directory, so a damaged history never reuses one."""
        numbers = [int(path.name.split("-", 1)[1]) for path in self.directory.glob("attempt-*")
                   if path.name.split("-", 1)[1].isdigit()]
        return max(numbers, default=0)

    def _reset(self, problem: str) -> dict[str, Any]:
        """Start a new history after the highest attempt number that left a directory."""
        following = self._highest_directory() + 1
        log.warning("%s %s; starting a new attempt history at attempt %d. Delete the file to silence this.",
                    self.path, problem, following)
        return {"attempts": [], "next": following}

    def records(self) -> list[dict[str, Any]]:
        return self._read()["attempts"]

    def begin(self, key: str) -> int:
        """Return the attempt number for ``key``, starting a new attempt if no launcher has yet."""
        with self._locked() as data:
            attempts = data["attempts"]
            for record in reversed(attempts):
                if record.get("key") == key:
                    hosts = record.get("hosts")
                    record["hosts"] = [*(hosts if isinstance(hosts, list) else []), socket.gethostname()]
                    return int(record["attempt"])
            number = max([self._highest_directory() + 1, int(data.get("next", 0)),
                          *(int(record["attempt"]) + 1 for record in attempts)])
            attempts.append({"attempt": number, "key": key, "started": time.time(),
                             "hosts": [socket.gethostname()], "status": None, "reached_step": False})
            data["next"] = number + 1
            return number

    def finish(self, number: int, status: int, reached_step: bool, outcome: str) -> None:
        with self._locked() as data:
            for record in data["attempts"]:
                if record.get("attempt") == number:
                    record["ended"] = time.time()
                    record["status"] = status
                    record["outcome"] = outcome
                    record["reached_step"] = bool(record.get("reached_step")) or reached_step
                    return
