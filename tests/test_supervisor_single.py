"""Supervisor in one process (torch.distributed not initialised): saves, failures, resume and preemption."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from resilient import CheckpointError, Config, ConfigError, Preempted, Supervisor, state_digest
from resilient.checkpoint.discovery import COMPLETE, complete_newest_first, scan
from resilient.checkpoint.fsutil import checksum_file
from resilient.checkpoint.layout import MARKER_NAME, checkpoint_name, read_manifest, read_run_id
from resilient.checkpoint.load import verify_checksums

MAX_STEPS = 25
OPTIMIZERS = ["sgd", "adamw"]


class SimulatedCrash(Exception):
    """Raised from a loop body to end a run the way an uncaught error in training would."""


class Counter:
    """A user object registered as ``stateful``, whose state_dict() raises while ``fail`` is set."""

    def __init__(self) -> None:
        self.value = 0
        self.fail = False

    def state_dict(self) -> dict[str, Any]:
        if self.fail:
            raise RuntimeError("Counter.state_dict failed on purpose")
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


class Trainer:
    """A tiny regression model whose steps draw from torch's, NumPy's and Python's global generators."""

    def __init__(self, optimizer: str, seed: int) -> None:
        seed_everything(seed)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
        if optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        else:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.01, weight_decay=0.1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 0.97**step)

    def register(self, supervisor: Supervisor, **extra: Any) -> Supervisor:
        return supervisor.register(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, **extra)

    def step(self) -> None:
        self.model.train()
        scale = float(np.random.uniform(0.5, 1.5))
        inputs = torch.randn(8, 4) * scale
        targets = torch.randn(8, 1)
        loss = F.mse_loss(self.model(inputs), targets) * (1.0 + random.random())
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()

    def digest(self) -> str:
        return state_digest(self.model, self.optimizer)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_reference_digests: dict[str, str] = {}


def reference_digest(optimizer: str) -> str:
    """Return the digest after MAX_STEPS steps of a plain loop, without any Supervisor."""
    if optimizer not in _reference_digests:
        trainer = Trainer(optimizer, seed=0)
        for _ in range(MAX_STEPS):
            trainer.step()
        _reference_digests[optimizer] = trainer.digest()
    return _reference_digests[optimizer]


def saved(root: Path, run_id: str) -> list[tuple[int, str, str]]:
    return [(info.step, info.reason, info.status) for info in scan(root, run_id)]


def entries(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir())


def run(root: Path, trainer: Trainer, max_steps: int, body: Callable[[int], None] = lambda step: None,
        **settings: Any) -> Supervisor:
    with Supervisor(ckpt_dir=root, **settings) as supervisor:
        trainer.register(supervisor)
        for step in supervisor.steps(max_steps):
            body(step)
            trainer.step()
    return supervisor


@pytest.mark.parametrize(
    ("max_steps", "expected"),
    [
        (25, [(10, "periodic", COMPLETE), (20, "periodic", COMPLETE), (25, "final", COMPLETE)]),
        (20, [(10, "periodic", COMPLETE), (20, "final", COMPLETE)]),
    ],
)
def test_supervisor_save_schedule(tmp_path: Path, max_steps: int, expected: list) -> None:
    supervisor = run(tmp_path, Trainer("sgd", seed=0), max_steps, save_every=10, keep=5)

    assert saved(tmp_path, supervisor.run_id) == expected
    assert entries(tmp_path) == [".resilient", "journal.jsonl", "run.json"] + [checkpoint_name(step) for step, _, _ in expected]
    assert supervisor.trainer.step == max_steps


def test_save_after_final_returns_it(tmp_path: Path) -> None:
    trainer = Trainer("sgd", seed=0)
    with Supervisor(ckpt_dir=tmp_path, save_every=10, keep=5) as supervisor:
        trainer.register(supervisor)
        for _step in supervisor.steps(15):
            trainer.step()
        final = supervisor.last_save
        assert supervisor.save("manual") == final

    assert saved(tmp_path, supervisor.run_id) == [(10, "periodic", COMPLETE), (15, "final", COMPLETE)]
    assert entries(tmp_path) == [".resilient", "journal.jsonl", "run.json", checkpoint_name(10), checkpoint_name(15)]


def test_new_supervisor_resets_log_step(tmp_path: Path, caplog) -> None:
    run(tmp_path / "first", Trainer("sgd", seed=0), 5)
    with caplog.at_level("INFO", logger="resilient"):
        with Supervisor(ckpt_dir=tmp_path / "second") as supervisor:
            supervisor.resume()
    assert "No complete checkpoint" in caplog.text
    assert "step 5]" not in caplog.text


def test_supervisor_retention_keeps_two(tmp_path: Path) -> None:
    supervisor = run(tmp_path, Trainer("sgd", seed=0), 40, save_every=10, keep=2)

    assert saved(tmp_path, supervisor.run_id) == [(30, "periodic", COMPLETE), (40, "final", COMPLETE)]
    assert entries(tmp_path) == [".resilient", "journal.jsonl", "run.json", checkpoint_name(30), checkpoint_name(40)]


def test_committed_files_match_manifest(tmp_path: Path) -> None:
    supervisor = run(tmp_path, Trainer("adamw", seed=0), 10, save_every=10)
    path = tmp_path / checkpoint_name(10)

    manifest = read_manifest(path)

    assert manifest.step == 10
    assert manifest.reason == "final"
    assert manifest.world_size == 1
    assert manifest.run_id == supervisor.run_id
    assert manifest.trainer["step"] == 10
    assert sorted([entry.path for entry in manifest.files] + [MARKER_NAME]) == entries(path)
    for entry in manifest.files:
        assert (path / entry.path).stat().st_size == entry.size, entry.path
        assert checksum_file(path / entry.path) == entry.checksum, entry.path
    assert manifest.total_bytes == sum((path / entry.path).stat().st_size for entry in manifest.files)


def test_save_checksums_files_while_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import resilient.checkpoint.commit as commit

    def read_back(path: Path) -> str:
        raise AssertionError(f"{path} was read back to checksum it")

    monkeypatch.setattr(commit, "checksum_file", read_back)
    run(tmp_path, Trainer("adamw", seed=0), 4, save_every=2)

    for step in (2, 4):
        path = tmp_path / checkpoint_name(step)
        manifest = read_manifest(path)
        assert ".metadata" in {entry.path for entry in manifest.files}
        assert verify_checksums(path, manifest) == []


def test_marker_appears_after_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The commit delay leaves the written files without a marker for 0.3 s, so the polling thread can observe them.
    monkeypatch.setenv("RESILIENT_DEBUG_COMMIT_DELAY", "0.3")
    snapshots: list[tuple[str, frozenset[str]]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for directory in list(tmp_path.glob("step_*")):
                try:
                    snapshots.append((directory.name, frozenset(os.listdir(directory))))
                except FileNotFoundError:
                    pass  # renamed from its staging name between glob and listdir
            stop.wait(0.005)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        run(tmp_path, Trainer("sgd", seed=0), 2, save_every=10)
    finally:
        stop.set()
        poller.join()

    final_manifest = read_manifest(tmp_path / checkpoint_name(2))
    data_files = frozenset(entry.path for entry in final_manifest.files)
    staged_without_marker = [files for name, files in snapshots if ".tmp-" in name and data_files <= files
                             and MARKER_NAME not in files]
    final_without_marker = [files for name, files in snapshots if name == checkpoint_name(2)
                            and MARKER_NAME not in files]
    marker_without_data = [files for name, files in snapshots if MARKER_NAME in files and not data_files <= files]
    assert staged_without_marker, "polling never saw the written files before the marker"
    assert final_without_marker == []
    assert marker_without_data == []


def test_prepare_failure_keeps_previous(tmp_path: Path) -> None:
    trainer = Trainer("sgd", seed=0)
    counter = Counter()

    def body(step: int) -> None:
        counter.value = step
        if step == 11:
            counter.fail = True

    with Supervisor(ckpt_dir=tmp_path, save_every=10) as supervisor:
        trainer.register(supervisor, stateful={"counter": counter})
        with pytest.raises(CheckpointError) as raised:
            for step in supervisor.steps(12):
                body(step)
                trainer.step()
    previous = tmp_path / checkpoint_name(10)
    manifest = read_manifest(previous)

    assert "prepare phase" in str(raised.value)
    assert "Counter.state_dict failed on purpose" in str(raised.value)
    assert entries(tmp_path) == [".resilient", "journal.jsonl", "run.json", checkpoint_name(10)]
    assert [info.step for info in complete_newest_first(tmp_path, supervisor.run_id)] == [10]
    assert verify_checksums(previous, manifest) == []
    assert supervisor.last_save.step == 10


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_resume_matches_uninterrupted(tmp_path: Path, optimizer: str) -> None:
    def crash_before_16(step: int) -> None:
        if step == 16:
            raise SimulatedCrash("crash before step 16")

    with pytest.raises(SimulatedCrash):
        run(tmp_path, Trainer(optimizer, seed=0), MAX_STEPS, crash_before_16, save_every=10)
    assert [step for step, _, _ in saved(tmp_path, run_id_of(tmp_path))] == [10]

    # Another seed gives other initial weights and generator states, which the resume must replace.
    trainer = Trainer(optimizer, seed=1234)
    steps_run: list[int] = []
    supervisor = run(tmp_path, trainer, MAX_STEPS, steps_run.append, save_every=10)

    assert supervisor.resumed_from == tmp_path / checkpoint_name(10)
    assert steps_run == list(range(11, MAX_STEPS + 1))
    assert trainer.digest() == reference_digest(optimizer)


def test_resume_other_seed_differs(tmp_path: Path) -> None:
    # Shows that the digest comparisons can fail, because a run that is not resumed ends with another digest.
    trainer = Trainer("sgd", seed=1234)
    run(tmp_path, trainer, MAX_STEPS, save_every=10)

    assert trainer.digest() != reference_digest("sgd")


def test_sigterm_preempts_and_resumes(tmp_path: Path) -> None:
    def sigterm_at_7(step: int) -> None:
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted) as raised:
        run(tmp_path, Trainer("sgd", seed=0), MAX_STEPS, sigterm_at_7, save_every=10)
    run_id = run_id_of(tmp_path)

    assert raised.value.code == 75
    assert raised.value.step == 7
    assert raised.value.checkpoint == str(tmp_path / checkpoint_name(7))
    assert saved(tmp_path, run_id) == [(7, "preemption", COMPLETE)]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    trainer = Trainer("sgd", seed=1234)
    steps_run: list[int] = []
    supervisor = run(tmp_path, trainer, MAX_STEPS, steps_run.append, save_every=10)

    assert supervisor.resumed_from == tmp_path / checkpoint_name(7)
    assert steps_run == list(range(8, MAX_STEPS + 1))
    assert supervisor.preempted is False
    assert trainer.digest() == reference_digest("sgd")


def test_preemption_without_exit(tmp_path: Path) -> None:
    def sigusr1_at_3(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    supervisor = run(tmp_path, Trainer("sgd", seed=0), MAX_STEPS, sigusr1_at_3, exit_on_preemption=False)

    assert supervisor.preempted is True
    assert supervisor.trainer.step == 3
    assert saved(tmp_path, supervisor.run_id) == [(3, "preemption", COMPLETE)]


def run_id_of(root: Path) -> str:
    run_id = read_run_id(root)
    assert run_id is not None, f"{root} has no run.json"
    return run_id


def mentions(message: str, text: str) -> bool:
    """Return whether ``text`` occurs in ``message`` as a whole token, so "0" does not match inside "10"."""
    return re.search(rf"(?<![\w-]){re.escape(text)}(?!\w)", message) is not None


@pytest.mark.parametrize(
    ("settings", "value"),
    [
        ({"save_every": 0}, "0"),
        ({"keep": 0}, "0"),
        ({"check_every": -1}, "-1"),
        ({"signals": ["NOPE"]}, "'NOPE'"),
    ],
)
def test_config_error_names_value(tmp_path: Path, settings: dict, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Config(ckpt_dir=tmp_path, **settings)

    assert mentions(str(raised.value), value)


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        ({"save_every": 0}, "save_every"),
        ({"keep": 0}, "keep"),
        ({"check_every": -1}, "check_every"),
        ({"signals": ["NOPE"]}, "signals"),
        ({"signals": "NOPE"}, "signals"),
    ],
)
def test_config_error_names_setting(tmp_path: Path, settings: dict, name: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Config(ckpt_dir=tmp_path, **settings)

    assert mentions(str(raised.value), name)


def test_config_accepts_single_signal_name(tmp_path: Path) -> None:
    assert Config(ckpt_dir=tmp_path, signals="usr1").signals == ("SIGUSR1",)


def test_supervisor_invalid_config_installs_nothing(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)

    with pytest.raises(ConfigError):
        Supervisor(ckpt_dir=tmp_path, keep=0)

    assert signal.getsignal(signal.SIGTERM) is before
    assert list(tmp_path.iterdir()) == []


def test_read_only_ckpt_dir_rejected_at_start(tmp_path: Path) -> None:
    mount_point = tmp_path / "read-only"
    mount_point.mkdir()
    # A read-only tmpfs, because chmod does not stop root, which runs the tests in CI.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    try:
        model = torch.nn.Linear(2, 2)
        with Supervisor(ckpt_dir=mount_point) as sup:
            sup.register(model=model)
            with pytest.raises(ConfigError) as raised:
                sup.resume()
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)

    assert "ckpt_dir" in str(raised.value)
    assert str(mount_point) in str(raised.value)
    assert "Read-only file system" in str(raised.value)


def test_state_digest_leaves_fresh_adam_unchanged() -> None:
    def train(digest_first: bool) -> tuple[torch.Tensor, float]:
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        if digest_first:
            state_digest(model, optimizer)
        for _ in range(3):
            model(torch.ones(1, 4)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        return model.weight.detach().clone(), float(optimizer.state[model.weight]["step"])

    weight, steps = train(digest_first=True)
    expected_weight, expected_steps = train(digest_first=False)

    assert steps == expected_steps == 3.0
    assert torch.equal(weight, expected_weight)
