"""Exception types raised by resilient."""

from __future__ import annotations

#: Exit status of a process that stopped because of preemption after its
#: checkpoint was committed: EX_TEMPFAIL from sysexits.h, "try again later".
EXIT_PREEMPTED = 75


class ResilientError(Exception):
    """Base class of every error raised by resilient."""


class ConfigError(ResilientError, ValueError):
    """A setting is invalid; the message names the setting, the value and the fix."""


class CheckpointError(ResilientError):
    """A checkpoint could not be saved or committed. No marker was written."""


class CheckpointLoadError(ResilientError):
    """A checkpoint could not be read back into the running job."""


class SignalSetupError(ResilientError):
    """Signal handlers could not be installed."""


class Preempted(SystemExit):
    """Raised on every rank after an agreed stop (preemption or deadline).

    It derives from ``SystemExit`` with code 75, so an uncaught instance ends the
    process with status 75, which launchers read as "checkpoint saved, restart me".
    ``checkpoint`` is the newest complete checkpoint: the stop step's, or the
    previous one when the grace period left no time to save the stop step.
    """

    def __init__(self, step: int, checkpoint: str) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.step = step
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        return f"preempted after step {self.step}; checkpoint committed at {self.checkpoint}"
