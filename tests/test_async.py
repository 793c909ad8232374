"""Background (asynchronous) saves with real 2-rank torchrun jobs, real signals and real files.

``RESILIENT_DEBUG_WRITE_DELAY`` makes each writer thread wait before writing,
so a save stays in flight while training changes the tensors it copied.
Every job is compared with an uninterrupted run that saves synchronously.
"""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import pytest

from jobs import LM_ARGS, TRAIN_LM, Job, job_env, run_to_end, torchrun_command
from resilient.checkpoint.discovery import COMPLETE, scan
from resilient.checkpoint.layout import read_run_id

pytestmark = pytest.mark.integration

MAX_STEPS = 30
SAVE_EVERY = 5
FAULTY_SAVE = Path(__file__).parent / "scripts" / "faulty_save.py"


def async_command(ckpt: Path, *extra: str) -> list[str]:
    return torchrun_command(TRAIN_LM, "--ckpt-dir", str(ckpt), "--max-steps", str(MAX_STEPS),
                            "--save-every", str(SAVE_EVERY), "--async-save", *LM_ARGS, *extra)


def complete_steps(ckpt: Path) -> dict[int, str]:
    return {info.step: info.reason for info in scan(ckpt, read_run_id(ckpt)) if info.status == COMPLETE}


def rank0(output: str, pattern: str) -> list[str]:
    return re.findall(rf"\[rank 0/2 step \d+\] {pattern}", output)


def test_background_saves_hold_the_state_of_their_step(tmp_path: Path, reference_digest) -> None:
    """Training changes the weights while the writer waits; resuming from such a save still matches."""
    expected = reference_digest(MAX_STEPS, SAVE_EVERY)
    ckpt = tmp_path / "ckpt"
    job = Job.start(async_command(ckpt, "--keep", "10"), job_env(RESILIENT_DEBUG_WRITE_DELAY="1.0"))
    job.wait_for(lambda: (ckpt / "step_000000015" / "manifest.json").exists(), 240, "the step-15 commit")
    job.kill()
    job.wait()
    steps = complete_steps(ckpt)
    assert 15 in steps and all(step % SAVE_EVERY == 0 for step in steps), steps
    # The writer waited 1 s after each save call while training went on for several steps.
    assert job.steps_seen > max(steps), (job.steps_seen, steps)

    resumed = run_to_end(async_command(ckpt))
    assert f"Resumed from {ckpt / f'step_{max(steps):09d}'}" in resumed.output
    assert resumed.digest() == expected


def test_one_save_in_flight_wait_policy(tmp_path: Path, reference_digest) -> None:
    expected = reference_digest(MAX_STEPS, SAVE_EVERY)
    ckpt = tmp_path / "ckpt"
    job = run_to_end(async_command(ckpt), job_env(RESILIENT_DEBUG_WRITE_DELAY="1.5"))
    events = re.findall(r"\[rank 0/2 step \d+\] (Started the background periodic save of step |"
                        r"Committed checkpoint \S+/step_0*)(\d+)", job.output)
    order = [("start" if kind.startswith("Started") else "commit", int(step)) for kind, step in events]
    starts = [step for kind, step in order if kind == "start"]
    assert starts == [5, 10, 15, 20, 25], order
    # Each background save commits before the next one starts: never two in flight.
    for previous, following in zip(starts, starts[1:]):
        assert order.index(("commit", previous)) < order.index(("start", following)), order
    assert job.digest() == expected


def test_skip_policy_skips_busy_saves(tmp_path: Path, reference_digest) -> None:
    expected = reference_digest(MAX_STEPS, SAVE_EVERY)
    ckpt = tmp_path / "ckpt"
    job = run_to_end(async_command(ckpt, "--async-busy", "skip", "--keep", "10"),
                     job_env(RESILIENT_DEBUG_WRITE_DELAY="3"))
    skipped = rank0(job.output, r"Skipping the periodic save of step (\d+)")
    assert skipped, job.output[-3000:]
    # Rank 1 skipped the same steps, because the busy check is agreed.
    rank1 = re.findall(r"\[rank 1/2 step \d+\] Skipping the periodic save of step (\d+)", job.output)
    assert rank1 == skipped
    steps = complete_steps(ckpt)
    assert steps[MAX_STEPS] == "final"
    assert not {int(step) for step in skipped} & set(steps)
    assert job.digest() == expected


@pytest.mark.parametrize("phase", ["prepare", "write", "report"])
def test_background_failure_is_raised_at_the_next_save(tmp_path: Path, phase: str) -> None:
    ckpt = tmp_path / "ckpt"
    job = Job.start(torchrun_command(FAULTY_SAVE, str(ckpt), phase, "3", "async"))
    status = job.wait(timeout=120)
    assert status != 0
    for rank in (0, 1):
        assert f"rank {rank}: CheckpointError" in job.output, job.output[-3000:]
        assert re.search(rf"rank {rank}: CheckpointError .*the background save of step 3 failed", job.output)
    assert "The background save of step 3 failed" in job.output, "the failure is logged when it happens"
    assert complete_steps(ckpt) == {}
    assert not list(ckpt.glob("step_000000003*")), "the failed save left files behind"


def test_stop_waits_for_the_save_in_flight(tmp_path: Path, reference_digest) -> None:
    expected = reference_digest(MAX_STEPS, SAVE_EVERY)
    ckpt = tmp_path / "ckpt"
    job = Job.start(async_command(ckpt, "--keep", "10"), job_env(RESILIENT_DEBUG_WRITE_DELAY="4"))
    job.wait_for(lambda: "Started the background periodic save of step 10" in job.output, 240, "the step-10 save")
    job.workers()[1].send_signal(signal.SIGUSR1)
    job.wait()
    assert "Waiting for the background save of step 10" in job.output, job.output[-3000:]
    steps = complete_steps(ckpt)
    stopped = [step for step, reason in steps.items() if reason == "preemption"]
    assert len(stopped) == 1, steps
    assert stopped[0] > 10, steps
    assert 10 in steps, "the save in flight was waited for and committed"

    resumed = run_to_end(async_command(ckpt))
    assert resumed.digest() == expected


def test_stop_abandons_save_beyond_grace(tmp_path: Path, reference_digest) -> None:
    """Each background save takes over 4 s; with 2 s of grace left the stop abandons it and saves synchronously."""
    expected = reference_digest(MAX_STEPS, SAVE_EVERY)
    ckpt = tmp_path / "ckpt"
    job = Job.start(async_command(ckpt, "--keep", "10", "--grace-period", "2.5"),
                    job_env(RESILIENT_DEBUG_WRITE_DELAY="4"))
    job.wait_for(lambda: "Started the background periodic save of step 10" in job.output, 240, "the step-10 save")
    job.workers()[0].send_signal(signal.SIGTERM)
    job.wait()
    assert "Abandoning the background save of step 10" in job.output, job.output[-3000:]
    steps = complete_steps(ckpt)
    stopped = [step for step, reason in steps.items() if reason == "preemption"]
    assert len(stopped) == 1, steps
    assert stopped[0] > 10, steps
    assert 10 not in steps, "an abandoned save was marked complete"
    assert 5 in steps, "the previous complete checkpoint was lost"
    assert not list(ckpt.glob("step_000000010.tmp-*")), "the abandoned save's staging directory remains"

    resumed = run_to_end(async_command(ckpt))
    assert resumed.digest() == expected


MEMORY_JOB = Path(__file__).parent / "scripts" / "async_memory.py"


def test_memory_stays_bounded_over_20_background_saves(tmp_path: Path) -> None:
    job = run_to_end([sys.executable, str(MEMORY_JOB), str(tmp_path / "ckpt"), "20"], job_env())
    result = dict(re.findall(r"^(\w+)=(\S+)$", job.output, re.MULTILINE))
    state = int(result["state_bytes"])
    assert int(result["saves"]) == 20
    # The staging buffers are allocated once and reused by every later save. Only the few bytes of
    # JSON values whose length changed (counters gaining a digit) are allocated again.
    staging, allocated = int(result["staging_bytes"]), int(result["staging_allocated"])
    assert staging >= state
    assert allocated - staging < 4096, f"staging allocated {allocated} bytes for buffers of {staging}"
    # Resident memory after the 20th save is within a fraction of one state copy of the 3rd.
    growth = int(result["rss_after_last"]) - int(result["rss_after_third"])
    assert growth < state // 2, f"resident memory grew {growth} bytes over 17 saves of {state} bytes"


def test_stop_abandons_unmeasured_first_save(tmp_path: Path, reference_digest) -> None:
    """No save has been measured yet; with a grace period the stop must not wait for a 20 s write."""
    expected = reference_digest(MAX_STEPS, SAVE_EVERY)
    ckpt = tmp_path / "ckpt"
    job = Job.start(async_command(ckpt, "--keep", "10", "--grace-period", "3"),
                    job_env(RESILIENT_DEBUG_WRITE_DELAY="20"))
    job.wait_for(lambda: "Started the background periodic save of step 5" in job.output, 240, "the step-5 save")
    job.workers()[0].send_signal(signal.SIGTERM)
    job.wait()
    assert "Abandoning the background save of step 5: its duration is not known yet" in job.output, \
        job.output[-3000:]
    # The writer still sleeping is left behind rather than holding the exit past the grace period.
    assert "A background save is still being written at exit" in job.output
    assert job.output.count("Exiting with status 75 after the preemption checkpoint") == 2
    assert "exitcode  : 75" in job.output or "exitcode: 75" in job.output.replace(" ", "")
    steps = complete_steps(ckpt)
    assert list(steps.values()) == ["preemption"], steps
    assert 5 not in steps

    resumed = run_to_end(async_command(ckpt))
    assert resumed.digest() == expected
