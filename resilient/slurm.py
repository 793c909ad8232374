"""The SLURM job this process runs in: ids, restart count, end time, requeue.

Every call to a SLURM command goes through a ``runner`` with the signature of
:func:`subprocess.run`, given an argument list and never a shell, so tests
can check the exact arguments.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Mapping, Sequence

log = logging.getLogger(__name__)

Runner = Callable[..., "subprocess.CompletedProcess[str]"]
COMMAND_TIMEOUT = 30.0


def _integer(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    return int(value) if value.isdigit() else None


@dataclass(frozen=True)
class SlurmJob:
    """Identity of the SLURM job (or array task) from its environment."""

    job_id: str
    array_job_id: str | None = None
    array_task_id: str | None = None
    restart_count: int = 0
    node_id: int = 0
    end_time: float | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "SlurmJob | None":
        """Return the job described by ``SLURM_*`` variables, or None outside SLURM."""
        env = os.environ if env is None else env
        job_id = env.get("SLURM_JOB_ID", "").strip()
        if not job_id:
            return None
        end = env.get("SLURM_JOB_END_TIME", "").strip()  # set by SLURM 23.02 and later
        return cls(
            job_id=job_id,
            array_job_id=env.get("SLURM_ARRAY_JOB_ID", "").strip() or None,
            array_task_id=env.get("SLURM_ARRAY_TASK_ID", "").strip() or None,
            restart_count=_integer(env, "SLURM_RESTART_COUNT") or 0,
            node_id=_integer(env, "SLURM_NODEID") or 0,
            end_time=float(end) if end.isdigit() else None,
        )

    @property
    def requeue_target(self) -> str:
        """The id ``scontrol requeue`` needs: ``ARRAYJOB_TASK`` for an array task, so the rest of the array stays."""
        if self.array_job_id and self.array_task_id:
            return f"{self.array_job_id}_{self.array_task_id}"
        return self.job_id


def _run(runner: Runner, command: Sequence[str]) -> tuple[bool, str]:
    """Run ``command``; return (succeeded, its combined output or the error)."""
    try:
        done = runner(list(command), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except FileNotFoundError:
        return False, f"{command[0]} was not found on PATH"
    except (OSError, subprocess.SubprocessError) as err:
        return False, str(err)
    output = ((done.stdout or "") + (done.stderr or "")).strip()
    if done.returncode != 0:
        return False, f"exit status {done.returncode}: {output}"
    return True, output


def query_end_time(job: SlurmJob, runner: Runner = subprocess.run) -> float | None:
    """Return the job's end time (seconds since the epoch), or None when it has no time limit.

    Uses ``SLURM_JOB_END_TIME`` when SLURM set it, otherwise ``squeue``.
    """
    if job.end_time is not None:
        return job.end_time
    succeeded, output = _run(runner, ["squeue", "--noheader", "--jobs", job.job_id, "--format", "%e"])
    if not succeeded:
        log.warning("Cannot read the end time of SLURM job %s: %s", job.job_id, output)
        return None
    text = output.splitlines()[0].strip() if output else ""
    if text in ("", "N/A", "NONE", "Unknown"):
        return None
    try:
        # squeue prints the end time in the local time zone, without an offset.
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        log.warning("Cannot parse the end time %r of SLURM job %s printed by squeue.", text, job.job_id)
        return None


def requeue(job: SlurmJob, runner: Runner = subprocess.run) -> bool:
    """Ask SLURM to requeue ``job`` with ``scontrol requeue``; return whether it accepted.

    A failure (no ``scontrol`` in a container, a job without ``--requeue``) is
    logged as an error with the command and its output. Errors from running
    ``scontrol`` are returned as False, not raised, because the checkpoint is
    already committed and exit status 75 still signals an outer wrapper to
    start the job again.
    """
    command = ["scontrol", "requeue", job.requeue_target]
    # Logged first: an accepted requeue cancels the job's processes, possibly this one, right away.
    log.info("Requeueing SLURM job %s: %s", job.requeue_target, " ".join(command))
    started = time.monotonic()
    succeeded, output = _run(runner, command)
    if succeeded:
        log.info("Requeued SLURM job %s (%s) in %.1f s.", job.requeue_target, " ".join(command),
                 time.monotonic() - started)
    else:
        log.error("Requeueing SLURM job %s failed: %s: %s. The checkpoint is committed; exiting 75 so that a "
                  "wrapper can start the job again.", job.requeue_target, " ".join(command), output)
    return succeeded
