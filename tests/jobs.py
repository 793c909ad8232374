"""Start real torchrun jobs for the integration tests and read their output."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
TRAIN_LM = REPO / "examples" / "train_lm.py"
DIGEST = re.compile(r"^final_state_digest=([0-9a-f]{64})$", re.MULTILINE)
STEP = re.compile(r"^step\s+(\d+)\b")

#: Small enough for CI on 2 cores, long enough per step that a signal lands mid-run.
LM_ARGS = ["--d-model", "128", "--layers", "2", "--batch-size", "16", "--data-bytes", "60000", "--log-every", "1"]


def torchrun_command(script: Path, *args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            str(script), *args]


def job_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


@dataclass
class Job:
    """A running torchrun job whose combined output is collected line by line."""

    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    steps_seen: int = 0

    @classmethod
    def start(cls, command: list[str], env: dict[str, str] | None = None) -> "Job":
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=env or job_env(), start_new_session=True)
        job = cls(process)
        threading.Thread(target=job._read, daemon=True).start()
        return job

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            match = STEP.match(line)
            if match:
                self.steps_seen = max(self.steps_seen, int(match.group(1)))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, predicate, timeout: float, description: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.process.poll() is not None:
                raise AssertionError(f"job exited with {self.process.returncode} before {description}:\n{self.output[-4000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"timed out after {timeout} s waiting for {description}:\n{self.output[-4000:]}")
            time.sleep(0.02)

    def wait_for_step(self, step: int, timeout: float = 120) -> None:
        self.wait_for(lambda: self.steps_seen >= step, timeout, f"step {step}")

    def workers(self) -> dict[int, psutil.Process]:
        """Return the worker processes by rank."""
        found = {}
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if rank is not None and "python" in child.name().lower():
                found[int(rank)] = child
        return found

    def wait(self, timeout: float = 180) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"job did not exit within {timeout} s:\n{self.output[-4000:]}") from None
        time.sleep(0.1)  # let the reader thread take the last lines
        return code

    def kill(self) -> None:
        """SIGKILL the job's process group and every descendant, also those in other sessions."""
        try:
            descendants = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for process in descendants:
            try:
                process.kill()
            except psutil.Error:
                pass

    def digest(self) -> str:
        found = DIGEST.findall(self.output)
        assert len(found) == 1, f"expected one final_state_digest line, found {len(found)}:\n{self.output[-4000:]}"
        return found[0]


def run_to_end(command: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> Job:
    job = Job.start(command, env)
    code = job.wait(timeout)
    assert code == 0, f"job failed with status {code}:\n{job.output[-4000:]}"
    return job
