"""slurm/preemptible.sbatch and resilient.slurm against a real single-node SLURM cluster on 127.0.0.1.

The session fixture starts the cluster with slurm/local-cluster.sh (which
installs the Debian packages when they are missing). When it cannot start,
these tests fail with its output instead of being skipped. The jobs share the
machine's CPUs, so the tests take a lock and run one at a time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

from jobs import LM_ARGS, REPO, DIGEST
from resilient.checkpoint.discovery import COMPLETE, scan
from resilient.checkpoint.layout import read_run_id

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

SCRIPT = REPO / "slurm" / "local-cluster.sh"
TEMPLATE = REPO / "slurm" / "preemptible.sbatch"
MAX_STEPS = 60
SAVE_EVERY = 20


@pytest.fixture(scope="session")
def cluster(shared_dir: Path) -> None:
    with FileLock(str(shared_dir / "slurm-start.lock")):
        started = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        pytest.fail(f"the local SLURM cluster did not start ({SCRIPT} start exited {started.returncode}):\n"
                    f"{started.stdout}\n{started.stderr}")


@pytest.fixture
def one_job_at_a_time(shared_dir: Path, cluster):
    with FileLock(str(shared_dir / "slurm-jobs.lock")):
        yield


def slurm(*command: str) -> str:
    return subprocess.run(list(command), capture_output=True, text=True, check=True, timeout=60).stdout.strip()


def submit(tmp_path: Path, ckpt: Path, *sbatch_options: str, max_steps: int = MAX_STEPS,
           template: Path = TEMPLATE) -> str:
    env = dict(os.environ, CKPT_DIR=str(ckpt), PYTHON=sys.executable, NPROC="2", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    command = ["sbatch", "--parsable", f"--output={tmp_path}/job-%j.log", *sbatch_options, str(template),
               "--max-steps", str(max_steps), "--save-every", str(SAVE_EVERY), *LM_ARGS]
    return subprocess.run(command, capture_output=True, text=True, check=True, env=env, cwd=REPO).stdout.strip()


def job_log(tmp_path: Path, job: str) -> str:
    path = tmp_path / f"job-{job}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_until(predicate, timeout: float, description: str, tmp_path: Path, job: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], check=False)
            details = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
            raise AssertionError(f"timed out after {timeout} s waiting for {description}:\n{details}\n"
                                 f"{job_log(tmp_path, job)[-4000:]}")
        time.sleep(0.5)


def job_field(job: str, field: str) -> str:
    details = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", details)
    return match.group(1) if match else ""


def release(job: str) -> None:
    """Start a requeued job now instead of after its BeginTime (about two minutes after the requeue).

    Released while its previous run is still completing, SLURM 22.05 starts the
    job at once and kills it ("Job credential revoked"), so wait until the node
    has finished that run.
    """
    deadline = time.monotonic() + 60
    while "COMP" in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.upper() \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)
    while job_field(job, "JobState") == "PENDING" and time.monotonic() < deadline:
        # An update sent while SLURM is still finishing the requeue can be lost, so repeat it.
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        time.sleep(2)


def reached_step(tmp_path: Path, job: str, step: int) -> bool:
    return any(int(found) >= step for found in re.findall(r"^step\s+(\d+)", job_log(tmp_path, job), re.MULTILINE))


def preempt_requeue_resume(tmp_path: Path, scancel_options: list[str]) -> tuple[str, Path, str]:
    ckpt = tmp_path / "ckpt"
    job = submit(tmp_path, ckpt)
    wait_until(lambda: reached_step(tmp_path, job, 20), 180, "step 20", tmp_path, job)
    subprocess.run(["scancel", "--signal=USR1", *scancel_options, job], check=True)

    wait_until(lambda: job_field(job, "JobState") == "PENDING", 180, "the requeue", tmp_path, job)
    assert "resilient run exited 75" in job_log(tmp_path, job)
    release(job)
    wait_until(lambda: job_field(job, "JobState") == "COMPLETED", 240, "the requeued run to finish", tmp_path,
               job)
    return job, ckpt, job_log(tmp_path, job)


def check_resumed(job: str, ckpt: Path, log: str, expected: str) -> None:
    assert job_field(job, "Restarts") == "1", log[-3000:]
    preempted = [info.step for info in scan(ckpt, read_run_id(ckpt))
                 if info.status == COMPLETE and info.reason == "preemption"]
    assert len(preempted) == 1, log[-3000:]
    assert f"Resumed from {ckpt / f'step_{preempted[0]:09d}'}" in log
    assert DIGEST.findall(log) == [expected]
    # The requeue may cancel the batch shell before its last lines are written, so look for the request.
    assert f"Requeueing SLURM job {job}: scontrol requeue {job}" in log


def test_batch_signal_requeues_and_resumes(tmp_path: Path, one_job_at_a_time, reference_digest) -> None:
    expected = reference_digest(MAX_STEPS, SAVE_EVERY)
    job, ckpt, log = preempt_requeue_resume(tmp_path, ["--batch"])
    check_resumed(job, ckpt, log, expected)


def test_step_signal_requeues_and_resumes(tmp_path: Path, one_job_at_a_time, reference_digest) -> None:
    expected = reference_digest(MAX_STEPS, SAVE_EVERY)
    job, ckpt, log = preempt_requeue_resume(tmp_path, [])
    check_resumed(job, ckpt, log, expected)


ARRAY_TASK = """#!/bin/bash
#SBATCH --requeue
if [[ "$SLURM_ARRAY_TASK_ID" == 1 && "${SLURM_RESTART_COUNT:-0}" == 0 ]]; then
    "$PYTHON" -c 'from resilient.slurm import SlurmJob, requeue; raise SystemExit(0 if requeue(SlurmJob.from_env()) else 1)'
fi
sleep 1
"""


def test_array_task_requeue_targets_the_task(tmp_path: Path, one_job_at_a_time) -> None:
    script = tmp_path / "array.sbatch"
    script.write_text(ARRAY_TASK)
    env = dict(os.environ, PYTHON=sys.executable)
    array = subprocess.run(["sbatch", "--parsable", "--array=0-1", f"--output={tmp_path}/array-%A_%a.log",
                            str(script)], capture_output=True, text=True, check=True, env=env).stdout.strip()
    task0, task1 = f"{array}_0", f"{array}_1"
    wait_until(lambda: job_field(task1, "Restarts") == "1", 120, "task 1 to be requeued", tmp_path, array)
    release(task1)
    wait_until(lambda: job_field(task1, "JobState") == "COMPLETED", 120, "task 1 to finish", tmp_path, array)
    assert job_field(task0, "JobState") == "COMPLETED"
    assert job_field(task0, "Restarts") == "0", "requeueing task 1 must leave task 0 alone"


def test_time_limit_without_signal_saves_before_it(tmp_path: Path, one_job_at_a_time) -> None:
    ckpt = tmp_path / "ckpt"
    # One minute and no --signal at all: only the end time that squeue reports warns the job.
    silent = tmp_path / "no-signal.sbatch"
    lines = TEMPLATE.read_text().splitlines(keepends=True)
    silent.write_text("".join(line for line in lines if not line.startswith("#SBATCH --signal")))
    job = submit(tmp_path, ckpt, "--time=1", max_steps=1_000_000, template=silent)
    wait_until(lambda: job_field(job, "JobState") == "PENDING" and job_field(job, "Restarts") == "1", 150,
               "the deadline stop and requeue", tmp_path, job)
    subprocess.run(["scancel", job], check=False)
    log = job_log(tmp_path, job)
    assert "resilient run exited 75" in log, log[-3000:]
    assert "DUE TO TIME LIMIT" not in log
    saved = [info.reason for info in scan(ckpt, read_run_id(ckpt)) if info.status == COMPLETE]
    assert saved[-1] == "deadline", saved


def test_array_template_requeues_one_task(tmp_path: Path, one_job_at_a_time, reference_digest) -> None:
    expected = reference_digest(MAX_STEPS, SAVE_EVERY, "--seed", "1")
    env = dict(os.environ, CKPT_ROOT=str(tmp_path / "ckpt"), PYTHON=sys.executable, NPROC="2", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    array = subprocess.run(["sbatch", "--parsable", "--array=0-1", f"--output={tmp_path}/job-%A_%a.log",
                            str(REPO / "slurm" / "array.sbatch"), "--max-steps", str(MAX_STEPS), "--save-every",
                            str(SAVE_EVERY), *LM_ARGS], capture_output=True, text=True, check=True, env=env,
                           cwd=REPO).stdout.strip()
    task0, task1 = f"{array}_0", f"{array}_1"
    log1 = tmp_path / f"job-{array}_1.log"
    wait_until(lambda: log1.exists() and re.search(r"^step\s+(2\d|[3-9]\d)", log1.read_text(), re.MULTILINE),
               240, "task 1 to reach step 20", tmp_path, array)
    subprocess.run(["scancel", "--signal=USR1", "--batch", task1], check=True)
    wait_until(lambda: job_field(task1, "Restarts") == "1", 180, "task 1 to be requeued", tmp_path, array)
    release(task1)
    wait_until(lambda: job_field(task1, "JobState") == "COMPLETED", 240, "task 1 to finish", tmp_path, array)
    wait_until(lambda: job_field(task0, "JobState") == "COMPLETED", 240, "task 0 to finish", tmp_path, array)

    assert job_field(task0, "Restarts") == "0"
    text = log1.read_text()
    assert f"Requeueing SLURM job {task1}: scontrol requeue {task1}" in text
    assert DIGEST.findall(text) == [expected]


def test_multinode_template_on_one_node(tmp_path: Path, one_job_at_a_time, reference_digest) -> None:
    expected = reference_digest(MAX_STEPS, SAVE_EVERY)
    job = submit(tmp_path, tmp_path / "ckpt", "--nodes=1", template=REPO / "slurm" / "multinode.sbatch")
    wait_until(lambda: job_field(job, "JobState") == "COMPLETED", 240, "the job to finish", tmp_path, job)
    log = job_log(tmp_path, job)
    assert "rendezvous on" in log
    assert DIGEST.findall(log) == [expected]
