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


class AgreementError(ResilientError, RuntimeError):
    """The stop agreement did not complete on every rank: a rank is stopped, hung or gone.

    Nothing is saved for the stop it was deciding, so the newest complete
    checkpoint stays the one to resume from.
    """


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



def failures_by_rank(err: BaseException) -> list[tuple[int | None, BaseException]]:
    """Return the per-rank exceptions inside DCP's ``CheckpointException``, or ``[(None, err)]`` otherwise."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        return [(rank, failures[rank][0]) for rank in sorted(failures)]
    return [(None, err)]


def describe_failure(err: BaseException) -> str:
    """Summarise an error of a DCP save or load in one line.

    DCP's ``CheckpointException`` prints every rank's traceback; this gives one
    ``rank N: Type: message`` part per failed rank instead. A tensor that
    ``weights_only`` loading refused is named as such, because torch's own
    message suggests ``weights_only=False``, which is what a crafted file wants.
    """
    parts = []
    for rank, exc in failures_by_rank(err):
        text = str(exc).strip()
        refused = next((line.strip() for line in text.splitlines() if "WeightsUnpickler error" in line), None)
        if refused is not None:
            text = ("a stored tensor holds a pickle that is not plain tensor data, and weights_only loading "
                    f"refused it ({refused})")
        else:
            text = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        parts.append(text if rank is None else f"rank {rank}: {text}")
    return "; ".join(parts)
