"""Single-process tests of resume rules: roll-backs, corrupt checkpoints, requested saves, data order."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from jobs import Job, run_to_end
from resilient import CheckpointError, CheckpointLoadError, Preempted, Supervisor, state_digest
from resilient.checkpoint.discovery import COMPLETE, scan
from resilient.checkpoint.layout import read_run_id


def tiny() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = F.mse_loss(model(torch.randn(4, 4)), torch.randn(4, 1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def run_steps(ckpt: Path, max_steps: int, **settings) -> Supervisor:
    model, optimizer = tiny()
    with Supervisor(ckpt_dir=ckpt, **settings) as sup:
        sup.register(model=model, optimizer=optimizer)
        for _ in sup.steps(max_steps):
            train_step(model, optimizer)
    return sup


def complete(ckpt: Path) -> list[int]:
    return [info.step for info in scan(ckpt, read_run_id(ckpt)) if info.status == COMPLETE]


def flip_byte(checkpoint: Path) -> Path:
    shard = sorted(checkpoint.glob("__0_*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard


def test_resume_from_applies_only_once(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    run_steps(ckpt, 30, save_every=10)
    first = run_steps(ckpt, 35, save_every=10, resume_from=ckpt / "step_000000020")
    second = run_steps(ckpt, 40, save_every=10, resume_from=ckpt / "step_000000020")

    assert first.resumed_from == ckpt / "step_000000020"
    assert second.resumed_from == ckpt / "step_000000035"
    assert complete(ckpt) == [30, 35, 40]


def test_resume_from_older_sets_newer_aside(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    run_steps(ckpt, 30, save_every=10, keep=2)
    run_steps(ckpt, 25, save_every=10, keep=2, resume_from=ckpt / "step_000000020")

    assert complete(ckpt) == [20, 25]
    assert len(list(ckpt.glob("step_000000030.superseded-*"))) == 1
    assert run_steps(ckpt, 25, save_every=10, keep=2).resumed_from == ckpt / "step_000000025"


def test_resume_from_corrupt_raises(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    run_steps(ckpt, 20, save_every=10)
    flip_byte(ckpt / "step_000000010")

    with pytest.raises(CheckpointLoadError, match="no checkpoint could be verified"):
        run_steps(ckpt, 30, save_every=10, resume_from=ckpt / "step_000000010")


def test_all_corrupt_raises_not_restarts(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    run_steps(ckpt, 20, save_every=10, keep=2)
    flip_byte(ckpt / "step_000000010")
    flip_byte(ckpt / "step_000000020")

    with pytest.raises(CheckpointLoadError) as raised:
        run_steps(ckpt, 30, save_every=10)

    assert "step_000000010" in str(raised.value)
    assert "step_000000020" in str(raised.value)
    assert sorted(path.name for path in ckpt.glob("step_*")) == ["step_000000010", "step_000000020"]


def test_fallback_sets_corrupt_aside(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    run_steps(ckpt, 30, save_every=10, keep=3)
    flip_byte(ckpt / "step_000000030")

    # keep=1: retention must not delete the new saves because of the corrupt step 30.
    resumed = run_steps(ckpt, 27, save_every=5, keep=1)

    assert resumed.resumed_from == ckpt / "step_000000020"
    assert complete(ckpt) == [27]
    assert len(list(ckpt.glob("step_000000030.corrupt-*"))) == 1


def test_request_save_inside_loop(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    model, optimizer = tiny()
    with Supervisor(ckpt_dir=ckpt) as sup:
        sup.register(model=model, optimizer=optimizer)
        for step in sup.steps(10):
            train_step(model, optimizer)
            if step == 4:
                with pytest.raises(RuntimeError, match="inside the loop body of step 4"):
                    sup.save()
                sup.request_save()

    reasons = {info.step: info.reason for info in scan(ckpt, read_run_id(ckpt))}
    assert reasons == {4: "manual", 10: "final"}


def test_save_rejects_unknown_reason(tmp_path: Path) -> None:
    model, optimizer = tiny()
    with Supervisor(ckpt_dir=tmp_path / "ckpt") as sup:
        sup.register(model=model, optimizer=optimizer)
        sup.resume()
        with pytest.raises(ValueError, match="invalid save reason 'custom'"):
            sup.save("custom")


class Augmented(Dataset):
    """Samples with a random augmentation drawn from torch's global generator."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.full((4,), float(index)) + torch.rand(4)


def shuffled_run(ckpt: Path, max_steps: int, signal_at: int | None = None) -> str:
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    model, optimizer = tiny()
    # A plain shuffling DataLoader: RandomSampler draws each epoch's order from torch's global generator.
    loader = DataLoader(Augmented(), batch_size=4, shuffle=True)
    with Supervisor(ckpt_dir=ckpt, save_every=7) as sup:
        sup.register(model=model, optimizer=optimizer)
        for step, batch in sup.train(loader, max_steps):
            inputs = batch / 40
            loss = F.mse_loss(model(inputs), inputs.mean(dim=1, keepdim=True))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)
    return state_digest(model, optimizer)


def test_shuffled_loader_resumes_mid_epoch(tmp_path: Path) -> None:
    expected = shuffled_run(tmp_path / "reference", 35)

    # 10 batches per epoch: the signal lands in the middle of the third epoch.
    with pytest.raises(Preempted) as raised:
        shuffled_run(tmp_path / "ckpt", 35, signal_at=24)
    resumed = shuffled_run(tmp_path / "ckpt", 35)

    assert raised.value.step == 24
    assert resumed == expected
    model, _ = tiny()
    assert resumed != state_digest(model), "the digest must depend on training"


def test_save_after_break_raises(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    model, optimizer = tiny()
    with Supervisor(ckpt_dir=ckpt) as sup:
        sup.register(model=model, optimizer=optimizer)
        for step in sup.steps(10):
            train_step(model, optimizer)
            if step == 3:
                break
        with pytest.raises(RuntimeError, match="break during step 3"):
            sup.save()

    assert complete(ckpt) == []


def test_save_never_moves_other_runs_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    run_steps(tmp_path / "other", 5)
    run_steps(ckpt, 3)
    foreign = ckpt / "step_000000005"
    (tmp_path / "other" / "step_000000005").rename(foreign)

    with pytest.raises(CheckpointError, match="already contains a checkpoint of run"):
        run_steps(ckpt, 5)

    assert (foreign / "manifest.json").exists()
    assert not list(ckpt.glob("step_000000005.superseded-*"))
    assert not list(ckpt.glob("step_000000005.tmp-*"))



LOADER_WORKERS = Path(__file__).parent / "scripts" / "loader_workers.py"


@pytest.mark.parametrize("persistent", ["0", "1"])
def test_loader_workers_survive_job_sigterm(tmp_path: Path, persistent: str) -> None:
    expected = run_to_end([sys.executable, str(LOADER_WORKERS), str(tmp_path / "reference"), "30", persistent])
    ckpt = tmp_path / "ckpt"

    # Signal every process of the job, DataLoader workers included, from outside as SLURM does.
    job = Job.start([sys.executable, str(LOADER_WORKERS), str(ckpt), "30", persistent])
    job.wait_for_step(20, timeout=120)
    os.killpg(job.process.pid, signal.SIGTERM)
    status = job.wait(timeout=60)

    assert status == 75, job.output[-3000:]
    reasons = [info.reason for info in scan(ckpt, read_run_id(ckpt))]
    assert reasons == ["preemption"]
    resumed = run_to_end([sys.executable, str(LOADER_WORKERS), str(ckpt), "30", persistent])
    assert resumed.digest() == expected.digest()


def test_manifest_without_metadata_rejected(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    run_steps(ckpt, 20, save_every=10)
    marker = ckpt / "step_000000020" / "manifest.json"
    manifest = json.loads(marker.read_text())
    manifest["files"] = [entry for entry in manifest["files"] if entry["path"] != ".metadata"]
    marker.write_text(json.dumps(manifest))

    resumed = run_steps(ckpt, 25, save_every=10)

    assert resumed.resumed_from == ckpt / "step_000000010"
    assert len(list(ckpt.glob("step_000000020.corrupt-*"))) == 1


def test_closed_supervisor_rejects_save(tmp_path: Path) -> None:
    sup = run_steps(tmp_path / "ckpt", 3)

    with pytest.raises(RuntimeError, match="Supervisor is closed"):
        sup.save()


def test_grad_scaler_state_resumes(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    model, optimizer = tiny()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    with Supervisor(ckpt_dir=ckpt) as sup:
        sup.register(model=model, optimizer=optimizer, scaler=scaler)
        for _ in sup.steps(7):
            loss = F.mse_loss(model(torch.randn(4, 4)), torch.randn(4, 1))
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    saved = scaler.state_dict()

    model, optimizer = tiny()
    restored = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=3)
    with Supervisor(ckpt_dir=ckpt) as sup:
        sup.register(model=model, optimizer=optimizer, scaler=restored)
        sup.resume()

    assert saved["scale"] == 1024.0 * 2**2
    assert restored.state_dict() == saved


def test_pipeline_stage_change_rejected(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    model, optimizer = tiny()
    with Supervisor(ckpt_dir=ckpt) as sup:
        sup.register(model=model, optimizer=optimizer, pipeline_stages=2)
        for _ in sup.steps(3):
            train_step(model, optimizer)
    manifest = json.loads((ckpt / "step_000000003" / "manifest.json").read_text())
    assert manifest["layout"] == {"pipeline_stages": 2, "mesh_shape": None, "world_size": 1}

    model, optimizer = tiny()
    with Supervisor(ckpt_dir=ckpt) as sup:
        sup.register(model=model, optimizer=optimizer, pipeline_stages=3)
        with pytest.raises(CheckpointLoadError) as raised:
            sup.resume()

    message = str(raised.value)
    assert "saved with 2 pipeline stages on 1 ranks" in message
    assert "this job runs 3 stages on 1 ranks" in message
    assert "restart with 2 stages" in message


def test_grace_period_warning_names_fix(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="resilient")
    model, optimizer = tiny()
    with Supervisor(ckpt_dir=tmp_path / "ckpt", check_every=50, grace_period=1.0) as sup:
        sup.register(model=model, optimizer=optimizer)
        for _ in sup.steps(5):
            train_step(model, optimizer)
            time.sleep(0.05)

    assert caplog.text.count("may not be saved within grace_period=1 s") == 1
    assert "with check_every=50" in caplog.text
    # About 1 s / (2 x 0.05 s per step) = 10; the step time varies with machine load.
    suggested = re.search(r"set check_every to (\d+) or less", caplog.text)
    assert suggested is not None
    assert 1 <= int(suggested.group(1)) <= 10


def test_grace_period_fits_silently(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="resilient")
    run_steps(tmp_path / "ckpt", 5, grace_period=30.0)

    assert "grace_period" not in caplog.text
