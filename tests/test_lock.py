"""One job per checkpoint directory: the lock, its holder record, stale locks and the override."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import job_env
from resilient import ConfigError, Supervisor
from resilient.checkpoint.lock import read_lock_holder

HOLDER = """
import sys, time, resilient
with resilient.Supervisor(ckpt_dir=sys.argv[1], deadline=None) as sup:
    sup.resume()
    print("holding", flush=True)
    time.sleep(300)
"""


@pytest.fixture
def holder(tmp_path: Path):
    """A process whose Supervisor holds the lock of tmp_path/ckpt."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "ckpt")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=job_env())
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.strip() == "holding", process.stderr.read() if process.poll() is not None else line
    yield process
    process.kill()
    process.wait()


def test_second_job_is_rejected_with_the_holder(tmp_path: Path, holder: subprocess.Popen) -> None:
    with Supervisor(ckpt_dir=tmp_path / "ckpt", deadline=None) as sup:
        with pytest.raises(ConfigError) as raised:
            sup.resume()
    message = str(raised.value)
    assert "is in use by another job" in message
    assert f"pid {holder.pid} on host {socket.gethostname()}" in message
    assert "started at 20" in message
    assert "RESILIENT_LOCK=0" in message
    assert read_lock_holder(tmp_path / "ckpt")["pid"] == holder.pid


def test_lock_of_a_killed_job_is_taken_over(tmp_path: Path, holder: subprocess.Popen, caplog) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level("WARNING", logger="resilient"):
        with Supervisor(ckpt_dir=tmp_path / "ckpt", deadline=None) as sup:
            sup.resume()
            assert read_lock_holder(tmp_path / "ckpt")["pid"] == os.getpid()
    assert f"Taking over the lock of {tmp_path / 'ckpt'} from a job that is gone: pid {holder.pid}" in caplog.text
    assert read_lock_holder(tmp_path / "ckpt") is None, "closing the Supervisor releases the lock"


def test_override_skips_the_lock(tmp_path: Path, holder: subprocess.Popen, monkeypatch, caplog) -> None:
    monkeypatch.setenv("RESILIENT_LOCK", "0")
    with caplog.at_level("WARNING", logger="resilient"):
        with Supervisor(ckpt_dir=tmp_path / "ckpt", deadline=None) as sup:
            sup.resume()
    assert "RESILIENT_LOCK=0: not locking" in caplog.text


def test_clean_refuses_while_a_job_holds_the_lock(tmp_path: Path, holder: subprocess.Popen) -> None:
    staging = tmp_path / "ckpt" / "step_000000005.tmp-abcd1234"
    staging.mkdir()
    result = subprocess.run([sys.executable, "-m", "resilient", "clean", str(tmp_path / "ckpt"), "--yes"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"in use by a running job (pid {holder.pid}" in result.stderr
    assert staging.exists()


def test_sequential_supervisors_in_one_process_share_the_directory(tmp_path: Path) -> None:
    # The second would raise ConfigError if closing the first had not released the lock.
    for _ in range(2):
        with Supervisor(ckpt_dir=tmp_path / "ckpt", deadline=None) as sup:
            sup.resume()
            assert read_lock_holder(tmp_path / "ckpt")["pid"] == os.getpid()
