"""``resilient chaos``: kill a training command at random moments and check that its final state is still exact.

The command runs twice, each time with a fresh checkpoint directory in place
of ``{ckpt_dir}``. The reference run is never interrupted. The chaos run is
killed ``kills`` times and restarted after each kill until it finishes. Both
runs must print ``final_state_digest=<hex>``, and the check passes when the
chaos run's last digest equals the reference run's.

Each attempt runs the way ``resilient run`` runs it: in its own session, with
the same environment variables, and with stop signals sent by the launcher's
relay rule (see :mod:`resilient.launcher.tree`). SIGKILL goes to every
process of the tree. The workers' heartbeats, written every step into a
directory of the attempt, tell chaos the step each attempt has reached, and
the staging directories (``step_N.tmp-<nonce>``) tell it that a save is in
progress.

Kills are planned from ``seed``: the signal, whether the kill waits for a save
or for a step, and the random fractions that place it. Only the step numbers
depend on where each attempt resumed, so one seed gives the same kinds of
kills in the same order on every replay.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

from resilient.checkpoint.discovery import iter_complete_newest_first
from resilient.checkpoint.layout import ManifestError, checkpoint_name, parse_dir_name, read_run_id
from resilient.chaos_report import (
    DIGEST_PATTERN,
    SAVE,
    STEP,
    Display,
    KillRecord,
    PlannedKill,
    RunResult,
    describe_status,
    output_tail,
    plural,
    print_report,
)
from resilient.errors import EXIT_PREEMPTED, ConfigError
from resilient.journal import ATTEMPT_ENV, read_journal
from resilient.launcher.options import _NOT_STOP_SIGNALS
from resilient.launcher.tree import ProcessTree, become_subreaper
from resilient.launcher.watchdog import all_preempted, read_heartbeats
from resilient.progress import CKPT_DIR_ENV, FINISHED, HEARTBEAT_INTERVAL_ENV, LAUNCHER_DIR_ENV
from resilient.signals import SIGNALS_ENV, parse_signal

PLACEHOLDER = "{ckpt_dir}"
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGKILL")
EXIT_FAILED = 1
EXIT_USAGE = 2
#: Kills aim at least this many steps before the reference run's last step, so
#: that a stop signal is agreed on before training ends.
END_MARGIN = 2
#: Restarts allowed beyond one per kill, for attempts that finished training
#: just as a stop signal arrived and exited with a wrapper's status.
EXTRA_ATTEMPTS = 3
_TORCHRUN_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
_USABLE = "SIGTERM, SIGUSR1, SIGUSR2, SIGHUP or SIGKILL (the SIG prefix is optional)"
#: Signals that stop chaos itself. It SIGKILLs the running command and keeps the work directory.
_STOP_CHAOS = (signal.SIGINT, signal.SIGTERM)


class _Interrupted(Exception):
    """chaos received SIGINT or SIGTERM and must stop."""


def parse_chaos_signals(values: Iterable[str]) -> tuple[signal.Signals, ...]:
    """Parse signal names for chaos: SIGKILL or a catchable stop signal other than SIGINT."""
    result: list[signal.Signals] = []
    for value in values:
        try:
            sig = parse_signal(value)
        except ConfigError:
            raise ConfigError(f"invalid signal {value!r} for --signals: not a signal name or number. Use "
                              f"{_USABLE}.") from None
        if sig == signal.SIGSTOP:
            raise ConfigError(f"invalid signal SIGSTOP for --signals: it suspends a process instead of ending it. "
                              f"Use {_USABLE}.")
        if sig in _NOT_STOP_SIGNALS:
            raise ConfigError(f"invalid signal {sig.name} for --signals: it does not ask a process to stop. Use "
                              f"{_USABLE}.")
        if sig == signal.SIGINT:
            raise ConfigError("invalid signal SIGINT for --signals: schedulers do not send it, and resilient run "
                              "turns a Ctrl-C into SIGTERM. Use SIGTERM.")
        if sig not in result:
            result.append(sig)
    if not result:
        raise ConfigError("--signals is empty; name at least one signal, for example TERM,USR1,KILL")
    return tuple(result)


@dataclass(frozen=True, kw_only=True, slots=True)
class ChaosOptions:
    """Settings of ``resilient chaos``. ``timeout`` applies to each run of the command, in seconds."""

    command: tuple[str, ...]
    kills: int
    signals: tuple[signal.Signals, ...] = field(default_factory=lambda: parse_chaos_signals(DEFAULT_SIGNALS))
    seed: int = 0
    workdir: Path | None = None
    keep: bool = False
    timeout: float = 600.0
    poll_interval: float = 0.01

    def __post_init__(self) -> None:
        if not self.command:
            raise ConfigError("no command given; put it after '--', for example: resilient chaos --kills 3 -- "
                              "torchrun --nproc-per-node 2 train.py --ckpt-dir {ckpt_dir}")
        if not any(PLACEHOLDER in part for part in self.command):
            raise ConfigError(f"the command does not contain the placeholder {PLACEHOLDER}; chaos replaces it with "
                              "a fresh checkpoint directory for each run. Pass it where your script takes its "
                              f"checkpoint directory, for example --ckpt-dir {PLACEHOLDER}")
        if isinstance(self.kills, bool) or not isinstance(self.kills, int) or self.kills < 1:
            raise ConfigError(f"kills must be an integer of at least 1, got {self.kills!r}")
        parse_chaos_signals(sig.name for sig in self.signals)
        if not math.isfinite(self.timeout) or self.timeout <= 0:
            raise ConfigError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        if not math.isfinite(self.poll_interval) or self.poll_interval <= 0:
            raise ConfigError(f"poll_interval must be a positive number of seconds, got {self.poll_interval!r}")
        program = self.command[0]
        if shutil.which(program) is None:
            raise ConfigError(f"cannot run {program!r}: no executable file of that name was found"
                              + ("" if os.sep in program else " on PATH")
                              + ". Check the command after '--', or give the full path of the program.")

    def command_for(self, ckpt_dir: Path) -> list[str]:
        return [part.replace(PLACEHOLDER, str(ckpt_dir)) for part in self.command]


def plan_kills(kills: int, signals: tuple[signal.Signals, ...], seed: int) -> list[PlannedKill]:
    """Return ``kills`` planned kills drawn from ``seed``.

    Signals are dealt in shuffled rounds, so each signal is used at least once
    when ``kills`` is at least the number of signals. Half of the kills,
    rounded up, wait for a save.
    """
    rng = random.Random(seed)
    chosen: list[signal.Signals] = []
    while len(chosen) < kills:
        chosen.extend(rng.sample(signals, len(signals)))
    modes = [SAVE] * ((kills + 1) // 2) + [STEP] * (kills // 2)
    rng.shuffle(modes)
    return [PlannedKill(number=index + 1, signal=chosen[index], mode=modes[index], position=rng.random(),
                        offset=rng.random()) for index in range(kills)]


class _Trigger:
    """Decides when one planned kill fires inside an attempt that resumed from ``resume_step``.

    A step kill fires once the attempt reached a random step of its window,
    plus a random part of a step. A save kill fires a random part of a save
    after a new staging directory appears. When none appears before the end
    of a window twice as long (or, for a last SIGKILL, before the final
    step), it fires there.
    """

    def __init__(self, planned: PlannedKill, *, resume_step: int, last_kill_step: int, kills_left: int,
                 final_step: int, step_seconds: float, save_seconds: float) -> None:
        self.planned = planned
        self.resume_step = resume_step
        window = max(1, (last_kill_step - resume_step) // kills_left)
        self.target = resume_step + 1 + min(int(planned.position * window), window - 1)
        # Only a SIGKILL may hit the final save, and only as the last kill, because a stop signal there
        # comes too late to stop training and later kills would find no steps left.
        self._final_save_allowed = planned.signal == signal.SIGKILL and kills_left == 1
        self.deadline = final_step if self._final_save_allowed else min(last_kill_step, resume_step + 2 * window)
        self._final_step = final_step
        self._step_seconds = step_seconds
        self._save_seconds = save_seconds
        self.fire_at: float | None = None
        self.fell_back = False

    def due(self, now: float, step: int | None, new_staging: list[str]) -> bool:
        if self.fire_at is None and step is not None and step > self.resume_step:
            if self.planned.mode == STEP and step >= self.target:
                self.fire_at = now + self.planned.offset * self._step_seconds
            elif self.planned.mode == SAVE:
                eligible = [name for name in new_staging
                            if _staging_step(name) < self._final_step or self._final_save_allowed]
                if eligible:
                    # 0.8: a kill planned at the very end of a save would often land after the commit.
                    self.fire_at = now + 0.8 * self.planned.offset * self._save_seconds
                elif step >= self.deadline:
                    self.fell_back = True
                    self.fire_at = now
        return self.fire_at is not None and now >= self.fire_at

    def describe(self) -> str:
        sig = self.planned.signal.name
        if self.fire_at is not None:
            return f"{sig} about to fire"
        if self.planned.mode == STEP:
            return f"{sig} at step {self.target}"
        return f"{sig} during the next save (at step {self.deadline} at the latest)"


def _staging_step(name: str) -> int:
    parsed = parse_dir_name(name)
    return parsed[0] if parsed else -1


def _staging_names(root: Path) -> set[str]:
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return set()
    return {name for name in names if (parsed := parse_dir_name(name)) is not None and parsed[1] == "tmp"}


def newest_complete_step(root: Path) -> int:
    """Return the step of the newest complete checkpoint in ``root``, or 0 when there is none."""
    try:
        run_id = read_run_id(root)
    except ManifestError:
        run_id = None
    for info in iter_complete_newest_first(root, run_id, log_skips=False):
        return info.step
    return 0


def _last_step(records: list[dict[str, Any]]) -> int | None:
    steps = [record["step"] for record in records if isinstance(record.get("step"), int)]
    return max(steps) if steps else None


def _resume_step_in_journal(root: Path, attempt: int) -> int | None:
    for event in read_journal(root).events:
        if event.get("event") == "resume" and event.get("attempt") == attempt and isinstance(event.get("step"), int):
            return event["step"]
    return None


class Chaos:
    """One ``resilient chaos`` session: the reference run, the chaos run, and the report.

    ``clock`` and ``sleep`` are seams for tests. Progress goes to ``progress``
    (an updating line when it is a terminal), the report to ``out``.
    """

    def __init__(self, options: ChaosOptions, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, out: TextIO | None = None,
                 progress: TextIO | None = None) -> None:
        self.options = options
        self._clock = clock
        self._sleep = sleep
        self._out = out or sys.stdout
        self.display = Display(progress or sys.stderr, clock)
        self.plan = plan_kills(options.kills, options.signals, options.seed)
        self.root = Path()
        self._created: list[Path] = []
        self._stop_signals: list[int] = []

    # -- the session ---------------------------------------------------------------

    def _record_stop(self, signum: int, frame: object) -> None:
        self._stop_signals.append(signum)

    def run(self) -> int:
        """Run both runs and print the report; return 0 only when the final digests are equal.

        Makes this process a child subreaper, as ``resilient run`` does, so
        that workers whose parent died stay in reach of the kills.
        """
        self._prepare_workdir()
        become_subreaper()
        self._print_plan()
        previous = {sig: signal.signal(sig, self._record_stop) for sig in _STOP_CHAOS}
        try:
            passed = self._compare()
        except _Interrupted:
            name = signal.Signals(self._stop_signals[0]).name
            self.display.event(f"Stopped by {name}; the command was SIGKILLed and the runs are kept in {self.root}")
            return 128 + self._stop_signals[0]
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if passed and not self.options.keep:
            self._remove_workdir()
        else:
            print(f"The runs are kept in {self.root}: reference/ and chaos/ are the checkpoint directories, logs/ "
                  "has every attempt's output.", file=self._out)
        return 0 if passed else EXIT_FAILED

    def _compare(self) -> bool:
        reference = self._run_command("reference", self.root / "reference", 1, None)
        self._check_reference(reference)
        if reference.failure is not None:
            self.display.clear()
            print_report(self._out, self.options.seed, reference, None, [], None)
            return False
        kills, chaos, note = self._chaos_run(reference)
        self.display.clear()
        print_report(self._out, self.options.seed, reference, chaos, kills, note)
        return chaos.failure is None and chaos.digest == reference.digest

    def _check_reference(self, reference: RunResult) -> None:
        """Set a failure when the reference run succeeded but gives chaos nothing to work with."""
        if reference.failure is not None:
            return
        ckpt_dir = self.root / "reference"
        if reference.last_step is None:
            reference.failure = (f"the reference run reported no training step: no heartbeat appeared in "
                                 f"{reference.heartbeat_dir}. chaos needs a script that trains with "
                                 "resilient.Supervisor, started directly rather than through resilient run")
        elif newest_complete_step(ckpt_dir) == 0:
            reference.failure = (f"the reference run left no complete checkpoint in {ckpt_dir}. Pass "
                                 f"{PLACEHOLDER} itself as the script's checkpoint directory")
        elif reference.last_step <= END_MARGIN:
            reference.failure = (f"the reference run finished at step {reference.last_step}, and chaos needs at "
                                 f"least {END_MARGIN + 1} steps to kill it after progress. Train more steps")
        if reference.failure is not None:
            reference.tail = output_tail(reference.log_path)

    def _prepare_workdir(self) -> None:
        if self.options.workdir is None:
            self.root = Path(tempfile.mkdtemp(prefix="resilient-chaos-"))
            self._created.append(self.root)
            return
        self.root = self.options.workdir.absolute()
        if self.root.exists() and (not self.root.is_dir() or any(self.root.iterdir())):
            raise ConfigError(f"workdir {self.root} is not an empty directory; chaos needs fresh checkpoint "
                              "directories. Pass a new or empty directory, or leave --workdir out.")
        if not self.root.exists():
            self.root.mkdir(parents=True)
            self._created.append(self.root)
        else:
            self._created.extend(self.root / name for name in ("reference", "chaos", "logs", "heartbeats"))

    def _remove_workdir(self) -> None:
        for path in self._created:
            shutil.rmtree(path, ignore_errors=True)

    def _print_plan(self) -> None:
        signals = ",".join(sig.name for sig in self.options.signals)
        kills = plural(self.options.kills, "kill")
        print(f"resilient chaos: seed {self.options.seed}, {kills} with {signals}; replay with --seed "
              f"{self.options.seed}. Work directory: {self.root}", file=self._out)
        for planned in self.plan:
            print(f"  kill {planned.number}: {planned.describe()}", file=self._out)
        self._out.flush()

    # -- the chaos run -------------------------------------------------------------

    def _chaos_run(self, reference: RunResult) -> tuple[list[KillRecord], RunResult, str | None]:
        """Run the chaos attempts; return the kills made, the last attempt and a note on kills not made."""
        ckpt_dir = self.root / "chaos"
        assert reference.last_step is not None
        final_step = reference.last_step
        last_kill_step = final_step - END_MARGIN
        step_seconds, save_seconds = reference.step_seconds(), self._save_seconds(self.root / "reference")
        kills: list[KillRecord] = []
        pending = list(self.plan)
        resume_step = 0

        for attempt in range(1, self.options.kills + EXTRA_ATTEMPTS + 2):
            trigger = None
            if pending and resume_step < last_kill_step:
                trigger = _Trigger(pending[0], resume_step=resume_step, last_kill_step=last_kill_step,
                                   kills_left=len(pending), final_step=final_step, step_seconds=step_seconds,
                                   save_seconds=save_seconds)
            result = self._run_command("chaos", ckpt_dir, attempt, trigger)

            if kills and kills[-1].attempt == attempt - 1:
                journal_step = _resume_step_in_journal(ckpt_dir, attempt)
                if journal_step is not None and journal_step != kills[-1].resumed_from:
                    kills[-1].note = (f"attempt {attempt} resumed from step {journal_step}, not from the newest "
                                      f"complete checkpoint (step {kills[-1].resumed_from})")

            if result.kill is not None:
                pending.pop(0)
                kills.append(result.kill)
            if result.failure is not None:
                return kills, result, None
            if result.finished:
                return kills, result, self._not_made(pending, resume_step, final_step)
            resume_step = newest_complete_step(ckpt_dir)
            if result.kill is not None:
                result.kill.resumed_from = resume_step

        last = result
        last.failure = (f"the chaos run did not finish within {attempt} attempts; the last one ended with "
                        f"{describe_status(last.status)}")
        last.tail = output_tail(last.log_path)
        return kills, last, None

    @staticmethod
    def _not_made(pending: list[PlannedKill], resume_step: int, final_step: int) -> str | None:
        if not pending:
            return None
        numbers = ", ".join(str(planned.number) for planned in pending)
        return (f"kills {numbers} were not made: the run resumed at step {resume_step} and reached its last step "
                f"{final_step} before they could fire. Train more steps or ask for fewer kills.")

    @staticmethod
    def _save_seconds(reference_dir: Path) -> float:
        """Return the median duration of the reference run's saves, from its journal."""
        durations = sorted(float(event["seconds"]) for event in read_journal(reference_dir).events
                           if event.get("event") == "checkpoint" and isinstance(event.get("seconds"), (int, float)))
        return durations[len(durations) // 2] if durations else 0.05

    # -- one run of the command ------------------------------------------------------

    def _environment(self, ckpt_dir: Path, attempt: int, heartbeat_dir: Path) -> dict[str, str]:
        """Return the command's environment: as under ``resilient run``, with a heartbeat after every step."""
        env = dict(os.environ)
        env[ATTEMPT_ENV] = str(attempt)
        env[LAUNCHER_DIR_ENV] = str(heartbeat_dir)
        env[CKPT_DIR_ENV] = str(ckpt_dir)
        # chaos reads each attempt's last step from the heartbeats, so they must not lag behind.
        env[HEARTBEAT_INTERVAL_ENV] = "0"
        stop_names = [sig.name for sig in self.options.signals if sig != signal.SIGKILL]
        env.setdefault(SIGNALS_ENV, ",".join(dict.fromkeys(["SIGTERM", *stop_names])))
        # torchrun handles only TERM, INT, HUP and QUIT unless PET_SIGNALS_TO_HANDLE names more. A USR1
        # that torchrun does not handle reaches only the workers under the relay rule.
        env.setdefault("PET_SIGNALS_TO_HANDLE", ",".join(dict.fromkeys([*_TORCHRUN_SIGNALS, *stop_names])))
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _run_command(self, run: str, ckpt_dir: Path, attempt: int, trigger: _Trigger | None) -> RunResult:
        """Run the command once; fire ``trigger``'s kill when it is due. Waits until every process has exited."""
        label = "reference" if run == "reference" else f"chaos-attempt-{attempt:02d}"
        heartbeat_dir = self.root / "heartbeats" / label
        heartbeat_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.root / "logs" / f"{label}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        before = _staging_names(ckpt_dir)
        result = RunResult(label=label, attempt=attempt, log_path=log_path, heartbeat_dir=heartbeat_dir)

        started = self._clock()
        with open(log_path, "wb") as output:
            tree = ProcessTree(self.options.command_for(ckpt_dir), self._environment(ckpt_dir, attempt,
                                                                                     heartbeat_dir), output=output)
        try:
            self._watch(tree, result, trigger, before, ckpt_dir, started)
        finally:
            if not tree.empty():
                tree.kill_all()
                self._wait_empty(tree)
        result.seconds = self._clock() - started
        # As a shell reports it: 128+N for death by signal N. None when the command could not be reaped.
        code = tree.root_status
        if code is not None and code < 0:
            code = 128 - code
        result.status = code
        self._classify(result, read_heartbeats(heartbeat_dir), ckpt_dir, trigger)
        return result

    def _watch(self, tree: ProcessTree, result: RunResult, trigger: _Trigger | None, before: set[str],
               ckpt_dir: Path, started: float) -> None:
        """Poll the heartbeats and the staging directories until the tree is gone or the timeout passes."""
        poll = self.options.poll_interval if trigger is not None else max(self.options.poll_interval, 0.05)
        while not tree.empty():
            if self._stop_signals:
                raise _Interrupted()
            now = self._clock()
            if now - started > self.options.timeout:
                tree.kill_all()
                self._wait_empty(tree)
                result.timed_out = True
                return
            records = read_heartbeats(result.heartbeat_dir)
            step = _last_step(records)
            result.observe_step(step, now)
            if trigger is not None and result.kill is None:
                new_staging = sorted(_staging_names(ckpt_dir) - before)
                if trigger.due(now, step, new_staging):
                    result.kill = self._fire(tree, trigger, result.attempt, step, now - started, ckpt_dir,
                                             before)
            self.display.status(self._status_line(result, trigger, now - started))
            self._sleep(poll)

    def _fire(self, tree: ProcessTree, trigger: _Trigger, attempt: int, step: int | None, seconds: float,
              ckpt_dir: Path, before: set[str]) -> KillRecord:
        """Send the planned signal: SIGKILL to every process, a stop signal by the launcher's relay rule."""
        planned = trigger.planned
        in_progress = sorted(_staging_names(ckpt_dir) - before, key=_staging_step)
        if planned.signal == signal.SIGKILL:
            sent = tree.kill_all()
        else:
            sent = tree.relay(planned.signal)
        record = KillRecord(planned=planned, attempt=attempt, seconds=seconds, step=step,
                            saving=in_progress[-1] if in_progress else None, fell_back=trigger.fell_back)
        saving = f" during the save in {record.saving}" if record.saving else ""
        self.display.event(f"kill {planned.number}: sent {planned.signal.name} to {len(sent)} processes after "
                           f"{seconds:.1f} s at step {step}{saving}")
        return record

    def _wait_empty(self, tree: ProcessTree) -> None:
        # Everything was just SIGKILLed; it disappears as soon as it is reaped.
        deadline = self._clock() + 10.0
        while not tree.empty() and self._clock() < deadline:
            self._sleep(0.05)

    def _status_line(self, result: RunResult, trigger: _Trigger | None, seconds: float) -> str:
        step = "no step yet" if result.last_step is None else f"step {result.last_step}"
        text = f"{result.label}: {step}, {seconds:.0f} s"
        if result.kill is not None:
            text += f", {result.kill.planned.signal.name} sent, waiting for the exit"
        elif trigger is not None:
            text += f", kill {trigger.planned.number} of {self.options.kills}: {trigger.describe()}"
        return text

    # -- outcome of one run ------------------------------------------------------------

    def _classify(self, result: RunResult, records: list[dict[str, Any]], ckpt_dir: Path,
                  trigger: _Trigger | None) -> None:
        """Set the run's digest, whether it finished, and the failure if its exit was not expected."""
        result.digest = _last_digest(result.log_path)
        result.observe_step(_last_step(records), self._clock())
        kill = result.kill
        if kill is not None:
            kill.last_step = _last_step(records)
            kill.exit_status = result.status
            kill.save_outcome = _save_outcome(ckpt_dir, kill.saving)
        if result.timed_out:
            result.failure = (f"{result.label} did not exit within the timeout of {self.options.timeout:g} s and "
                              "was SIGKILLed")
        elif result.status == 0 and result.digest is not None:
            result.finished = True
            if kill is not None:
                kill.outcome = "finished"
        elif kill is None:
            if result.status == 0:
                result.failure = f"{result.label} exited 0 but printed no final_state_digest=<hex> line"
            else:
                result.failure = f"{result.label} ended with {describe_status(result.status)} although no kill was sent"
        elif kill.planned.signal == signal.SIGKILL:
            kill.outcome = "killed"
        elif result.status == EXIT_PREEMPTED or all_preempted(records):
            kill.outcome = "preempted"
        elif records and all(record.get("state") == FINISHED for record in records):
            # Training ended before the stop was agreed on; the restart resumes from the final checkpoint.
            kill.outcome = "finished"
        else:
            result.failure = (f"{result.label} ended with {describe_status(result.status)} after "
                              f"{kill.planned.signal.name}; expected status {EXIT_PREEMPTED} (checkpoint saved, "
                              "restart me) or every rank's heartbeat in state 'preempted'")
        if result.failure is not None:
            result.tail = output_tail(result.log_path)


def _last_digest(log_path: Path) -> str | None:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    found = DIGEST_PATTERN.findall(text)
    return found[-1].lower() if found else None


def _save_outcome(ckpt_dir: Path, staging: str | None) -> str | None:
    """Describe what became of the save a kill interrupted: still staged, committed or removed."""
    if staging is None:
        return None
    if (ckpt_dir / staging).exists():
        return "interrupted"
    step = _staging_step(staging)
    if (ckpt_dir / checkpoint_name(step) / "manifest.json").exists():
        return "committed"
    return "removed"


def run_chaos(options: ChaosOptions) -> int:
    """Run ``resilient chaos`` with ``options``; return its exit status."""
    return Chaos(options).run()
