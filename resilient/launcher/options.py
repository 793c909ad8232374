"""Settings of ``resilient run`` and its exit statuses."""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field
from pathlib import Path

from resilient.errors import ConfigError
from resilient.signals import parse_signals

DEFAULT_RELAY = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2")
# Signals that job control and the kernel use for other purposes.
_NOT_STOP_SIGNALS = {signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH, signal.SIGTSTP, signal.SIGTTIN,
                     signal.SIGTTOU, signal.SIGPIPE, signal.SIGALRM, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE,
                     signal.SIGILL}

#: No rank made progress for the hang timeout, and no restarts were left.
EXIT_HUNG = 124
#: The command could not be found, or is not executable (as a shell reports them).
EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126
#: The grace period ran out and the rest of the tree was SIGKILLed (128 + 9, as a shell reports it).
EXIT_KILLED = 128 + int(signal.SIGKILL)


def _number(name: str, value: float, minimum: float, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name} must be a number of at least {minimum:g}, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class LaunchOptions:
    """Settings of ``resilient run``: the command, its checkpoint directory, signals, deadlines and restarts.

    ``ckpt_dir`` is the directory the training script checkpoints to, and the
    journal and the attempt counter live there too. Without it there is no
    journal, and the counter starts at 1 on every launch.
    """

    command: tuple[str, ...]
    ckpt_dir: Path | None = None
    signals: tuple[signal.Signals, ...] = field(default_factory=lambda: parse_signals(DEFAULT_RELAY))
    grace: float = 30.0
    max_restarts: int = 0
    backoff: float = 1.0
    max_backoff: float = 60.0
    hang_timeout: float | None = None
    requeue: bool = False
    poll_interval: float = 0.1

    def __post_init__(self) -> None:
        if not self.command:
            raise ConfigError("no command given; put it after '--', for example: resilient run -- torchrun ...")
        _number("grace", self.grace, 0)
        _number("backoff", self.backoff, 0)
        _number("max_backoff", self.max_backoff, 0)
        _number("poll_interval", self.poll_interval, 0.01)
        _number("hang_timeout", self.hang_timeout, 1, allow_none=True)
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ConfigError(f"max_restarts must be an integer of at least 0, got {self.max_restarts!r}")
        if not self.signals:
            raise ConfigError("signals is empty; relay at least SIGTERM")
        harmless = [sig.name for sig in self.signals if sig in _NOT_STOP_SIGNALS]
        if harmless:
            raise ConfigError(f"signals contains {', '.join(harmless)}, which do not ask a process to stop; "
                              "relay stop signals such as SIGTERM, SIGUSR1 or SIGUSR2")
        if self.ckpt_dir is not None and self.ckpt_dir.exists() and not self.ckpt_dir.is_dir():
            raise ConfigError(f"ckpt_dir {self.ckpt_dir} exists and is not a directory; pass the checkpoint "
                              "directory of the run")
