"""One job per checkpoint directory: an exclusive lock held by rank 0 while it trains.

Two jobs saving into the same directory would interleave staging
directories, retention and ``run.json``, and each could delete or supersede
the other's checkpoints. Rank 0 of a job therefore takes an exclusive
``flock`` on ``CKPT_DIR/.resilient/lock`` from resume until the Supervisor
closes, and writes its holder record (host, pid, start time, run id) into the file.

The kernel releases a ``flock`` when its process dies, however it dies, so a
lock left by a killed job is free at once. Its holder record stays behind,
so the next job logs that it takes over from the dead holder and writes its
own record. On NFS, Linux (since 2.6.12) emulates ``flock`` with ``fcntl``
byte-range locks on the whole file, which the server sees (flock(2), NOTES),
unless the file system is mounted with ``local_lock=flock`` or ``all``.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from resilient._logging import get_logger
from resilient.errors import ConfigError

log = get_logger(__name__)

LOCK_RELATIVE_PATH = Path(".resilient") / "lock"
#: Set to 0 to skip the lock, for example to inspect a directory while its job still runs.
LOCK_ENV = "RESILIENT_LOCK"


def lock_path(root: Path) -> Path:
    return root / LOCK_RELATIVE_PATH


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started_at")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) \
        else "an unknown time"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started at {when}"
            f" (run {holder.get('run_id') or '?'})")


def _read_holder(handle: Any) -> dict[str, Any]:
    handle.seek(0)
    try:
        holder = json.loads(handle.read() or "{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


class DirectoryLock:
    """The exclusive lock of one checkpoint directory, held until :meth:`release`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = lock_path(root)
        self._handle: Any = None
        self._started_at = 0.0

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self, run_id: str | None = None) -> None:
        """Take the lock or raise ConfigError naming the job that holds it."""
        if os.environ.get(LOCK_ENV, "").strip() == "0":
            log.warning("%s=0: not locking %s; another job writing there can corrupt this run's checkpoints.",
                        LOCK_ENV, self.root)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(handle)
            handle.close()
            raise ConfigError(
                f"checkpoint directory {self.root} is in use by another job: {_describe(holder)}. Two jobs saving "
                f"into one directory corrupt each other's checkpoints. Stop that job or use another ckpt_dir; if "
                f"you are sure it no longer writes here (a lock on a file system without working locks), set "
                f"{LOCK_ENV}=0 to skip the lock."
            ) from None
        previous = _read_holder(handle)
        if previous and previous.get("pid") != os.getpid():
            log.warning("Taking over the lock of %s from a job that is gone: %s.", self.root, _describe(previous))
        self._handle = handle
        self._started_at = round(time.time(), 3)
        self.record(run_id)

    def record(self, run_id: str | None) -> None:
        """Write this process as the holder, with ``run_id`` once it is known."""
        if self._handle is None:
            return
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": self._started_at, "run_id": run_id}
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(json.dumps(holder) + "\n")
        self._handle.flush()

    def release(self) -> None:
        if self._handle is None:
            return
        try:
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.flush()
        except OSError as err:
            log.debug("Could not clear the lock record %s: %s", self.path, err)
        fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None


def read_lock_holder(root: Path) -> dict[str, Any] | None:
    """Return the holder record of ``root``'s lock if a live process holds it, else None."""
    path = lock_path(root)
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(handle) or {"pid": None}
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return None
