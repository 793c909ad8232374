"""Resuming a checkpoint at another world size: resharded state, and data covered exactly once."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from jobs import Job, job_env, run_to_end, torchrun_command

pytestmark = pytest.mark.integration

RESIZE_JOB = Path(__file__).parent / "scripts" / "resize_job.py"
DATASET_SIZE = 96


def digests(output: str) -> set[str]:
    return set(re.findall(r"^rank \d+ digest=([0-9a-f]{64})$", output, re.MULTILINE))


def resize_command(nproc: int, ckpt: Path, max_steps: int, seen: Path, *stop_at: str) -> list[str]:
    seen.mkdir(parents=True, exist_ok=True)
    return torchrun_command(RESIZE_JOB, str(ckpt), str(max_steps), str(seen), *stop_at, nproc=nproc)


def seen_in_epoch(seen: Path, epoch: int) -> Counter:
    counts: Counter = Counter()
    for file in seen.glob("seen.*"):
        for line in file.read_text().splitlines():
            line_epoch, index = line.split()
            if int(line_epoch) == epoch:
                counts[int(index)] += 1
    return counts


@pytest.mark.parametrize(("saved", "resumed"), [(4, 2), (4, 3), (2, 4)])
def test_resharded_state_is_identical(tmp_path: Path, saved: int, resumed: int) -> None:
    ckpt = tmp_path / "ckpt"
    finished = run_to_end(resize_command(saved, ckpt, 5, tmp_path / "seen"))
    (expected,) = digests(finished.output)

    # max_steps equals the saved step, so the resumed job trains nothing and reports what it loaded.
    loaded = run_to_end(resize_command(resumed, ckpt, 5, tmp_path / "seen"))

    assert f"Resuming {resumed} ranks from a checkpoint of {saved} ranks" in loaded.output
    assert digests(loaded.output) == {expected}


@pytest.mark.parametrize("resumed", [2, 3])
def test_rest_of_epoch_seen_once(tmp_path: Path, resumed: int) -> None:
    ckpt, seen = tmp_path / "ckpt", tmp_path / "seen"
    # 4 ranks x 2 samples per step: epoch 0 has 12 steps. Stop during epoch 1.
    job = Job.start(resize_command(4, ckpt, 30, seen, "16"))
    job.wait(timeout=180)
    preempted = sorted(ckpt.glob("step_*"))
    assert [path.name for path in preempted] == ["step_000000017"], job.output[-3000:]

    run_to_end(resize_command(resumed, ckpt, 32, seen))

    counts = seen_in_epoch(seen, 1)
    assert max(counts.values()) == 1, "a sample of the interrupted epoch was seen twice"
    missing = DATASET_SIZE - len(counts)
    remaining = DATASET_SIZE - 5 * 4 * 2
    assert missing == remaining % resumed, "only drop_last may leave samples out"



def test_plain_sampler_resize_rejected(tmp_path: Path) -> None:
    ckpt, seen = tmp_path / "ckpt", tmp_path / "seen"
    env = job_env(RESIZE_SAMPLER="plain")
    Job.start(resize_command(4, ckpt, 30, seen, "16"), env).wait(timeout=180)
    assert (ckpt / "step_000000017").exists()

    rejected = Job.start(resize_command(2, ckpt, 32, seen), env)
    assert rejected.wait(timeout=180) != 0
    assert "cannot redistribute the rest of epoch 1 from 4 to 2 ranks with a DistributedSampler" in rejected.output
    assert "data_on_resize='restart_epoch'" in rejected.output

    restarted = run_to_end(resize_command(2, ckpt, 32, seen), job_env(RESIZE_SAMPLER="plain",
                                                                      RESIZE_DATA_ON_RESIZE="restart_epoch"))
    assert "Restarting epoch 1 from its first batch" in restarted.output


def test_fsdp_shards_reload_at_other_size(tmp_path: Path) -> None:
    from jobs import TRAIN_LM

    ckpt = tmp_path / "ckpt"
    args = ["--ckpt-dir", str(ckpt), "--max-steps", "4", "--save-every", "2", "--fsdp",
            "--d-model", "64", "--layers", "2", "--batch-size", "4", "--data-bytes", "40000"]
    finished = run_to_end(torchrun_command(TRAIN_LM, *args, nproc=2))

    # 4 steps are done, so the 3-rank job only loads the shards, reshards them, and reports the digest.
    resumed = run_to_end(torchrun_command(TRAIN_LM, *args, nproc=3))

    assert "Resuming 3 ranks from a checkpoint of 2 ranks" in resumed.output
    assert resumed.digest() == finished.digest()
