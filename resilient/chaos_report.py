"""Records, progress display and final report of ``resilient chaos`` (see :mod:`resilient.chaos`)."""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

#: The line that both runs must print at the end; the last one in an attempt's output counts.
DIGEST_PATTERN = re.compile(r"final_state_digest=([0-9a-fA-F]+)")
#: Kill modes: wait for a staging directory, or for a random step.
SAVE, STEP = "save", "step"
TAIL_LINES = 30


@dataclass(frozen=True)
class PlannedKill:
    """One kill as drawn from the seed; the steps it aims at are chosen when its attempt starts."""

    number: int
    signal: signal.Signals
    mode: str
    #: Position of a step kill in the attempt's window of steps, from 0 to 1.
    position: float
    #: Part of a step (step kill) or of a typical save (save kill) to wait before firing, from 0 to 1.
    offset: float

    def describe(self) -> str:
        where = "during the next save" if self.mode == SAVE else "at a random step"
        return f"{self.signal.name} {where}"


@dataclass
class KillRecord:
    """Record of one kill: when it fired, into which save, and how the attempt ended and resumed."""

    planned: PlannedKill
    attempt: int
    #: Seconds from the start of the attempt to the signal.
    seconds: float
    #: Last step any rank had completed when the signal was sent, from the heartbeats.
    step: int | None
    #: Staging directory of a save in progress when the signal was sent.
    saving: str | None
    #: A save kill that fired at the end of its window because no save began.
    fell_back: bool
    #: What became of that save: ``interrupted``, ``committed`` or ``removed``.
    save_outcome: str | None = None
    #: Last step any rank completed before the attempt ended, from the heartbeats.
    last_step: int | None = None
    exit_status: int | None = None
    #: ``killed``, ``preempted`` or ``finished`` (training ended before the stop took effect).
    outcome: str | None = None
    #: Step of the newest complete checkpoint when the command was restarted.
    resumed_from: int | None = None
    note: str | None = None

    @property
    def steps_lost(self) -> int | None:
        if self.last_step is None or self.resumed_from is None:
            return None
        return self.last_step - self.resumed_from


@dataclass
class RunResult:
    """One run of the command: the reference run or one attempt of the chaos run."""

    label: str
    attempt: int
    log_path: Path
    heartbeat_dir: Path
    status: int | None = None
    seconds: float = 0.0
    digest: str | None = None
    finished: bool = False
    timed_out: bool = False
    failure: str | None = None
    tail: list[str] = field(default_factory=list)
    kill: KillRecord | None = None
    last_step: int | None = None
    _first_step: int | None = None
    _first_step_at: float | None = None
    _last_step_at: float | None = None

    def observe_step(self, step: int | None, now: float) -> None:
        """Note the step the heartbeats show at ``now``, for the step count and the time per step."""
        if step is None:
            return
        if self._first_step is None:
            self._first_step, self._first_step_at = step, now
        if self.last_step is None or step > self.last_step:
            self.last_step, self._last_step_at = step, now

    def step_seconds(self) -> float:
        """Return the mean seconds per step seen by polling, saves included; 0.1 when too few steps were seen."""
        if (self._first_step is None or self.last_step is None or self._first_step_at is None
                or self._last_step_at is None or self.last_step <= self._first_step):
            return 0.1
        return (self._last_step_at - self._first_step_at) / (self.last_step - self._first_step)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def describe_status(status: int | None) -> str:
    if status is None:
        return "no status"
    if status > 128:
        try:
            return f"status {status} (killed by {signal.Signals(status - 128).name})"
        except ValueError:
            pass
    return f"status {status}"


def output_tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return [f"(cannot read {path}: {err})"]
    return text.splitlines()[-lines:]


class Display:
    """Progress while chaos runs: one updating line on a terminal, otherwise a plain line every ``plain_interval`` s."""

    def __init__(self, stream: TextIO, clock: Callable[[], float], *, plain_interval: float = 10.0,
                 tty_interval: float = 0.2) -> None:
        self._stream = stream
        self._clock = clock
        try:
            self._tty = stream.isatty()
        except (AttributeError, ValueError):
            self._tty = False
        self._interval = tty_interval if self._tty else plain_interval
        self._shown_at = float("-inf")
        self._width = 0

    def status(self, text: str) -> None:
        now = self._clock()
        if now - self._shown_at < self._interval:
            return
        self._shown_at = now
        if self._tty:
            line = text[:150]
            self._stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self._stream.write(f"[chaos] {text}\n")
        self._stream.flush()

    def event(self, text: str) -> None:
        self.clear()
        self._stream.write(f"[chaos] {text}\n")
        self._stream.flush()

    def clear(self) -> None:
        if self._tty and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
            self._width = 0


def _kill_row(kill: KillRecord) -> list[str]:
    if kill.planned.mode == STEP:
        plan = "step"
    else:
        plan = "save, none began" if kill.fell_back else "save"
    saving = "no"
    if kill.saving is not None:
        saving = f"step {int(kill.saving.split('.')[0].split('_')[1])}"
        if kill.save_outcome:
            saving += f" ({kill.save_outcome})"
    exit_text = "-" if kill.exit_status is None else f"{kill.exit_status} {kill.outcome or 'failed'}"
    lost = kill.steps_lost
    return [str(kill.planned.number), str(kill.attempt), f"{kill.seconds:.1f} s",
            "-" if kill.step is None else str(kill.step), kill.planned.signal.name, plan, saving, exit_text,
            "-" if kill.resumed_from is None else str(kill.resumed_from), "unknown" if lost is None else str(lost)]


def _print_table(out: TextIO, kills: list[KillRecord]) -> None:
    header = ["KILL", "ATTEMPT", "AFTER", "STEP", "SIGNAL", "PLAN", "SAVE IN PROGRESS", "EXIT", "RESUMED FROM",
              "STEPS LOST"]
    rows = [header, *(_kill_row(kill) for kill in kills)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip(), file=out)
    for kill in kills:
        if kill.note:
            print(f"  kill {kill.planned.number}: {kill.note}", file=out)


def _print_failure(out: TextIO, run: RunResult) -> None:
    print(f"FAIL: {run.failure}.", file=out)
    print(f"Last {len(run.tail)} lines of {run.log_path}:", file=out)
    for line in run.tail:
        print(f"  | {line}", file=out)


def print_report(out: TextIO, seed: int, reference: RunResult, chaos: RunResult | None, kills: list[KillRecord],
                 note: str | None) -> None:
    """Print the kills, the digests and the verdict."""
    print("", file=out)
    if reference.failure is not None:
        print("The reference run failed, so there is nothing to compare the chaos run with. Make the command "
              "succeed on its own first.", file=out)
        _print_failure(out, reference)
        out.flush()
        return
    assert chaos is not None
    print(f"Reference run: {reference.last_step} steps in {reference.seconds:.1f} s.", file=out)
    print(f"Chaos run: {plural(len(kills), 'kill')}, {plural(chaos.attempt, 'attempt')}.", file=out)
    if kills:
        _print_table(out, kills)
        print("  AFTER and STEP: time into the attempt and last completed step when the signal was sent. EXIT: the "
              "command's status and what chaos concluded (torchrun exits 1 when its workers exit 75). STEPS LOST: "
              "the attempt's last step minus the step it was resumed from.", file=out)
    if note:
        print(f"Note: {note}", file=out)
    print("Final state digests:", file=out)
    print(f"  reference: {reference.digest}", file=out)
    print(f"  chaos:     {chaos.digest if chaos.digest is not None else '(none)'}", file=out)
    if chaos.failure is not None:
        _print_failure(out, chaos)
    elif chaos.digest == reference.digest:
        print(f"PASS: the chaos run ended with the same final state as the reference run after "
              f"{plural(len(kills), 'kill')} (seed {seed}).", file=out)
    else:
        print(f"FAIL: the final state digests differ (seed {seed}). The resumed run trained on different data or "
              "with different random numbers, or some state was not restored. Check first that the script registers "
              "every stateful object with the Supervisor and takes its data and random numbers only from state that "
              "is saved. See docs/chaos.md.", file=out)
    out.flush()
