"""Start-up checks: free disk space for two checkpoints, and torch version changes."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from resilient import ConfigError, Supervisor
from resilient.checkpoint.layout import Manifest
from resilient.validation import check_disk_space, warn_on_version_change


@pytest.fixture
def small_tmpfs(mount_tmpfs) -> Path:
    return mount_tmpfs("2m")


def test_too_little_space_rejected_at_start(small_tmpfs: Path) -> None:
    model = torch.nn.Linear(1024, 1024)  # about 4 MB of weights
    with Supervisor(ckpt_dir=small_tmpfs) as sup:
        sup.register(model=model, optimizer=torch.optim.AdamW(model.parameters()))
        with pytest.raises(ConfigError) as raised:
            sup.resume()

    message = str(raised.value)
    assert "ckpt_dir" in message
    assert str(small_tmpfs) in message
    # Sizes in the unit that fits them, not "0.00 GB" for a few megabytes.
    assert re.search(r"has 2\.1 MB free, but this job needs at least \d+\.\d MB there", message), message


def test_enough_space_passes(small_tmpfs: Path) -> None:
    model = torch.nn.Linear(16, 16)
    with Supervisor(ckpt_dir=small_tmpfs) as sup:
        sup.register(model=model, optimizer=torch.optim.AdamW(model.parameters()))
        assert sup.resume().step == 0


def test_possible_shortage_only_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="resilient")
    free = __import__("shutil").disk_usage(tmp_path).free

    check_disk_space(tmp_path, lower_bytes=1, upper_bytes=free)

    assert "a save may fail for lack of space" in caplog.text


def test_existing_checkpoint_counts_as_one(tmp_path: Path) -> None:
    free = __import__("shutil").disk_usage(tmp_path).free
    size = int(free * 0.6)

    with pytest.raises(ConfigError):
        check_disk_space(tmp_path, lower_bytes=size, upper_bytes=size)
    check_disk_space(tmp_path, lower_bytes=size, upper_bytes=size, one_on_disk=True)


def manifest_with_torch(version: str) -> Manifest:
    return Manifest(step=1, reason="manual", world_size=1, run_id="run", files=(), created_at=0.0,
                    save_seconds=0.0, versions={"torch": version})


def test_torch_minor_change_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="resilient")

    warn_on_version_change(manifest_with_torch("1.13.1+cu117"), tmp_path)

    assert "written by torch 1.13.1+cu117" in caplog.text
    assert f"loaded by torch {torch.__version__}" in caplog.text


def test_torch_patch_change_silent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="resilient")
    major, minor = torch.__version__.split(".")[:2]

    warn_on_version_change(manifest_with_torch(f"{major}.{minor}.99"), tmp_path)

    assert caplog.text == ""
