"""The supervised process tree: start the command, relay signals, reap, kill.

The launcher makes itself a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``),
so processes whose parent dies are re-parented to it instead of to init. They
stay visible as descendants, and a worker cannot escape the grace deadline
because torchrun or a shell wrapper died first.

Relaying follows one rule. A signal goes to every process in the tree that
has a handler for it (``SigCgt`` in ``/proc/PID/status``). Processes without
one are skipped, because the default action of TERM, HUP, USR1 and USR2 kills
them: a ``bash -c`` wrapper or a torchrun agent killed that way loses track of
the workers it waits for. Only when no process in the tree handles the
signal does it go to every process that does not ignore it, as a terminal's
Ctrl-C would.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from typing import IO, Mapping, Sequence

import psutil

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants this process's children. Returns False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


_PR_SET_PDEATHSIG = 1


def _terminate_with_parent() -> None:
    """Ask the kernel to SIGTERM the command when the launcher dies, even by SIGKILL.

    Runs in the child between fork and exec. torchrun forwards that SIGTERM to
    its workers, which save and exit. A ``bash -c`` wrapper does not forward
    it, so its child keeps running.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _signal_masks(pid: int) -> tuple[int, int] | None:
    """Return the (caught, ignored) signal bit masks of ``pid``, or None when it is gone."""
    caught = ignored = None
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    caught = int(line.split()[1], 16)
                elif line.startswith("SigIgn:"):
                    ignored = int(line.split()[1], 16)
    except OSError:
        return None
    if caught is None or ignored is None:
        return None
    return caught, ignored


def handles(pid: int, sig: int) -> bool | None:
    """True if ``pid`` has a handler for ``sig``, False if not, None if it is gone."""
    masks = _signal_masks(pid)
    return None if masks is None else bool(masks[0] >> (sig - 1) & 1)


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    name: str
    command: str

    @classmethod
    def of(cls, process: psutil.Process) -> "ProcessInfo":
        try:
            with process.oneshot():
                return cls(process.pid, process.name(), " ".join(process.cmdline())[:200])
        except psutil.Error:
            return cls(process.pid, "?", "")

    def describe(self) -> str:
        return f"pid {self.pid} ({self.command or self.name})"


class ProcessTree:
    """The command's process and every descendant of this launcher process."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str], *, output: IO[bytes] | None = None) -> None:
        """Start ``command``; with ``output``, its stdout and stderr go to that file instead of ours."""
        # Its own session: a terminal's Ctrl-C reaches only the launcher, which
        # relays it once, instead of every process twice.
        self.root = subprocess.Popen(list(command), env=dict(env), start_new_session=True,
                                     preexec_fn=_terminate_with_parent, stdout=output,
                                     stderr=subprocess.STDOUT if output is not None else None)
        self.root_status: int | None = None

    @property
    def pid(self) -> int:
        return self.root.pid

    def processes(self) -> list[psutil.Process]:
        """Return every live (non-zombie) descendant of the launcher, the command first."""
        try:
            found = psutil.Process().children(recursive=True)
        except psutil.Error:
            return []
        alive = []
        for process in found:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except psutil.Error:
                continue
        alive.sort(key=lambda process: process.pid != self.root.pid)
        return alive

    def reap(self) -> None:
        """Collect exit statuses of exited children; remember the command's own."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.root.pid:
                self.root_status = os.waitstatus_to_exitcode(status)
                self.root.returncode = self.root_status

    @property
    def root_exited(self) -> bool:
        return self.root_status is not None

    def empty(self) -> bool:
        self.reap()
        return self.root_exited and not self.processes()

    def relay(self, sig: int) -> list[ProcessInfo]:
        """Send ``sig`` to the processes the relay rule picks; return them."""
        processes = self.processes()
        catching = [process for process in processes if handles(process.pid, sig)]
        if catching:
            targets = catching
        else:
            targets = []
            for process in processes:
                masks = _signal_masks(process.pid)
                if masks is not None and not masks[1] >> (sig - 1) & 1:
                    targets.append(process)
        return self._send(targets, sig)

    def signal_all(self, sig: int) -> list[ProcessInfo]:
        return self._send(self.processes(), sig)

    @staticmethod
    def _send(targets: list[psutil.Process], sig: int) -> list[ProcessInfo]:
        sent = []
        for process in targets:
            info = ProcessInfo.of(process)  # before the signal, which may end it
            try:
                process.send_signal(sig)
                sent.append(info)
            except psutil.Error:
                continue
        return sent

    def kill_all(self) -> list[ProcessInfo]:
        """SIGKILL every live process of the tree; return what was killed."""
        killed = self.signal_all(signal.SIGKILL)
        if killed:
            log.debug("SIGKILLed %s.", ", ".join(info.describe() for info in killed))
        return killed
