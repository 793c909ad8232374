"""``resilient run`` around real torchrun jobs: relayed signals, restarts, the grace deadline, hangs.

Each kill-and-resume test compares the final digest with an uninterrupted run
of the same training command.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import sys
import time
from pathlib import Path

import psutil
import pytest

from jobs import LM_ARGS, REPO, TRAIN_LM, Job, job_env, run_to_end, torchrun_command
from resilient.checkpoint.discovery import COMPLETE, scan
from resilient.checkpoint.layout import read_run_id
from resilient.journal import read_journal

pytestmark = pytest.mark.integration

MAX_STEPS = 30
SAVE_EVERY = 10
RUN = [sys.executable, "-m", "resilient", "run"]


def lm_args(ckpt: Path) -> list[str]:
    return ["--ckpt-dir", str(ckpt), "--max-steps", str(MAX_STEPS), "--save-every", str(SAVE_EVERY), *LM_ARGS]


def launched(ckpt: Path, *options: str) -> list[str]:
    return [*RUN, "--ckpt-dir", str(ckpt), *options, "--", *torchrun_command(TRAIN_LM, *lm_args(ckpt))]


def events(ckpt: Path, kind: str) -> list[dict]:
    return [event for event in read_journal(ckpt).events if event["event"] == kind]


def complete_steps(ckpt: Path) -> dict[int, str]:
    return {info.step: info.reason for info in scan(ckpt, read_run_id(ckpt)) if info.status == COMPLETE}


def test_sigusr1_to_launcher_exits_75(tmp_path: Path, reference_digest) -> None:
    expected = reference_digest(MAX_STEPS, SAVE_EVERY)
    ckpt = tmp_path / "ckpt"
    command = launched(ckpt)

    job = Job.start(command)
    job.wait_for_step(13)
    job.process.send_signal(signal.SIGUSR1)
    status = job.wait()

    assert status == 75, job.output[-3000:]
    preempted = [step for step, reason in complete_steps(ckpt).items() if reason == "preemption"]
    assert len(preempted) == 1, complete_steps(ckpt)
    assert 13 <= preempted[0] < MAX_STEPS, complete_steps(ckpt)
    assert job.output.count(f"Exiting with status 75 after the preemption checkpoint of step {preempted[0]}") == 2
    assert [event["step"] for event in events(ckpt, "stop")] == preempted
    relayed = events(ckpt, "signal")[0]
    assert relayed["signal"] == "SIGUSR1"
    assert relayed["source"] == "launcher"
    assert len(relayed["relayed_to"]) >= 2

    rerun = run_to_end(command)
    assert rerun.digest() == expected
    assert [event["attempt"] for event in events(ckpt, "start")] == [1, 2]
    assert events(ckpt, "finish")[-1]["status"] == 0


def bash_wrapped(ckpt: Path) -> list[str]:
    """One rank behind ``bash -c``, which exits 0 whatever python returns.

    The echo after python keeps bash from exec-ing it and hides python's
    status, so only the heartbeats can tell the launcher about a preemption.
    """
    train = " ".join([sys.executable, str(TRAIN_LM), *lm_args(ckpt)])
    return [*RUN, "--ckpt-dir", str(ckpt), "--", "bash", "-c",
            f"{train}; echo wrapper saw $?"]


def test_worker_behind_bash_without_exec_gets_the_signal(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    env = job_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    reference = run_to_end(bash_wrapped(tmp_path / "reference"), env).digest()

    job = Job.start(bash_wrapped(ckpt), env)
    job.wait_for_step(8)
    tree = psutil.Process(job.process.pid).children(recursive=True)
    assert [child.name() for child in tree][:1] == ["bash"], tree
    assert len(tree) >= 2, tree
    job.process.send_signal(signal.SIGTERM)
    status = job.wait()

    assert status == 75, job.output[-3000:]
    assert "wrapper saw 75" in job.output
    assert "preemption" in complete_steps(ckpt).values()
    assert run_to_end(bash_wrapped(ckpt), env).digest() == reference


def test_sigkill_of_a_worker_restarts_and_resumes(tmp_path: Path, reference_digest) -> None:
    expected = reference_digest(MAX_STEPS, SAVE_EVERY)
    ckpt = tmp_path / "ckpt"

    job = Job.start(launched(ckpt, "--max-restarts", "2", "--backoff", "0.5"))
    job.wait_for_step(14)
    job.workers()[1].kill()
    status = job.wait(300)

    assert status == 0, job.output[-3000:]
    assert job.digest() == expected
    exits = events(ckpt, "exit")
    assert [event["outcome"] for event in exits] == ["crash", "success"]
    assert exits[0]["reached_step"] is True
    assert events(ckpt, "restart")[0]["restart"] == 1
    resumes = events(ckpt, "resume")
    assert resumes[-1]["step"] >= SAVE_EVERY, resumes


def test_torchrun_elastic_restart_resumes_from_latest(tmp_path: Path, reference_digest) -> None:
    expected = reference_digest(MAX_STEPS, SAVE_EVERY)
    ckpt = tmp_path / "ckpt"

    # train_lm.py uses resilient.init_process_group, without which gloo reconnects to stale addresses after
    # torchrun restarts the worker group (torch 2.13; see resilient/distributed.py).
    torchrun = torchrun_command(TRAIN_LM, *lm_args(ckpt))
    torchrun[3:3] = ["--max-restarts", "1"]
    job = Job.start([*RUN, "--ckpt-dir", str(ckpt), "--", *torchrun])
    job.wait_for_step(14)
    job.workers()[0].kill()
    status = job.wait(300)

    assert status == 0, job.output[-3000:]
    assert job.digest() == expected
    assert [event["outcome"] for event in events(ckpt, "exit")] == ["success"], "torchrun restarted the workers"
    resumes = events(ckpt, "resume")
    assert resumes[-1]["torchelastic_restart"] == 1, resumes
    assert resumes[-1]["step"] >= SAVE_EVERY, resumes


def test_rank_ignoring_sigterm_is_killed_after_grace(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    script = REPO / "tests" / "scripts" / "stubborn_rank.py"
    job = Job.start([*RUN, "--ckpt-dir", str(ckpt), "--grace", "6", "--",
                     *torchrun_command(script, str(ckpt))])
    job.wait_for_step(12)
    before = complete_steps(ckpt)
    signalled = time.monotonic()
    job.process.send_signal(signal.SIGTERM)
    status = job.wait(120)
    elapsed = time.monotonic() - signalled

    assert status == 137, job.output[-3000:]
    blocked = re.search(r"rank 1 blocks in its save of step (\d+)", job.output)
    assert blocked, job.output[-3000:]
    assert elapsed >= 6, f"the tree was killed {elapsed:.1f} s after the signal, before the grace period ended"
    kills = events(ckpt, "kill")
    assert len(kills) == 1, kills
    assert len(kills[0]["processes"]) >= 1, kills
    assert any("stubborn_rank.py" in process["command"] for process in kills[0]["processes"])
    after = complete_steps(ckpt)
    assert set(before) <= set(after), f"a complete checkpoint was lost: before {before}, after {after}"
    assert max(after) < int(blocked.group(1)), f"the blocked save was published: {after}"
    assert "preemption" not in after.values()
    staging = [path.name for path in ckpt.iterdir() if ".tmp-" in path.name]
    assert staging == [path.name for path in ckpt.glob(f"step_{int(blocked.group(1)):09d}.tmp-*")], staging
    assert not [proc for proc in psutil.process_iter(["cmdline"])
                if str(ckpt) in " ".join(proc.info["cmdline"] or [])], "processes of the job survived"


def test_sigstop_triggers_the_hang_watchdog(tmp_path: Path, reference_digest) -> None:
    expected = reference_digest(MAX_STEPS, SAVE_EVERY)
    ckpt = tmp_path / "ckpt"

    job = Job.start(launched(ckpt, "--hang-timeout", "6", "--max-restarts", "1", "--backoff", "0.5"))
    job.wait_for_step(14)
    stopped = job.workers()[1]
    stopped.suspend()
    status = job.wait(300)

    assert status == 0, job.output[-3000:]
    assert job.digest() == expected
    hangs = events(ckpt, "hang")
    assert len(hangs) == 1, hangs
    assert hangs[0]["stopped_pids"] == [stopped.pid]
    assert hangs[0]["ranks_with_stacks"] == [0, 1]
    stacks = Path(hangs[0]["stacks_dir"])
    for rank in (0, 1):
        text = (stacks / f"stacks-rank{rank:05d}.txt").read_text()
        assert "train_lm.py" in text, text
    assert [event["outcome"] for event in events(ckpt, "exit")] == ["hang", "success"]
    assert "Python stacks of rank 1" in job.output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_status_renders_a_real_journal(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    job = Job.start([*RUN, "--ckpt-dir", str(ckpt), "--", sys.executable, "-c", "print('hello')"])
    assert job.wait(60) == 0
    table = run_to_end([sys.executable, "-m", "resilient", "status", str(ckpt)]).output
    assert "start" in table
    assert "finish" in table
    assert "resilient run exited 0 (success)" in table
    raw = run_to_end([sys.executable, "-m", "resilient", "status", str(ckpt), "--json"]).output
    kinds = [event["event"] for event in json.loads(raw)["events"]]
    assert kinds == ["start", "exit", "finish"]


def test_requeue_without_scontrol_keeps_checkpoint_and_75(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    # A container without SLURM's commands: SLURM_JOB_ID is set, but scontrol is not on PATH.
    env = job_env(PATH=str(empty_path), SLURM_JOB_ID="4242")
    job = Job.start([*RUN, "--ckpt-dir", str(ckpt), "--requeue", "--", *torchrun_command(TRAIN_LM, *lm_args(ckpt))],
                    env)
    job.wait_for_step(8)
    job.process.send_signal(signal.SIGUSR1)
    status = job.wait()

    assert status == 75, job.output[-3000:]
    assert "preemption" in complete_steps(ckpt).values()
    assert "scontrol requeue 4242" in job.output
    assert "scontrol was not found on PATH" in job.output
