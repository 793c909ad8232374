"""``resilient chaos`` against real jobs: a torchrun job that resumes exactly, one that does not, and bad input."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import REPO, TRAIN_LM, job_env, torchrun_command
from resilient.chaos import SAVE, STEP, plan_kills

FORGETFUL_JOB = REPO / "tests" / "scripts" / "forgetful_job.py"
#: Smaller than LM_ARGS, so that four torchrun launches fit in a test.
TINY_LM_ARGS = ["--max-steps", "20", "--save-every", "3", "--d-model", "64", "--layers", "1", "--batch-size", "8",
                "--block-size", "32", "--data-bytes", "20000", "--log-every", "1"]
KILL_ROW = re.compile(r"^\s+(\d+)\s+(\d+)\s+[\d.]+ s\s+(\d+|-)\s+(SIG[A-Z0-9]+)\s+(step|save)", re.MULTILINE)


def chaos_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``resilient chaos``; on timeout, interrupt it so that it SIGKILLs the command it runs."""
    command = [sys.executable, "-m", "resilient", "chaos", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=job_env())
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        try:
            stdout, stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        raise AssertionError(f"resilient chaos did not finish within {timeout} s:\n{stdout}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def digests(report: str) -> tuple[str, str]:
    reference = re.search(r"^  reference: (\S+)$", report, re.MULTILINE)
    chaos = re.search(r"^  chaos:     (\S+)$", report, re.MULTILINE)
    assert reference and chaos, f"no digest lines in the report:\n{report}"
    return reference.group(1), chaos.group(1)


@pytest.mark.integration
def test_chaos_torchrun_job_passes(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    # Seed 6 plans SIGKILL during a save, then SIGTERM at a random step.
    result = chaos_cli("--kills", "2", "--signals", "KILL,TERM", "--seed", "6", "--timeout", "120",
                       "--workdir", str(workdir), "--",
                       *torchrun_command(TRAIN_LM, "--ckpt-dir", "{ckpt_dir}", *TINY_LM_ARGS))
    report = result.stdout

    assert result.returncode == 0, f"{report}\n{result.stderr[-3000:]}"
    assert "replay with --seed 6" in report
    rows = KILL_ROW.findall(report)
    assert [(number, signal_name, plan) for number, _attempt, _step, signal_name, plan in rows] == [
        ("1", "SIGKILL", "save"), ("2", "SIGTERM", "step")], report
    reference, chaos = digests(report)
    assert re.fullmatch(r"[0-9a-f]{64}", reference)
    assert chaos == reference
    assert "PASS" in report
    assert not workdir.exists(), "a passing run without --keep must remove the work directory it created"


@pytest.mark.integration
def test_chaos_catches_lost_data_position(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    result = chaos_cli("--kills", "2", "--signals", "USR1,KILL", "--seed", "3", "--timeout", "120",
                       "--workdir", str(workdir), "--", sys.executable, str(FORGETFUL_JOB), "{ckpt_dir}", "20")
    report = result.stdout

    assert result.returncode == 1, f"{report}\n{result.stderr[-3000:]}"
    reference, chaos = digests(report)
    assert chaos != reference
    assert "FAIL: the final state digests differ (seed 3)" in report
    signals_used = {signal_name for _number, _attempt, _step, signal_name, _plan in KILL_ROW.findall(report)}
    assert signals_used == {"SIGUSR1", "SIGKILL"}, report
    assert re.search(r"SIGUSR1\s+\w+(?:, none began)?\s+.*\s75 preempted\s", report), report
    assert f"The runs are kept in {workdir}" in report
    assert (workdir / "reference").is_dir()
    assert (workdir / "chaos").is_dir()
    assert (workdir / "logs" / "chaos-attempt-01.log").is_file()


@pytest.mark.parametrize("args, message", [
    (["--kills", "1", "--", sys.executable, "train.py", "--ckpt-dir", "ckpt"],
     "the command does not contain the placeholder {ckpt_dir}"),
    (["--kills", "1", "--signals", "TERM,FOO", "--", sys.executable, "{ckpt_dir}"], "invalid signal 'FOO' for --signals"),
    (["--kills", "1", "--signals", "INT", "--", sys.executable, "{ckpt_dir}"], "invalid signal SIGINT for --signals"),
    (["--kills", "1", "--signals", "CHLD", "--", sys.executable, "{ckpt_dir}"], "invalid signal SIGCHLD for --signals"),
    (["--kills", "0", "--", sys.executable, "{ckpt_dir}"], "kills must be an integer of at least 1, got 0"),
    (["--kills", "1", "--timeout", "0", "--", sys.executable, "{ckpt_dir}"], "timeout must be a positive number"),
    (["--kills", "1"], "no command given"),
    (["--kills", "1", "--", "/nonexistent/train", "{ckpt_dir}"], "cannot run '/nonexistent/train'"),
])
def test_chaos_argument_errors(args: list[str], message: str) -> None:
    result = chaos_cli(*args, timeout=60)

    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert result.stdout == ""


def test_chaos_rejects_used_workdir(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("left from an earlier run")

    result = chaos_cli("--kills", "1", "--workdir", str(tmp_path), "--", sys.executable, "{ckpt_dir}", timeout=60)

    assert result.returncode == 2
    assert f"workdir {tmp_path} is not an empty directory" in result.stderr


@pytest.mark.parametrize("script, timeout, message", [
    ("echo output from {ckpt_dir}", "30", "reference exited 0 but printed no final_state_digest"),
    ("echo output from {ckpt_dir}; exec sleep 30", "1", "reference did not exit within the timeout of 1 s"),
    ("echo output from {ckpt_dir}; exit 3", "30", "reference ended with status 3 although no kill was sent"),
    ("echo output from {ckpt_dir}; echo final_state_digest=0a1b", "30", "the reference run reported no training step"),
])
def test_chaos_reference_failure_shows_output(tmp_path: Path, script: str, timeout: str, message: str) -> None:
    workdir = tmp_path / "work"

    result = chaos_cli("--kills", "1", "--timeout", timeout, "--workdir", str(workdir), "--", "sh", "-c", script,
                       timeout=60)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "The reference run failed" in result.stdout
    assert message in result.stdout
    assert f"  | output from {workdir / 'reference'}" in result.stdout, "the output tail is missing"
    assert f"The runs are kept in {workdir}" in result.stdout


def test_plan_kills_same_for_same_seed() -> None:
    signals = (signal.SIGTERM, signal.SIGUSR1, signal.SIGKILL)

    first = plan_kills(7, signals, seed=42)

    assert first == plan_kills(7, signals, seed=42)
    assert first != plan_kills(7, signals, seed=43)
    assert set(kill.signal for kill in first[:3]) == set(signals), "each signal must come once per round"
    assert [kill.mode for kill in first].count(SAVE) == 4
    assert [kill.mode for kill in first].count(STEP) == 3
    assert all(0 <= kill.position < 1 and 0 <= kill.offset < 1 for kill in first)


def test_cli_imports_no_torch() -> None:
    code = "import sys, resilient.cli, resilient.chaos; print(sorted(m for m in sys.modules if m.startswith('torch')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
