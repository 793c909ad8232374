"""``resilient demo``: preempt a real 2-rank job, resume it, and prove the result is exact."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from resilient.checkpoint.discovery import scan
from resilient.checkpoint.layout import read_run_id

_STEP_LINE = re.compile(r"^step\s+(\d+)\b")
_DIGEST_LINE = re.compile(r"^final_state_digest=([0-9a-f]{64})$")
_SAVE_EVERY = 20


def _find_script() -> Path:
    script = Path(__file__).resolve().parents[1] / "examples" / "train_lm.py"
    if not script.is_file():
        raise SystemExit(f"error: the demo needs {script}, which is missing. Run the demo from a source "
                         "checkout installed with `pip install -e .`.")
    return script


def _command(script: Path, ckpt_dir: Path, max_steps: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(script), "--ckpt-dir", str(ckpt_dir), "--max-steps", str(max_steps),
            "--save-every", str(_SAVE_EVERY), "--log-every", "5"]


def _show(line: str) -> None:
    """Echo the lines a reader cares about: rank 0's progress and resilient's events."""
    text = line.rstrip()
    if _STEP_LINE.match(text) or _DIGEST_LINE.match(text) or ("resilient" in text and "[rank 0/" in text):
        print(f"    | {text}", flush=True)


def _run(command: list[str], *, preempt_at: int | None = None) -> tuple[int, str | None, int | None, int]:
    """Run one torchrun job; optionally SIGTERM it once rank 0 reports step ``preempt_at``.

    Returns torchrun's exit status, the final digest, the step at which the
    signal was sent, and how many ranks logged their exit with status 75.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    digest, signalled_at, preempted_ranks = None, None, 0
    assert process.stdout is not None
    for line in process.stdout:
        _show(line)
        step = _STEP_LINE.match(line)
        if step and preempt_at is not None and signalled_at is None and int(step.group(1)) >= preempt_at:
            signalled_at = int(step.group(1))
            print(f"\n>>> Sending SIGTERM to torchrun (pid {process.pid}) after rank 0 reported step {signalled_at}, "
                  "as a scheduler does before preemption.\n", flush=True)
            process.send_signal(signal.SIGTERM)
        if "Exiting with status 75" in line:
            preempted_ranks += 1
        found = _DIGEST_LINE.match(line.strip())
        if found:
            digest = found.group(1)
    return process.wait(), digest, signalled_at, preempted_ranks


def _list_checkpoints(root: Path) -> None:
    run_id = read_run_id(root)
    for info in scan(root, run_id):
        print(f"    step {info.step:4d}  {info.status:<8}  {info.reason or '-':<10}  {info.path.name}")


def run_demo(workdir: Path | None = None, max_steps: int = 60, keep: bool = False) -> int:
    """Run the demo; return 0 when the preempted-and-resumed run matches the uninterrupted one."""
    if max_steps < 30:
        raise SystemExit("error: --max-steps must be at least 30 so the preemption lands mid-run")
    script = _find_script()
    created = workdir is None
    root = Path(tempfile.mkdtemp(prefix="resilient-demo-")) if workdir is None else workdir
    root.mkdir(parents=True, exist_ok=True)
    preempted_dir, reference_dir = root / "preempted", root / "uninterrupted"
    for path in (preempted_dir, reference_dir):
        shutil.rmtree(path, ignore_errors=True)
    started = time.monotonic()
    preempt_at = max_steps // 2 + 5

    try:
        print(f"[1/4] Training {max_steps} steps on 2 ranks (torchrun, gloo, CPU), checkpoint every "
              f"{_SAVE_EVERY} steps, into {preempted_dir}", flush=True)
        command = _command(script, preempted_dir, max_steps)
        status, digest, signalled_at, preempted_ranks = _run(command, preempt_at=preempt_at)
        if signalled_at is None or digest is not None:
            print("The job finished before it could be preempted; the demo proves nothing. Raise --max-steps.")
            return 1
        print(f"\n    torchrun exited with status {status}: torchrun reports the SIGTERM it received as a failure. "
              f"{preempted_ranks} of 2 workers logged their exit with status 75 (checkpoint committed, restart me).")
        if preempted_ranks != 2:
            print("Not every worker committed the preemption checkpoint; the demo failed.")
            return 1
        print("    Checkpoints on disk now:")
        _list_checkpoints(preempted_dir)
        preempted = [info.step for info in scan(preempted_dir, read_run_id(preempted_dir))
                     if info.reason == "preemption"]
        if not preempted:
            print("No preemption checkpoint was committed; the demo failed.")
            return 1
        saved_at = preempted[-1]

        print("\n[2/4] Restarting the same command; it resumes from the newest complete checkpoint", flush=True)
        status, resumed_digest, _, _ = _run(_command(script, preempted_dir, max_steps))
        if status != 0 or resumed_digest is None:
            print(f"The resumed run failed with status {status}.")
            return 1

        print(f"\n[3/4] Training the same {max_steps} steps without interruption, into {reference_dir}", flush=True)
        status, reference_digest, _, _ = _run(_command(script, reference_dir, max_steps))
        if status != 0 or reference_digest is None:
            print(f"The uninterrupted run failed with status {status}.")
            return 1

        print("\n[4/4] Comparing the final model and optimizer state (SHA-256 over every tensor)")
        print(f"    preempted and resumed: {resumed_digest}")
        print(f"    uninterrupted:         {reference_digest}")
        elapsed = time.monotonic() - started
        if resumed_digest == reference_digest:
            print(f"\nPASS: identical bit for bit after SIGTERM at step {signalled_at} and a preemption checkpoint "
                  f"of step {saved_at} ({elapsed:.0f} s).")
            return 0
        print(f"\nFAIL: the digests differ ({elapsed:.0f} s).")
        return 1
    finally:
        if created and not keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"Demo files kept in {root}")
