"""``resilient run`` with small real commands: statuses, relay rule, grace, attempts, status rendering."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from jobs import Job, job_env
from resilient.journal import EVENTS, Journal, read_journal
from resilient.launcher.attempts import AttemptStore
from resilient.launcher.status import describe

RUN = [sys.executable, "-m", "resilient", "run"]
# Children print "child" + " ready" so that the launcher's echo of the command line does not match.


def run(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, *args], capture_output=True, text=True, timeout=timeout, env=env or job_env())


def kinds(ckpt: Path) -> list[str]:
    return [event["event"] for event in read_journal(ckpt).events]


def test_statuses_of_simple_commands(tmp_path: Path) -> None:
    assert run("--", sys.executable, "-c", "pass").returncode == 0
    assert run("--", sys.executable, "-c", "raise SystemExit(75)").returncode == 75
    missing = run("--", str(tmp_path / "no-such-program"))
    assert missing.returncode == 127
    assert "Cannot start" in missing.stderr


@pytest.mark.parametrize("args, expected", [
    (["--grace", "-1", "--", "true"], "grace must be a number of at least 0, got -1"),
    (["--max-restarts", "-2", "--", "true"], "max_restarts must be an integer of at least 0, got -2"),
    (["--hang-timeout", "0", "--", "true"], "hang_timeout must be a number of at least 1, got 0"),
    (["--signals", "SIGKILL", "--", "true"], "SIGKILL: it cannot be caught"),
    ([], "no command given"),
])
def test_bad_options_are_rejected(args: list[str], expected: str) -> None:
    result = run(*args)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr, result.stderr


def test_attempt_counter_shared_and_persistent(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    show = ["--ckpt-dir", str(ckpt), "--", sys.executable, "-c", "import os; print(os.environ['RESILIENT_ATTEMPT'])"]
    assert [run(*show).stdout.strip() for _ in range(2)] == ["1", "2"]
    # Two launchers of one allocation (one per node) share a key and therefore an attempt number.
    env = job_env(RESILIENT_ATTEMPT_KEY="job-42")
    assert [run(*show, env=env).stdout.strip() for _ in range(2)] == ["3", "3"]
    assert json.loads((ckpt / ".resilient" / "attempts.json").read_text())["next"] == 4


def test_startup_failures_stop_restarts(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    result = run("--ckpt-dir", str(ckpt), "--max-restarts", "5", "--backoff", "0.1", "--",
                 sys.executable, "-c", "raise SystemExit(3)")
    assert result.returncode == 3
    assert "start-up failure, not a preemption" in result.stderr
    assert kinds(ckpt).count("start") == 2
    assert "startup_failure" in kinds(ckpt)
    records = AttemptStore(ckpt / ".resilient").records()
    assert [(record["outcome"], record["reached_step"]) for record in records] == [("crash", False)] * 2


HANDLER = """
import signal, sys, time
signal.signal(signal.SIGUSR1, lambda *a: (print('child got ' + 'USR1', flush=True), sys.exit(75)))
print('child' + ' ready', flush=True)
time.sleep(60)
"""


def test_relay_spares_bash_wrapper(tmp_path: Path) -> None:
    job = Job.start([*RUN, "--", "bash", "-c", f"{sys.executable} -c \"{HANDLER}\"; s=$?; echo bash saw $s; exit $s"])
    job.wait_for(lambda: "child ready" in job.output, 30, "the child to start")
    job.process.send_signal(signal.SIGUSR1)
    assert job.wait(30) == 75
    assert "child got USR1" in job.output
    assert "bash saw 75" in job.output


def test_signal_nobody_handles_goes_to_every_process() -> None:
    job = Job.start([*RUN, "--grace", "30", "--", "bash", "-c", "sleep 60; echo UNREACHED$((1 + 1))"])
    time.sleep(1)
    started = time.monotonic()
    job.process.send_signal(signal.SIGTERM)
    assert job.wait(30) == 75, "a stop before any step is a stop during start-up"
    assert time.monotonic() - started < 20, "the tree should exit on the relayed SIGTERM, not at the grace deadline"
    assert "UNREACHED2" not in job.output


def test_grace_deadline_kills_a_process_that_ignores_sigterm(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, lambda *a: print('child ' + 'ignored it', flush=True)); " \
               "print('child' + ' ready', flush=True); time.sleep(120)"
    job = Job.start([*RUN, "--ckpt-dir", str(ckpt), "--grace", "2", "--", sys.executable, "-c", stubborn])
    job.wait_for(lambda: "child ready" in job.output, 30, "the child to start")
    job.process.send_signal(signal.SIGTERM)
    assert job.wait(30) == 137
    assert "child ignored it" in job.output
    kill = [event for event in read_journal(ckpt).events if event["event"] == "kill"]
    assert len(kill) == 1
    assert "after the stop signal" in kill[0]["why"]
    assert kill[0]["processes"][0]["command"].startswith(sys.executable)


def test_second_sigint_kills_at_once() -> None:
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, lambda *a: None); print('child' + ' ready', flush=True); " \
               "time.sleep(120)"
    job = Job.start([*RUN, "--grace", "100", "--", sys.executable, "-c", stubborn])
    job.wait_for(lambda: "child ready" in job.output, 30, "the child to start")
    job.process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    job.process.send_signal(signal.SIGINT)
    assert job.wait(20) == 137
    assert "a second SIGINT" in job.output
    assert job.output.count("SIGKILLed") == 1, job.output


def test_orphans_left_by_the_command_are_stopped(tmp_path: Path) -> None:
    marker = tmp_path / "orphan-marker"
    job = Job.start([*RUN, "--grace", "30", "--", "bash", "-c", f"{sys.executable} -c 'import time; time.sleep(300)' {marker} & exit 0"])
    assert job.wait(30) == 0
    assert "left" in job.output
    assert "running" in job.output
    assert not [proc for proc in psutil.process_iter(["cmdline"]) if str(marker) in " ".join(proc.info["cmdline"] or [])]


def test_status_renders_every_event_kind(tmp_path: Path) -> None:
    journal = Journal(tmp_path, source="launcher")
    samples = {
        "start": {"command": ["torchrun", "train.py"], "child_pid": 10},
        "resume": {"step": 20, "checkpoint": "/ckpt/step_000000020", "torchelastic_restart": 1},
        "signal": {"signal": "SIGUSR1", "relayed_to": [11, 12]},
        "stop": {"step": 23, "reason": "preemption"},
        "checkpoint": {"step": 23, "reason": "preemption", "bytes": 6_100_000, "seconds": 0.07},
        "hang": {"idle_seconds": 61.0, "ranks_with_stacks": [0, 1], "stacks_dir": "/ckpt/.resilient/x",
                 "stopped_pids": [12]},
        "kill": {"why": "after a hang", "processes": [{"pid": 12, "command": "python train.py"}]},
        "exit": {"status": 75, "outcome": "preempted"},
        "restart": {"restart": 1, "max_restarts": 3, "delay": 1.0, "reason": "crash"},
        "startup_failure": {"status": 3},
        "requeue": {"target": "41_3", "accepted": True},
        "finish": {"status": 75, "outcome": "preempted"},
    }
    assert set(samples) == set(EVENTS), "every documented event kind needs a sample here"
    for kind, fields in samples.items():
        journal.append(kind, attempt=2, **fields)
    with open(tmp_path / "journal.jsonl", "a") as handle:
        handle.write('{"torn line\n')

    table = subprocess.run([sys.executable, "-m", "resilient", "status", str(tmp_path)], capture_output=True,
                           text=True, check=True).stdout
    for kind, fields in samples.items():
        sentence = describe({"event": kind, **fields})
        assert "=" not in sentence, f"{kind} fell back to the generic key=value form: {sentence}"
        assert sentence in table
    assert "(1 unreadable lines skipped)" in table
    raw = subprocess.run([sys.executable, "-m", "resilient", "status", str(tmp_path), "--json"], capture_output=True,
                         text=True, check=True).stdout
    parsed = json.loads(raw)
    assert [event["event"] for event in parsed["events"]] == list(samples)
    assert parsed["skipped_lines"] == 1


def test_status_of_a_directory_without_journal(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "resilient", "status", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0
    assert "no events" in result.stdout
    missing = subprocess.run([sys.executable, "-m", "resilient", "status", str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr


def test_orphan_after_success_is_not_a_failure(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    marker = tmp_path / "orphan-marker"
    # The command exits only once the orphan runs with SIGTERM ignored. Otherwise, under load, the
    # launcher's SIGTERM could reach the subshell before its trap, and no SIGKILL would be needed.
    orphan = (f"(trap '' TERM; exec {sys.executable} -c 'import pathlib, sys, time; pathlib.Path(sys.argv[1]).touch(); "
              f"time.sleep(300)' {marker}) & while [ ! -e {marker} ]; do sleep 0.05; done; exit 0")
    result = run("--ckpt-dir", str(ckpt), "--grace", "2", "--max-restarts", "1", "--", "bash", "-c", orphan)
    assert result.returncode == 0, result.stderr
    assert kinds(ckpt).count("start") == 1
    kill = [event for event in read_journal(ckpt).events if event["event"] == "kill"]
    assert len(kill) == 1
    assert "after the command exited" in kill[0]["why"]


def test_stop_during_startup_exits_75(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    job = Job.start([*RUN, "--ckpt-dir", str(ckpt), "--", sys.executable, "-c",
                     "import time; print('child' + ' loading', flush=True); time.sleep(60)"])
    job.wait_for(lambda: "child loading" in job.output, 30, "the child to start")
    job.process.send_signal(signal.SIGTERM)
    assert job.wait(30) == 75
    exits = [event for event in read_journal(ckpt).events if event["event"] == "exit"]
    assert exits[0]["outcome"] == "stopped during start-up"
    assert exits[0]["command_status"] == 128 + signal.SIGTERM


def test_first_sigint_relays_sigterm() -> None:
    child = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(75)); " \
            "print('child' + ' ready', flush=True); time.sleep(60)"
    job = Job.start([*RUN, "--", sys.executable, "-c", child])
    job.wait_for(lambda: "child ready" in job.output, 30, "the child to start")
    job.process.send_signal(signal.SIGINT)
    assert job.wait(30) == 75
    assert "relayed SIGTERM" in job.output


def test_launcher_death_terminates_the_command(tmp_path: Path) -> None:
    marker = tmp_path / "terminated"
    child = f"import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: " \
            f"(pathlib.Path({str(marker)!r}).write_text('x'), sys.exit(0))); print('child' + ' ready', flush=True); time.sleep(60)"
    job = Job.start([*RUN, "--", sys.executable, "-c", child])
    job.wait_for(lambda: "child ready" in job.output, 30, "the child to start")
    job.process.kill()
    deadline = time.monotonic() + 20
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the command did not get SIGTERM when the launcher died"


def test_missing_command_is_not_restarted() -> None:
    result = run("--max-restarts", "3", "--backoff", "0", "--", "no-such-program-anywhere")
    assert result.returncode == 127
    assert result.stderr.count("Cannot start") == 1


def test_unusable_ckpt_dir_and_signal_rejected(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run("--ckpt-dir", str(blocker / "sub"), "--", "true")
    assert result.returncode == 2, result.stderr
    assert "Pass a writable directory" in result.stderr
    chld = run("--signals", "SIGCHLD", "--", "true")
    assert chld.returncode == 2
    assert "do not ask a process to stop" in chld.stderr


def test_damaged_attempt_history_is_reset(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    show = ["--ckpt-dir", str(ckpt), "--", sys.executable, "-c", "import os; print(os.environ['RESILIENT_ATTEMPT'])"]
    assert run(*show).stdout.strip() == "1"
    history = ckpt / ".resilient" / "attempts.json"
    for damage in ("{not json", '{"attempts": [1, 2]}', '{"attempts": [{"attempt": "x"}], "next": "abc"}'):
        history.write_text(damage)
        result = run(*show)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    # The attempt directories survive the damage, so numbering continues after them.
    assert int(result.stdout.strip()) >= 2


def test_restart_delay_is_capped() -> None:
    from resilient.launcher import LaunchOptions
    from resilient.launcher.runner import restart_delay

    options = LaunchOptions(command=("true",), backoff=1.0, max_backoff=60.0)
    assert [restart_delay(options, count) for count in (0, 1, 2)] == [1.0, 2.0, 4.0]
    assert restart_delay(options, 5000) == 60.0


def test_status_survives_odd_lines(tmp_path: Path) -> None:
    lines = ['{"event": "signal", "time": 1e30, "signal": "SIGTERM", "relayed_to": 5}',
             '{"event": "checkpoint", "time": NaN, "bytes": "many"}', '{"event": "exit", "time": "soon"}']
    (tmp_path / "journal.jsonl").write_text("\n".join(lines) + "\n")
    result = subprocess.run([sys.executable, "-m", "resilient", "status", str(tmp_path)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert "relayed_to=5" in result.stdout
    directory = tmp_path / "other"
    (directory / "journal.jsonl").mkdir(parents=True)
    broken = subprocess.run([sys.executable, "-m", "resilient", "status", str(directory)], capture_output=True,
                            text=True)
    assert broken.returncode == 1
    assert "is not a regular file" in broken.stderr
