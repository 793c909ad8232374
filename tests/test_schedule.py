"""Save scheduling: fixed and Young–Daly intervals, agreed time-based saves, stop checks inside a step."""

from __future__ import annotations

import json
import math
import re
import signal
from pathlib import Path

import pytest

from jobs import LM_ARGS, TRAIN_LM, Job, run_to_end, torchrun_command
from resilient.checkpoint.discovery import COMPLETE, scan
from resilient.checkpoint.layout import read_manifest, read_run_id
from resilient.config import Config
from resilient.errors import ConfigError
from resilient.schedule import FIRST_SAVE_SECONDS, MIN_UNFAILED_MTBF_SECONDS, SaveSchedule, observed_history

MAX_STEPS = 30
SAVE_EVERY = 5


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def complete(ckpt: Path) -> dict[int, str]:
    return {info.step: info.reason for info in scan(ckpt, read_run_id(ckpt)) if info.status == COMPLETE}


# -- the schedule itself ------------------------------------------------------------


def test_fixed_interval(tmp_path: Path) -> None:
    clock = Clock()
    schedule = SaveSchedule(30.0, None, tmp_path, clock=clock)
    schedule.start(None)
    clock.now += 29.9
    assert not schedule.wanted()
    clock.now += 0.1
    assert schedule.wanted()
    schedule.saved(2.0)
    assert not schedule.wanted()
    clock.now += 30
    assert schedule.wanted()


def test_disabled_schedule_never_wants(tmp_path: Path) -> None:
    clock = Clock()
    schedule = SaveSchedule(None, None, tmp_path, clock=clock)
    schedule.start(None)
    clock.now += 1e9
    assert not schedule.enabled
    assert not schedule.wanted()


def test_young_daly_interval_from_measured_cost(tmp_path: Path) -> None:
    clock = Clock()
    schedule = SaveSchedule("auto", 3600.0, tmp_path, clock=clock)
    schedule.start(None)
    assert schedule.interval() == FIRST_SAVE_SECONDS, "no cost measured yet"
    short = SaveSchedule("auto", 30.0, tmp_path, clock=clock)
    short.start(None)
    assert short.interval() == pytest.approx(15.0), "the first save comes within half the MTBF"
    schedule.saved(2.0)
    assert schedule.interval() == pytest.approx(math.sqrt(2 * 2.0 * 3600.0))  # 120 s
    schedule.saved(0.5)
    assert schedule.interval() == pytest.approx(60.0)
    # A background save blocks little, but the next one cannot start before it is written.
    schedule.written(90.0)
    assert schedule.interval() == pytest.approx(90.0)


def test_young_daly_uses_resumed_save_time(tmp_path: Path) -> None:
    schedule = SaveSchedule("auto", 800.0, tmp_path, clock=Clock())
    schedule.start(resumed_save_seconds=4.0)
    assert schedule.interval() == pytest.approx(80.0)


def write_journal(root: Path, events: list[tuple[float, str]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"time": when, "event": kind, "rank": 0}) for when, kind in events]
    (root / "journal.jsonl").write_text("\n".join(lines) + "\n")


def test_observed_mtbf_from_the_journal(tmp_path: Path) -> None:
    # Two earlier attempts: 1000 s (ended by a signal) and 500 s (killed after its last checkpoint).
    write_journal(tmp_path, [(0, "start"), (10, "resume"), (500, "checkpoint"), (1010, "signal"), (1011, "stop"),
                             (1100, "restart"), (1200, "resume"), (1700, "checkpoint")])
    assert observed_history(tmp_path) == (1001.0 + 500.0, 2)

    clock = Clock()
    schedule = SaveSchedule("auto", None, tmp_path, clock=clock)
    schedule.start(None)
    clock.now += 499.0
    mtbf, source = schedule.mtbf()
    # 1501 s earlier plus 499 s now, over 2 interruptions plus one.
    assert mtbf == pytest.approx(2000.0 / 3)
    assert "2 interruptions" in source
    schedule.saved(3.0)
    assert schedule.interval() == pytest.approx(math.sqrt(2 * 3.0 * 2000.0 / 3))


def test_run_without_interruptions_assumes_at_least_an_hour(tmp_path: Path) -> None:
    clock = Clock()
    schedule = SaveSchedule("auto", None, tmp_path, clock=clock)
    schedule.start(None)
    assert schedule.interval() == FIRST_SAVE_SECONDS, "the first save waits a minute, not half of 0 s"
    clock.now += 600.0
    assert schedule.mtbf()[0] == pytest.approx(MIN_UNFAILED_MTBF_SECONDS)
    clock.now += 7200.0
    assert schedule.mtbf()[0] == pytest.approx(7800.0)


@pytest.mark.parametrize("settings", [{"save_interval": 0}, {"save_interval": -5}, {"save_interval": "often"},
                                      {"save_interval": True}, {"mtbf": 0}, {"mtbf": "1h"},
                                      {"async_save": "yes"}, {"async_busy": "queue"},
                                      {"save_interval": float("inf")}, {"save_interval": float("nan")},
                                      {"mtbf": float("inf")}, {"mtbf": 3600.0, "save_interval": 60.0},
                                      {"mtbf": 3600.0}])
def test_invalid_schedule_settings(tmp_path: Path, settings: dict) -> None:
    name = "mtbf" if "mtbf" in settings else next(iter(settings))
    with pytest.raises(ConfigError, match=name):
        Config(ckpt_dir=tmp_path, **settings)


# -- with real ranks -----------------------------------------------------------------

SCHEDULE_RANKS = Path(__file__).parent / "scripts" / "schedule_ranks.py"


@pytest.mark.integration
def test_time_save_agreed_from_one_rank(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    job = run_to_end(torchrun_command(SCHEDULE_RANKS, str(ckpt), "40"), timeout=240)
    assert "rank 0 done" in job.output
    assert "rank 1 done" in job.output
    steps = complete(ckpt)
    periodic = [step for step, reason in steps.items() if reason == "periodic"]
    # 40 steps of at least 50 ms with a 0.3 s interval on rank 0 only.
    assert len(periodic) >= 3, steps
    for step in periodic:
        manifest = read_manifest(ckpt / f"step_{step:09d}")
        assert sorted({entry.rank for entry in manifest.files}) == [0, 1]


@pytest.mark.integration
def test_time_and_adaptive_saves_exact(tmp_path: Path, reference_digest) -> None:
    expected = reference_digest(MAX_STEPS, SAVE_EVERY)
    fixed = run_to_end(torchrun_command(TRAIN_LM, "--ckpt-dir", str(tmp_path / "fixed"), "--max-steps",
                                        str(MAX_STEPS), "--save-every", "1000", "--save-interval", "0.5",
                                        "--keep", "100", *LM_ARGS))
    assert fixed.digest() == expected
    assert len([r for r in complete(tmp_path / "fixed").values() if r == "periodic"]) >= 2

    auto = run_to_end(torchrun_command(TRAIN_LM, "--ckpt-dir", str(tmp_path / "auto"), "--max-steps",
                                       str(MAX_STEPS), "--save-every", "1000", "--save-interval", "auto",
                                       "--mtbf", "0.2", "--async-save", "--keep", "100", *LM_ARGS))
    assert auto.digest() == expected
    assert "Adaptive save interval is now" in auto.output
    # With an MTBF of 0.2 s the first save comes after 0.1 s, and later ones as soon as the
    # previous background save is written.
    assert len([r for r in complete(tmp_path / "auto").values() if r == "periodic"]) >= 3


@pytest.mark.integration
def test_stop_check_inside_a_long_evaluation(tmp_path: Path, reference_digest) -> None:
    expected = reference_digest(MAX_STEPS, SAVE_EVERY)
    ckpt = tmp_path / "ckpt"
    command = torchrun_command(TRAIN_LM, "--ckpt-dir", str(ckpt), "--max-steps", str(MAX_STEPS), "--save-every",
                               str(SAVE_EVERY), "--eval-every", "25", "--eval-batches", "2000", "--eval-delay",
                               "0.01", *LM_ARGS)
    job = Job.start(command)
    job.wait_for_step(25)
    job.workers()[1].send_signal(signal.SIGUSR1)
    job.wait()
    match = re.search(r"eval at step 25 stopped after (\d+) batches", job.output)
    assert match and int(match.group(1)) < 2000, job.output[-3000:]
    assert "agreed to stop inside the current step" in job.output
    assert complete(ckpt).get(25) == "preemption", complete(ckpt)

    resumed = run_to_end(command)
    assert f"Resumed from {ckpt / 'step_000000025'}" in resumed.output
    assert resumed.digest() == expected
