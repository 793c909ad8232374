"""Settings of a Supervisor, validated when the object is built."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from resilient.errors import ConfigError
from resilient.signals import parse_signals, signals_from_env


DATA_ON_RESIZE = ("error", "restart_epoch")
ASYNC_BUSY = ("wait", "skip")


@dataclass(frozen=True, kw_only=True)
class Config:
    """Settings for checkpointing and preemption handling.

    Attributes:
        ckpt_dir: Directory for this run's checkpoints.
        save_every: Save a periodic checkpoint every this many steps; None saves only on
            preemption and at the end.
        save_interval: Also save every this many seconds (checked at agreement steps, and agreed,
            so every rank saves the same step), or ``"auto"`` for the Young–Daly interval
            sqrt(2 · save cost · MTBF) from the measured save cost. None disables time-based saves.
        mtbf: Mean time between failures in seconds for ``save_interval="auto"``; None observes it
            from the run's journal.
        async_save: Periodic, time-based and requested saves copy the state to host memory and write
            it on a background thread; training goes on meanwhile. Stop and final saves stay synchronous.
        async_busy: What a save due while a background save is still being written does: ``"wait"``
            for it (the default) or ``"skip"`` this save.
        keep: Number of complete checkpoints to keep; older ones are removed after a newer one commits.
        check_every: Run the stop agreement every this many steps.
        signals: Signal names that request a stop; None reads ``RESILIENT_SIGNALS`` or uses
            SIGTERM and SIGUSR1.
        collective_timeout: Seconds any of resilient's collectives waits for the other ranks
            before failing, so a dead or stopped rank cannot hang the others forever.
        run_id: Identity of the run; None takes the one stored in ``ckpt_dir/run.json`` or creates one.
        resume_from: Resume from this checkpoint directory instead of the newest complete one.
        exit_on_preemption: After the preemption checkpoint, raise ``Preempted`` (exit status 75).
            When False the step loop just ends and ``Supervisor.preempted`` is True.
        grace_period: Seconds between a stop signal and the scheduler's SIGKILL (SLURM's KillWait,
            30 s by default). When set, resilient warns once measured step and save times show that
            a stop with this ``check_every`` would not be saved in time.
        data_on_resize: What ``train()`` does when resuming mid-epoch at another world size with a
            sampler that cannot redistribute the rest of the epoch (anything but ``ResumableSampler``):
            ``"error"`` raises ConfigError; ``"restart_epoch"`` starts that epoch over, so samples
            seen before the interruption are seen again.
        deadline: When the job is killed without warning, in seconds since the epoch. ``"slurm"``
            (the default) takes the SLURM job's end time, if any; None disables deadline saves.
        deadline_margin: Seconds before the deadline at which to stop and save; None derives it
            from the measured save and step times (at least 30 s).
    """

    ckpt_dir: str | os.PathLike
    save_every: int | None = None
    save_interval: float | str | None = None
    mtbf: float | None = None
    async_save: bool = False
    async_busy: str = "wait"
    keep: int = 3
    check_every: int = 1
    signals: tuple[str, ...] | None = None
    collective_timeout: float = 600.0
    run_id: str | None = None
    resume_from: str | os.PathLike | None = None
    exit_on_preemption: bool = True
    data_on_resize: str = "error"
    grace_period: float | None = None
    deadline: float | str | None = "slurm"
    deadline_margin: float | None = None

    def __post_init__(self) -> None:
        if not str(self.ckpt_dir):
            raise ConfigError("ckpt_dir is empty; pass the directory that should hold the checkpoints")
        self._check_positive_int("save_every", self.save_every, allow_none=True)
        self._check_positive_int("keep", self.keep)
        self._check_positive_int("check_every", self.check_every)
        if isinstance(self.collective_timeout, bool) or not isinstance(self.collective_timeout, (int, float)) \
                or not self.collective_timeout > 0:
            raise ConfigError(f"collective_timeout must be a positive number of seconds, got {self.collective_timeout!r}")
        if self.signals is not None:
            names = (self.signals,) if isinstance(self.signals, str) else self.signals
            try:
                parsed = parse_signals(names)
            except ConfigError as err:
                raise ConfigError(f"signals={self.signals!r}: {err}") from None
            object.__setattr__(self, "signals", tuple(sig.name for sig in parsed))
        else:
            signals_from_env()  # reject an invalid RESILIENT_SIGNALS now, not at install time
        if self.grace_period is not None and (isinstance(self.grace_period, bool)
                                              or not isinstance(self.grace_period, (int, float))
                                              or not self.grace_period > 0):
            raise ConfigError(f"grace_period must be a positive number of seconds or None, got {self.grace_period!r}")
        if not (self.deadline is None or self.deadline == "slurm" or (
                isinstance(self.deadline, (int, float)) and not isinstance(self.deadline, bool) and self.deadline > 0)):
            raise ConfigError(f"deadline must be 'slurm', None or an end time in seconds since the epoch, "
                              f"got {self.deadline!r}")
        if self.deadline_margin is not None and (isinstance(self.deadline_margin, bool)
                                                 or not isinstance(self.deadline_margin, (int, float))
                                                 or not self.deadline_margin > 0):
            raise ConfigError(f"deadline_margin must be a positive number of seconds or None, "
                              f"got {self.deadline_margin!r}")
        if not (self.save_interval is None or self.save_interval == "auto" or (
                isinstance(self.save_interval, (int, float)) and not isinstance(self.save_interval, bool)
                and 0 < self.save_interval < math.inf)):
            raise ConfigError(f"save_interval must be a positive number of seconds, 'auto' or None, "
                              f"got {self.save_interval!r}")
        if self.mtbf is not None and (isinstance(self.mtbf, bool) or not isinstance(self.mtbf, (int, float))
                                      or not 0 < self.mtbf < math.inf):
            raise ConfigError(f"mtbf must be a positive number of seconds or None, got {self.mtbf!r}")
        if self.mtbf is not None and self.save_interval != "auto":
            raise ConfigError(f"mtbf={self.mtbf!r} only sets the adaptive save interval; pass save_interval='auto' "
                              f"with it (save_interval is {self.save_interval!r}), or drop mtbf")
        if not isinstance(self.async_save, bool):
            raise ConfigError(f"async_save must be True or False, got {self.async_save!r}")
        if self.async_busy not in ASYNC_BUSY:
            raise ConfigError(f"async_busy must be one of {', '.join(map(repr, ASYNC_BUSY))}, got {self.async_busy!r}")
        if self.data_on_resize not in DATA_ON_RESIZE:
            raise ConfigError(f"data_on_resize must be one of {', '.join(map(repr, DATA_ON_RESIZE))}, "
                              f"got {self.data_on_resize!r}")
        if self.run_id is not None and (not self.run_id or "/" in self.run_id):
            raise ConfigError(f"run_id {self.run_id!r} is invalid; use a non-empty name without '/'")

    @staticmethod
    def _check_positive_int(name: str, value: object, *, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            hint = " or None" if allow_none else ""
            raise ConfigError(f"{name} must be an integer of at least 1{hint}, got {value!r}")

    @property
    def root(self) -> Path:
        return Path(self.ckpt_dir).expanduser()
