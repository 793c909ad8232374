"""Hostile and broken environments: crafted pickles, a full disk, a rank frozen during agreement.

The crafted checkpoints rewrite the manifest's sizes and checksums to match, as
the author of a crafted checkpoint would. The safe metadata reader is then
the only defence against the code the file carries.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from jobs import Job, job_env, torchrun_command
from resilient import CheckpointLoadError
from resilient.checkpoint.discovery import COMPLETE, scan
from resilient.checkpoint.fsutil import checksum_file
from resilient.checkpoint.layout import MARKER_NAME, checkpoint_name, read_manifest, read_run_id
from resilient.checkpoint.load import verify_checksums
from resilient.convert import checkpoint_to_file
from test_supervisor_single import MAX_STEPS, Trainer, reference_digest, run
from checkpoint_builder import edit_manifest

SCRIPTS = Path(__file__).parent / "scripts"


class RunsCode:
    """Unpickling this object runs ``exec``, which here creates the file ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return exec, (f"open({str(self.target)!r}, 'w').write('ran')",)


def plant(checkpoint: Path, name: str, data: bytes) -> None:
    """Write ``checkpoint/name`` and make the manifest's size and checksum for it match."""
    (checkpoint / name).write_bytes(data)

    def update(payload: dict) -> None:
        entries = [entry for entry in payload["files"] if entry["path"] == name]
        if not entries:
            entries = [{"path": name, "rank": 0}]
            payload["files"].append(entries[0])
        entries[0]["size"] = len(data)
        entries[0]["checksum"] = checksum_file(checkpoint / name)

    edit_manifest(checkpoint, update)


def saved_run(root: Path) -> Path:
    """Train 20 steps with saves at 10 and 20; return the step-20 checkpoint."""
    run(root, Trainer("sgd", seed=0), 20, save_every=10, keep=5)
    return root / checkpoint_name(20)


def real_metadata(checkpoint: Path):
    with open(checkpoint / ".metadata", "rb") as file:
        return pickle.load(file)  # a checkpoint this test wrote itself


def code_in_metadata(checkpoint: Path, target: Path) -> str:
    plant(checkpoint, ".metadata", pickle.dumps(RunsCode(target)))
    return "builtins.exec"


def bytes_entry(checkpoint: Path, target: Path) -> str:
    # DCP loads an entry marked as bytes with torch.load(weights_only=False).
    metadata = real_metadata(checkpoint)
    key = next(iter(metadata.state_dict_metadata))
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    plant(checkpoint, "__0_1.distcp", pickle.dumps(RunsCode(target)))
    metadata.storage_data = {k: v for k, v in metadata.storage_data.items() if k.fqn != key}
    metadata.storage_data[MetadataIndex(key)] = _StorageInfo("__0_1.distcp", 0, (checkpoint / "__0_1.distcp").stat().st_size)
    plant(checkpoint, ".metadata", pickle.dumps(metadata))
    return "BytesStorageMetadata"


def path_outside(checkpoint: Path, target: Path) -> str:
    metadata = real_metadata(checkpoint)
    for index, info in metadata.storage_data.items():
        metadata.storage_data[index] = _StorageInfo(f"../{checkpoint_name(10)}/{info.relative_path}", info.offset,
                                                    info.length)
    plant(checkpoint, ".metadata", pickle.dumps(metadata))
    return "outside the checkpoint directory"


def entry_table_none(checkpoint: Path, target: Path) -> str:
    # Only allowed classes, put together in a way DCP never writes.
    metadata = real_metadata(checkpoint)
    metadata.state_dict_metadata = None
    plant(checkpoint, ".metadata", pickle.dumps(metadata))
    return "is not valid DCP metadata"


def offset_past_end(checkpoint: Path, target: Path) -> str:
    metadata = real_metadata(checkpoint)
    index, info = next(iter(metadata.storage_data.items()))
    metadata.storage_data[index] = _StorageInfo(info.relative_path, 10**12, info.length)
    plant(checkpoint, ".metadata", pickle.dumps(metadata))
    return "which has"


def reads_manifest(checkpoint: Path, target: Path) -> str:
    metadata = real_metadata(checkpoint)
    index, info = next(iter(metadata.storage_data.items()))
    metadata.storage_data[index] = _StorageInfo(MARKER_NAME, 0, 10)
    plant(checkpoint, ".metadata", pickle.dumps(metadata))
    return "not a data file listed in the manifest"


CRAFTS = {"code-in-metadata": code_in_metadata, "bytes-entry": bytes_entry, "path-outside": path_outside,
          "entry-table-none": entry_table_none, "offset-past-end": offset_past_end, "reads-manifest": reads_manifest}


@pytest.mark.parametrize("craft", sorted(CRAFTS))
def test_crafted_metadata_is_never_unpickled(tmp_path: Path, craft: str) -> None:
    root, target = tmp_path / "ckpt", tmp_path / "code-ran"
    checkpoint = saved_run(root)
    message = CRAFTS[craft](checkpoint, target)
    others = {path: path.read_bytes() for path in (root / checkpoint_name(10)).iterdir()}

    verify = subprocess.run([sys.executable, "-m", "resilient", "verify", str(checkpoint)], capture_output=True,
                            text=True, timeout=120)
    with pytest.raises(CheckpointLoadError, match=message):
        checkpoint_to_file(checkpoint, tmp_path / "out.pt")

    assert verify.returncode == 1
    assert message in verify.stdout
    assert str(checkpoint / ".metadata") in verify.stdout
    assert not target.exists(), "unpickling ran the planted code"
    assert not (tmp_path / "out.pt").exists()
    assert {path: path.read_bytes() for path in (root / checkpoint_name(10)).iterdir()} == others


@pytest.mark.parametrize("craft", sorted(CRAFTS))
def test_crafted_latest_falls_back_to_previous(tmp_path: Path, craft: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    root, target = tmp_path / "ckpt", tmp_path / "code-ran"
    checkpoint = saved_run(root)
    message = CRAFTS[craft](checkpoint, target)

    trainer = Trainer("sgd", seed=1234)
    with caplog.at_level(logging.ERROR, logger="resilient"):
        supervisor = run(root, trainer, MAX_STEPS, save_every=10, keep=5)

    assert supervisor.resumed_from == root / checkpoint_name(10)
    assert not target.exists(), "unpickling ran the planted code"
    errors = [record.getMessage() for record in caplog.records
              if record.name.startswith("resilient") and record.levelno >= logging.ERROR]
    assert any(str(checkpoint / ".metadata") in text and message in text for text in errors), errors
    assert trainer.digest() == reference_digest("sgd")
    assert len(list(root.glob(checkpoint_name(20) + ".corrupt-*"))) == 1


def test_weights_only_rejects_code_in_tensor_file(tmp_path: Path) -> None:
    # DCP loads each stored tensor with torch.load(weights_only=True), so a
    # torch.save archive whose pickle runs code fails to load instead of running.
    root, target = tmp_path / "ckpt", tmp_path / "code-ran"
    checkpoint = saved_run(root)
    metadata = real_metadata(checkpoint)
    index, info = next(iter(metadata.storage_data.items()))
    archive = tmp_path / "archive.pt"
    torch.save(RunsCode(target), archive)
    shard = checkpoint / info.relative_path
    offset = shard.stat().st_size
    plant(checkpoint, info.relative_path, shard.read_bytes() + archive.read_bytes())
    metadata.storage_data[index] = _StorageInfo(info.relative_path, offset, archive.stat().st_size)
    plant(checkpoint, ".metadata", pickle.dumps(metadata))
    assert verify_checksums(checkpoint, read_manifest(checkpoint)) == []

    with pytest.raises(CheckpointLoadError, match="weights_only loading refused it"):
        checkpoint_to_file(checkpoint, tmp_path / "out.pt")

    assert not target.exists(), "loading ran the planted code"


def test_disk_full_fails_every_rank_and_keeps_previous(mount_tmpfs) -> None:
    # One checkpoint of the 512-wide model takes 1.1 MB, of which rank 0 writes 1.05 MB.
    # The job starts with room for two. Once step 3 is committed, a file fills the disk
    # up to 100 KB, as another job's output would, so the step-6 save runs out of space.
    disk = mount_tmpfs("4m")
    ckpt = disk / "ckpt"
    job = Job.start(torchrun_command(SCRIPTS / "faulty_save.py", str(ckpt), "none", "0"),
                    job_env(FAULTY_SAVE_WIDTH="512", FAULTY_SAVE_STEP_SECONDS="1"))
    job.wait_for(lambda: (ckpt / checkpoint_name(3) / MARKER_NAME).exists(), timeout=120,
                 description="the step-3 checkpoint")
    with open(disk / "filler", "wb") as filler:
        filler.write(b"\0" * (shutil.disk_usage(disk).free - 100_000))
    status = job.wait(timeout=180)

    assert status != 0
    for rank in (0, 1):
        assert f"rank {rank}: CheckpointError" in job.output, job.output[-3000:]
    failures = [line for line in job.output.splitlines() if ": CheckpointError after" in line]
    assert len(failures) == 2, job.output[-3000:]
    assert all(f"The filesystem of {ckpt} is full or over quota" in line for line in failures), failures
    assert [(info.step, info.status) for info in scan(ckpt, read_run_id(ckpt))] == [(3, COMPLETE)]
    assert not list(ckpt.glob("step_000000006*")), "the failed save left its staging directory"
    assert verify_checksums(ckpt / checkpoint_name(3), read_manifest(ckpt / checkpoint_name(3))) == []


def test_rank_frozen_during_agreement(tmp_path: Path) -> None:
    # Rank 1 is frozen with SIGSTOP and rank 0 gets SIGTERM: rank 0's next stop
    # agreement waits for a rank that does not respond. The collective timeout (5 s)
    # must end it with an AgreementError, and the stop must publish nothing.
    ckpt = tmp_path / "ckpt"
    job = Job.start(torchrun_command(SCRIPTS / "frozen_rank.py", str(ckpt), "5"))
    try:
        job.wait_for(lambda: (ckpt / checkpoint_name(5) / MARKER_NAME).exists() and "rank 0 step 7" in job.output,
                     timeout=120, description="step 7 after the step-5 checkpoint")
        workers = job.workers()
        workers[1].suspend()
        before = sorted(path.name for path in ckpt.iterdir())
        workers[0].send_signal(signal.SIGTERM)
        try:
            workers[0].wait(120)  # bounds the test, not the speed: 24 times the collective timeout
        except psutil.TimeoutExpired:
            raise AssertionError(f"rank 0 still runs 120 s after the signal:\n{job.output[-3000:]}") from None
        after = sorted(path.name for path in ckpt.iterdir())
    finally:
        job.kill()

    ended = [line for line in job.output.splitlines() if line.startswith("rank 0: ")]
    assert len(ended) == 1, job.output[-3000:]
    assert ended[0].startswith("rank 0: AgreementError after "), ended[0]
    assert "did not complete within collective_timeout (5 s); a stop signal arrived here" in ended[0]
    assert after == before, f"the stop published or staged something: {before} -> {after}"
    assert [(info.step, info.status) for info in scan(ckpt, read_run_id(ckpt))] == [(5, COMPLETE)]


def _drop_rank_file(checkpoint: Path) -> str:
    (checkpoint / "__0_0.distcp").unlink()
    return "file __0_0.distcp listed in the manifest is missing"


def _truncate_shard(checkpoint: Path) -> str:
    shard = checkpoint / "__0_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as handle:
        handle.truncate(size // 2)
    return f"file __0_0.distcp has {size // 2} bytes, the manifest says {size}"


def _invalid_json(checkpoint: Path) -> str:
    marker = checkpoint / MARKER_NAME
    marker.write_text(marker.read_text()[:40])
    return "is not valid JSON"


def _listed_outside(listed: str):
    def edit(checkpoint: Path) -> str:
        def point_outside(payload: dict) -> None:
            entry = next(item for item in payload["files"] if item["path"] == "__0_0.distcp")
            entry["path"] = listed if listed.startswith("/") else f"../{checkpoint_name(10)}/__0_0.distcp"

        edit_manifest(checkpoint, point_outside)
        return "file path"
    return edit


BREAKS = {"missing-rank-file": _drop_rank_file, "truncated-shard": _truncate_shard, "invalid-json": _invalid_json,
          "dotdot-path": _listed_outside("../"), "absolute-path": _listed_outside("/etc/passwd")}


@pytest.mark.parametrize("kind", sorted(BREAKS))
def test_broken_latest_skipped_others_untouched(tmp_path: Path, kind: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "ckpt"
    checkpoint = saved_run(root)
    message = BREAKS[kind](checkpoint)
    broken = {path.name: path.read_bytes() for path in checkpoint.iterdir()}
    previous = {path.name: path.read_bytes() for path in (root / checkpoint_name(10)).iterdir()}

    trainer = Trainer("sgd", seed=1234)
    with caplog.at_level(logging.WARNING, logger="resilient"):
        supervisor = run(root, trainer, MAX_STEPS, save_every=10, keep=5)

    assert supervisor.resumed_from == root / checkpoint_name(10)
    assert trainer.digest() == reference_digest("sgd")
    warnings = [record.getMessage() for record in caplog.records
                if record.name.startswith("resilient") and record.levelno >= logging.WARNING]
    skipped = [text for text in warnings if str(checkpoint) in text]
    assert skipped and message in skipped[0], warnings
    assert {path.name: path.read_bytes() for path in (root / checkpoint_name(10)).iterdir()} == previous
    # The resumed run saved step 20 again, so the directory now contains new files, not the broken ones.
    assert (root / checkpoint_name(20) / MARKER_NAME).exists()
    assert broken != {path.name: path.read_bytes() for path in (root / checkpoint_name(20)).iterdir()}
