"""resilient.slurm without a cluster: the job environment and the exact scontrol and squeue arguments.

The runner is injected, so these tests record the argument lists instead of
calling SLURM; the tests marked ``slurm`` run the same paths on a real cluster.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path

from resilient.slurm import SlurmJob, query_end_time, requeue


class Recorder:
    def __init__(self, returncode: int = 0, stdout: str = "", stderr: str = "") -> None:
        self.calls: list[list[str]] = []
        self.result = (returncode, stdout, stderr)

    def __call__(self, command, **kwargs):
        self.calls.append(command)
        assert "shell" not in kwargs, "SLURM commands must run without a shell"
        returncode, stdout, stderr = self.result
        return subprocess.CompletedProcess(command, returncode, stdout, stderr)


def test_job_from_environment() -> None:
    env = {"SLURM_JOB_ID": "105", "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "5",
           "SLURM_RESTART_COUNT": "2", "SLURM_NODEID": "1", "SLURM_JOB_END_TIME": "1800000000"}
    job = SlurmJob.from_env(env)
    assert job == SlurmJob("105", "100", "5", restart_count=2, node_id=1, end_time=1800000000.0)
    assert SlurmJob.from_env({}) is None


def test_requeue_targets_the_array_task() -> None:
    runner = Recorder()
    assert requeue(SlurmJob("105", "100", "5"), runner)
    assert runner.calls == [["scontrol", "requeue", "100_5"]]


def test_requeue_of_a_plain_job() -> None:
    runner = Recorder()
    assert requeue(SlurmJob("42"), runner)
    assert runner.calls == [["scontrol", "requeue", "42"]]


def test_requeue_failure_is_logged_not_raised(caplog) -> None:
    runner = Recorder(returncode=1, stderr="scontrol: error: Requeue of job 42 not permitted")
    assert not requeue(SlurmJob("42"), runner)
    assert "scontrol requeue 42" in caplog.text
    assert "not permitted" in caplog.text


def test_requeue_without_scontrol(tmp_path: Path, caplog) -> None:
    def missing(command, **kwargs):
        raise FileNotFoundError(command[0])

    assert not requeue(SlurmJob("42"), missing)
    assert "scontrol was not found on PATH" in caplog.text


def test_end_time_from_squeue() -> None:
    runner = Recorder(stdout="2026-12-04T23:30:00\n")
    end = query_end_time(SlurmJob("42"), runner)
    assert runner.calls == [["squeue", "--noheader", "--jobs", "42", "--format", "%e"]]
    assert end == datetime(2026, 12, 4, 23, 30).timestamp()
    assert query_end_time(SlurmJob("42"), Recorder(stdout="NONE\n")) is None


def test_launcher_requeue_without_scontrol_still_exits_75(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "SLURM_JOB_ID": "42", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "resilient", "run", "--ckpt-dir", str(tmp_path / "ckpt"),
                             "--requeue", "--", sys.executable, "-c", "raise SystemExit(75)"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 75, result.stderr
    assert "scontrol requeue 42" in result.stderr
    assert "scontrol was not found on PATH" in result.stderr
