"""Kill-and-resume tests with real torchrun jobs, real signals and real files.

Each test preempts or breaks a 2-rank job, restarts the same command, and
compares the final digest with an uninterrupted run of the same command.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from jobs import LM_ARGS, TRAIN_LM, Job, job_env, run_to_end, torchrun_command
from resilient.checkpoint.discovery import COMPLETE, scan
from resilient.checkpoint.layout import read_manifest, read_run_id

pytestmark = pytest.mark.integration

MAX_STEPS = 30
SAVE_EVERY = 10


def lm_command(ckpt: Path) -> list[str]:
    return torchrun_command(TRAIN_LM, "--ckpt-dir", str(ckpt), "--max-steps", str(MAX_STEPS),
                            "--save-every", str(SAVE_EVERY), *LM_ARGS)


def complete_steps(ckpt: Path) -> dict[int, str]:
    return {info.step: info.reason for info in scan(ckpt, read_run_id(ckpt)) if info.status == COMPLETE}


def test_sigterm_to_torchrun_resumes_exactly(tmp_path: Path, reference_digest) -> None:
    expected = reference_digest(MAX_STEPS, SAVE_EVERY)
    ckpt = tmp_path / "ckpt"

    job = Job.start(lm_command(ckpt))
    job.wait_for_step(13)
    job.process.send_signal(signal.SIGTERM)
    status = job.wait()

    assert status != 0, "torchrun reports its own SIGTERM as a failure"
    steps = complete_steps(ckpt)
    preempted = [step for step, reason in steps.items() if reason == "preemption"]
    assert len(preempted) == 1, f"expected one preemption checkpoint, found {steps}"
    assert 13 <= preempted[0] < MAX_STEPS
    assert job.output.count("Exiting with status 75") == 2

    resumed = run_to_end(lm_command(ckpt))
    assert f"Resumed from {ckpt / f'step_{preempted[0]:09d}'}" in resumed.output
    assert resumed.digest() == expected


def test_sigusr1_to_one_worker_stops_all(tmp_path: Path, reference_digest) -> None:
    expected = reference_digest(MAX_STEPS, SAVE_EVERY)
    ckpt = tmp_path / "ckpt"

    job = Job.start(lm_command(ckpt))
    job.wait_for_step(12)
    workers = job.workers()
    assert sorted(workers) == [0, 1]
    workers[1].send_signal(signal.SIGUSR1)
    status = job.wait()

    # torchrun does not pass the workers' 75 through, but names it in its failure report.
    assert status != 0
    assert "exitcode  : 75" in job.output or "exitcode: 75" in job.output.replace(" ", "")
    preempted = [step for step, reason in complete_steps(ckpt).items() if reason == "preemption"]
    assert len(preempted) == 1
    manifest = read_manifest(ckpt / f"step_{preempted[0]:09d}")
    assert manifest.world_size == 2
    assert sorted({entry.rank for entry in manifest.files}) == [0, 1]
    assert "SIGUSR1 arrived on this rank" in job.output
    assert "the signal arrived on another rank" in job.output

    resumed = run_to_end(lm_command(ckpt))
    assert resumed.digest() == expected


def test_sigkill_during_save_keeps_previous(tmp_path: Path, reference_digest) -> None:
    expected = reference_digest(MAX_STEPS, SAVE_EVERY)
    ckpt = tmp_path / "ckpt"

    # Each rank pauses 5 s between writing its files and reporting them, so the
    # kill lands while the step-20 save is written but not yet committed.
    job = Job.start(lm_command(ckpt), job_env(RESILIENT_DEBUG_COMMIT_DELAY="5"))
    job.wait_for(lambda: any(p.name.startswith("step_000000020.tmp-") and any(p.glob("__1_*.distcp"))
                             for p in ckpt.glob("step_*")), timeout=240, description="the step-20 staging directory")
    time.sleep(0.5)
    job.workers()[1].kill()
    status = job.wait()

    assert status != 0
    assert not (ckpt / "step_000000020" / "manifest.json").exists()
    assert complete_steps(ckpt) == {10: "periodic"}

    resumed = run_to_end(lm_command(ckpt))
    assert f"Resumed from {ckpt / 'step_000000010'}" in resumed.output
    assert resumed.digest() == expected


FAULTY_SAVE = Path(__file__).parent / "scripts" / "faulty_save.py"


@pytest.mark.parametrize("phase", ["prepare", "write", "report"])
def test_save_failure_on_one_rank(tmp_path: Path, phase: str) -> None:
    ckpt = tmp_path / "ckpt"
    started = time.monotonic()
    job = Job.start(torchrun_command(FAULTY_SAVE, str(ckpt), phase, "6"))
    status = job.wait(timeout=120)
    elapsed = time.monotonic() - started

    assert status != 0
    assert "rank 0: CheckpointError" in job.output, job.output[-3000:]
    assert "rank 1: CheckpointError" in job.output, job.output[-3000:]
    assert elapsed < 100
    assert complete_steps(ckpt) == {3: "periodic"}
    assert not (ckpt / "step_000000006").exists()
    assert not list(ckpt.glob("step_000000006.tmp-*")), "the staging directory of the failed save remains"


def test_corrupt_latest_falls_back(tmp_path: Path, reference_digest) -> None:
    expected = reference_digest(MAX_STEPS, SAVE_EVERY)
    ckpt = tmp_path / "ckpt"
    finished = run_to_end(lm_command(ckpt))
    assert finished.digest() == expected

    # Flip one byte of rank 1's data in the final checkpoint; the size stays the same.
    shard = ckpt / "step_000000030" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    resumed = run_to_end(lm_command(ckpt))
    assert "is corrupt (trying the next older one)" in resumed.output
    assert str(shard) in resumed.output
    assert f"Resumed from {ckpt / 'step_000000020'}" in resumed.output
    assert resumed.digest() == expected
    assert complete_steps(ckpt)[30] == "final"
    assert len(list(ckpt.glob("step_000000030.corrupt-*"))) == 1


BATCHNORM_JOB = Path(__file__).parent / "scripts" / "batchnorm_job.py"


def rank_digests(output: str) -> dict[str, str]:
    return dict(re.findall(r"^rank (\d) digest=([0-9a-f]{64})$", output, re.MULTILINE))


def test_batchnorm_buffers_resume_per_rank(tmp_path: Path) -> None:
    reference = run_to_end(torchrun_command(BATCHNORM_JOB, str(tmp_path / "reference"), "25"))
    expected = rank_digests(reference.output)
    assert sorted(expected) == ["0", "1"]
    assert expected["0"] != expected["1"], "the running statistics should differ per rank"
    ckpt = tmp_path / "ckpt"

    job = Job.start(torchrun_command(BATCHNORM_JOB, str(ckpt), "25"))
    job.wait_for_step(10)
    job.process.send_signal(signal.SIGTERM)
    job.wait()
    assert [info.reason for info in scan(ckpt, read_run_id(ckpt))] == ["preemption"]

    resumed = run_to_end(torchrun_command(BATCHNORM_JOB, str(ckpt), "25"))
    assert rank_digests(resumed.output) == expected


CONFLICTING_KEYS = Path(__file__).parent / "scripts" / "conflicting_keys.py"


def test_same_key_different_values_rejected(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    job = Job.start(torchrun_command(CONFLICTING_KEYS, str(ckpt)))
    status = job.wait(timeout=120)

    assert status != 0
    for rank in (0, 1):
        line = next((line for line in job.lines if line.startswith(f"rank {rank} raised:")), "")
        assert "have different values on different ranks" in line, job.output[-3000:]
        assert "'model.0.weight' (ranks [0] vs [1])" in line
        assert "'optim.state.0.weight.exp_avg' (ranks [0] vs [1])" in line
    assert list(ckpt.glob("step_*")) == []


def test_invalid_save_every_stops_before_training(tmp_path: Path) -> None:
    job = Job.start(torchrun_command(TRAIN_LM, "--ckpt-dir", str(tmp_path / "ckpt"), "--save-every", "0", *LM_ARGS))
    status = job.wait(timeout=120)

    assert status != 0
    assert "error: save_every must be an integer of at least 1 or None, got 0" in job.output
    assert "[rank0]: Traceback" not in job.output, "the workers should exit with a message, not a traceback"
    assert job.steps_seen == 0
    assert not (tmp_path / "ckpt").exists()


def test_fsdp_sigterm_resumes_exactly(tmp_path: Path, reference_digest) -> None:
    expected = reference_digest(MAX_STEPS, SAVE_EVERY, "--fsdp")
    ckpt = tmp_path / "ckpt"

    job = Job.start(lm_command(ckpt) + ["--fsdp"])
    job.wait_for_step(13)
    job.process.send_signal(signal.SIGTERM)
    job.wait()
    preempted = [step for step, reason in complete_steps(ckpt).items() if reason == "preemption"]
    assert len(preempted) == 1

    # Each rank wrote its own shard of the model and of the Adam moments.
    manifest = read_manifest(ckpt / f"step_{preempted[0]:09d}")
    sizes = {entry.rank: entry.size for entry in manifest.files if entry.path.endswith(".distcp")}
    assert sorted(sizes) == [0, 1]
    assert min(sizes.values()) > 0.4 * max(sizes.values())

    resumed = run_to_end(lm_command(ckpt) + ["--fsdp"])
    assert resumed.digest() == expected


def test_signal_storm_gives_one_checkpoint(tmp_path: Path, reference_digest) -> None:
    expected = reference_digest(MAX_STEPS, SAVE_EVERY)
    ckpt = tmp_path / "ckpt"

    job = Job.start(lm_command(ckpt))
    job.wait_for_step(12)
    workers = job.workers()
    # 60 signals of both kinds to both ranks within about half a second.
    for index in range(60):
        try:
            workers[index % 2].send_signal(signal.SIGUSR1 if index % 3 else signal.SIGTERM)
        except (ProcessLookupError, psutil.NoSuchProcess):
            break  # the rank already saved and exited
        time.sleep(0.008)
    job.wait()

    steps = complete_steps(ckpt)
    preempted = [step for step, reason in steps.items() if reason == "preemption"]
    assert len(preempted) == 1, steps
    assert job.output.count("Exiting with status 75") == 2, job.output[-3000:]
    assert not list(ckpt.glob("step_*.tmp-*")), "a second save was started"

    resumed = run_to_end(lm_command(ckpt))
    assert resumed.digest() == expected
