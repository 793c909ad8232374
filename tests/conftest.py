from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from filelock import FileLock

from jobs import LM_ARGS, TRAIN_LM, run_to_end, torchrun_command


@pytest.fixture(autouse=True)
def restore_handlers(monkeypatch: pytest.MonkeyPatch):
    """Put back SIGTERM and SIGUSR1 even when a Supervisor is left open by a failing test."""
    monkeypatch.delenv("RESILIENT_SIGNALS", raising=False)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory shared by all pytest-xdist workers of this session."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in __import__("os").environ:
        root = root.parent
    return root


@pytest.fixture(scope="session")
def reference_digest(shared_dir: Path):
    """Return the final digest of an uninterrupted train_lm run, computed once per argument list."""

    def compute(max_steps: int, save_every: int, *extra: str) -> str:
        key = "-".join(["lm", str(max_steps), str(save_every), *(arg.strip("-") for arg in extra)])
        cache = shared_dir / f"{key}.json"
        with FileLock(str(shared_dir / f"{key}.lock")):
            if cache.exists():
                return json.loads(cache.read_text())["digest"]
            ckpt = shared_dir / f"{key}-ckpt"
            job = run_to_end(torchrun_command(TRAIN_LM, "--ckpt-dir", str(ckpt), "--max-steps", str(max_steps),
                                              "--save-every", str(save_every), *LM_ARGS, *extra))
            digest = job.digest()
            cache.write_text(json.dumps({"digest": digest}))
            return digest

    return compute


@pytest.fixture
def mount_tmpfs(tmp_path: Path):
    """Return a function that mounts a tmpfs of a given size (``"2m"``) and returns its path.

    A real shortage of disk space cannot be made otherwise; mounting needs root,
    which CI has. Without it the test is skipped with the reason.
    """
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mount_point = tmp_path / f"tmpfs-{len(mounted)}"
        mount_point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(mount_point)
        return mount_point

    yield mount
    for mount_point in mounted:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
