"""Deadline saves and the save-or-skip decision under a short grace period, in one process."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from resilient import Config, ConfigError, Preempted, Supervisor
from resilient.checkpoint.discovery import COMPLETE, scan
from resilient.checkpoint.layout import read_run_id
from resilient.deadline import MIN_DEADLINE_MARGIN, Deadline


class SlowState:
    """A registered object whose state_dict() takes ``seconds``, as a large state on a slow disk would."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def state_dict(self) -> dict[str, Any]:
        time.sleep(self.seconds)
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def complete(root: Path) -> dict[int, str]:
    return {info.step: info.reason for info in scan(root, read_run_id(root)) if info.status == COMPLETE}


def train(sup: Supervisor, model: nn.Module, max_steps: int, on_step=None, stateful=None) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sup.register(model=model, optimizer=optimizer, stateful=stateful or {})
    for step in sup.steps(max_steps):
        loss = model(torch.randn(4, 3)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step)
        time.sleep(0.02)


def test_deadline_stops_and_saves_before_the_end_time(tmp_path: Path) -> None:
    end = time.time() + 3.0
    with pytest.raises(Preempted) as stopped:
        with Supervisor(ckpt_dir=tmp_path, deadline=end, deadline_margin=1.5) as sup:
            train(sup, nn.Linear(3, 1), 100_000)
    assert time.time() < end, "the deadline save must finish before the end time"
    saved = complete(tmp_path)
    assert list(saved.values()) == ["deadline"]
    assert stopped.value.code == 75
    assert list(saved) == [stopped.value.step]


def test_deadline_margin_follows_measured_times() -> None:
    deadline = Deadline(end_time=1000.0, clock=lambda: 900.0)
    assert deadline.margin_seconds(None, None, 1) == MIN_DEADLINE_MARGIN
    assert deadline.margin_seconds(40.0, 1.0, 5) == 2 * 40.0 + 2 * 5 * 1.0
    assert not deadline.due(10.0, 0.5, 1)
    assert deadline.due(50.0, 0.5, 1), "a 100 s margin is due 100 s before the end"
    assert not Deadline(end_time=None).due(1e9, 1e9, 1)


def test_deadline_outside_slurm_is_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with Supervisor(ckpt_dir=tmp_path, save_every=None) as sup:
        train(sup, nn.Linear(3, 1), 20)
    assert complete(tmp_path) == {20: "final"}


@pytest.mark.parametrize("value, expected", [
    ("tomorrow", "deadline must be 'slurm', None or an end time"),
    (-5, "deadline must be 'slurm', None or an end time"),
    (True, "deadline must be 'slurm', None or an end time"),
])
def test_invalid_deadline_rejected(tmp_path: Path, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        Config(ckpt_dir=tmp_path, deadline=value)


def stop_after(step_to_signal: int):
    def on_step(step: int) -> None:
        if step == step_to_signal:
            os.kill(os.getpid(), signal.SIGTERM)
    return on_step


def test_sigterm_skips_save_beyond_grace(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="resilient")
    with pytest.raises(Preempted) as stopped:
        with Supervisor(ckpt_dir=tmp_path, save_every=5, grace_period=0.5, deadline=None) as sup:
            train(sup, nn.Linear(3, 1), 100, on_step=stop_after(7), stateful={"slow": SlowState(1.0)})
    assert complete(tmp_path) == {5: "periodic"}, "the stop step must not be saved, and step 5 must stay"
    assert stopped.value.code == 75
    assert stopped.value.checkpoint.endswith("step_000000005")
    assert "Not saving step" in caplog.text
    assert "only" in caplog.text


def test_sigterm_saves_within_grace(tmp_path: Path) -> None:
    with pytest.raises(Preempted) as stopped:
        with Supervisor(ckpt_dir=tmp_path, save_every=5, grace_period=120, deadline=None) as sup:
            train(sup, nn.Linear(3, 1), 100, on_step=stop_after(7), stateful={"slow": SlowState(0.1)})
    saved = complete(tmp_path)
    assert saved[stopped.value.step] == "preemption"
    assert 5 in saved
