"""`resilient convert`: checkpoint directory to one file and back, with equality checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from resilient import Supervisor, state_digest
from resilient.convert import read_checkpoint


def build() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.2), nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)


def train(ckpt: Path, max_steps: int, **settings) -> str:
    model, optimizer, scheduler = build()
    with Supervisor(ckpt_dir=ckpt, **settings) as sup:
        sup.register(model=model, optimizer=optimizer, scheduler=scheduler)
        for _ in sup.steps(max_steps):
            loss = F.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return state_digest(model, optimizer)


def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resilient", "convert", *args], capture_output=True, text=True,
                          timeout=120)


def test_file_holds_every_entry(tmp_path: Path) -> None:
    train(tmp_path / "ckpt", 10)
    source = tmp_path / "ckpt" / "step_000000010"
    done = convert(str(source), str(tmp_path / "full.pt"))
    assert done.returncode == 0, done.stderr

    payload = torch.load(tmp_path / "full.pt", weights_only=True)
    _manifest, state = read_checkpoint(source, progress=lambda message: None)
    assert payload["step"] == 10
    assert payload["state"].keys() == state.keys()
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(payload["state"][key], value), key
        else:
            assert payload["state"][key] == value, key
    assert payload["state"]["ranks.0.schedulers"][0]["last_epoch"] == 10
    assert "verifying" in done.stderr


def test_round_trip_resumes_identically(tmp_path: Path) -> None:
    expected = train(tmp_path / "original", 16, save_every=10)
    train(tmp_path / "ckpt", 10)
    assert convert(str(tmp_path / "ckpt" / "step_000000010"), str(tmp_path / "full.pt")).returncode == 0

    done = convert(str(tmp_path / "full.pt"), str(tmp_path / "converted"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "converted" / "step_000000010" / "manifest.json").exists()

    assert train(tmp_path / "converted", 16, save_every=10) == expected


def test_model_only_loads_into_module(tmp_path: Path) -> None:
    train(tmp_path / "ckpt", 5)
    assert convert(str(tmp_path / "ckpt" / "step_000000005"), str(tmp_path / "model.pt"), "--model-only").returncode == 0

    weights = torch.load(tmp_path / "model.pt", weights_only=True)
    model, _optimizer, _scheduler = build()
    model.load_state_dict(weights)  # strict: every parameter and buffer, nothing else
    assert weights["1.num_batches_tracked"].item() == 5


def test_safetensors_matches_model_only(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    train(tmp_path / "ckpt", 5)
    source = str(tmp_path / "ckpt" / "step_000000005")
    assert convert(source, str(tmp_path / "model.pt"), "--model-only").returncode == 0
    assert convert(source, str(tmp_path / "model.safetensors"), "--safetensors").returncode == 0

    expected = torch.load(tmp_path / "model.pt", weights_only=True)
    written = safetensors.load_file(str(tmp_path / "model.safetensors"))
    assert written.keys() == expected.keys()
    for key in expected:
        assert torch.equal(written[key], expected[key]), key


def test_corrupt_source_rejected(tmp_path: Path) -> None:
    train(tmp_path / "ckpt", 5)
    shard = next((tmp_path / "ckpt" / "step_000000005").glob("__0_*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    done = convert(str(shard.parent), str(tmp_path / "full.pt"))

    assert done.returncode == 1
    assert "failed verification" in done.stderr
    assert not (tmp_path / "full.pt").exists()


def test_model_only_file_not_convertible_back(tmp_path: Path) -> None:
    train(tmp_path / "ckpt", 5)
    convert(str(tmp_path / "ckpt" / "step_000000005"), str(tmp_path / "model.pt"), "--model-only")

    done = convert(str(tmp_path / "model.pt"), str(tmp_path / "back"))

    assert done.returncode == 1
    assert "is not a full resilient checkpoint file" in done.stderr
