"""``resilient run``: one visible loop of attempts around the supervised command.

Each attempt moves through these states::

    start ── running ──┬── the tree exits ───────────────────────────────┐
                       ├── stop signal: relay it, grace clock starts ──┐  │
                       │       └── grace expires: SIGKILL the rest ────┤  │
                       └── hang: dump stacks, SIGKILL the tree ─────────┤  │
                                                                       ▼  ▼
                                                               classify the exit

and the exit is classified as ``success`` (status 0), ``preempted`` (the
command exited 75, or every rank reported a preemption exit although a wrapper
such as torchrun turned 75 into 1), ``killed`` (the grace period ran out),
``hang`` or ``crash``. Crashes and hangs start the command again while the
restart budget lasts; nothing is restarted after a stop signal.

Signal handlers only append to a list; relaying, deadlines and the watchdog
run in the loop, which polls every ``poll_interval`` seconds.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Callable

from resilient.errors import EXIT_PREEMPTED
from resilient.journal import ATTEMPT_ENV, Journal
from resilient.launcher.attempts import STATE_DIR, AttemptStore, default_key
from resilient.launcher.options import EXIT_HUNG, EXIT_KILLED, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, LaunchOptions
from resilient.launcher.tree import ProcessTree, become_subreaper
from resilient.launcher.watchdog import HangReport, Watchdog, all_preempted, read_heartbeats, reached_step
from resilient.progress import CKPT_DIR_ENV, HEARTBEAT_INTERVAL_ENV, LAUNCHER_DIR_ENV
from resilient.signals import SIGNALS_ENV
from resilient.slurm import SlurmJob
from resilient.slurm import requeue as slurm_requeue

log = logging.getLogger(__name__)

KEEP_ATTEMPT_DIRS = 10
#: For commands that report no steps: an attempt this long did not fail at start-up.
STARTED_AFTER_SECONDS = 60.0
_TORCHRUN_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


@dataclass
class _Supervised:
    """Outcome, command status and orphan handling of one supervised run of the tree."""

    outcome: str | None = None
    command_status: int = 0
    launcher_stopped_orphans: bool = False


@dataclass
class AttemptResult:
    number: int
    status: int
    outcome: str
    reached_step: bool
    stopped_by: str | None


def restart_delay(options: LaunchOptions, restarts_so_far: int) -> float:
    """Return the wait before the next restart: ``backoff`` doubled per earlier restart, capped."""
    return min(options.backoff * 2 ** min(restarts_so_far, 30), options.max_backoff)


def _exit_code(status: int) -> int:
    """Convert a ``waitpid`` exit code to a shell-style status: 128+N for death by signal N."""
    return 128 - status if status < 0 else status


class Launcher:
    """Run ``options.command`` until it succeeds, is preempted, or runs out of restarts."""

    def __init__(self, options: LaunchOptions, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.options = options
        self._clock = clock
        self._sleep = sleep
        self._pending: list[int] = []
        self._stop_signal: str | None = None
        self._previous_handlers: dict[int, object] = {}
        self._number = 0
        ckpt_dir = options.ckpt_dir
        self._temp_dir: Path | None = None
        if ckpt_dir is not None:
            self.state_dir = ckpt_dir / STATE_DIR
            self.state_dir.mkdir(parents=True, exist_ok=True)
        else:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="resilient-run-"))
            self.state_dir = self._temp_dir
        self.attempts = AttemptStore(self.state_dir)
        self.journal = Journal(ckpt_dir, source="launcher") if ckpt_dir is not None else None

    # -- signals -----------------------------------------------------------------

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._pending.append(signum)

    def _install(self) -> None:
        for sig in self.options.signals:
            self._previous_handlers[sig] = signal.signal(sig, self._record)

    def _restore(self) -> None:
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous_handlers.clear()

    def _event(self, event: str, **fields: object) -> None:
        if self.journal is not None:
            self.journal.append(event, **({"attempt": self._number} if self._number else {}), **fields)

    # -- the loop ------------------------------------------------------------------

    def run(self) -> int:
        self._install()
        if not become_subreaper():
            log.warning("Cannot become a child subreaper; processes whose parent dies are no longer supervised.")
        try:
            status = self._loop()
        finally:
            self._restore()
            if self._temp_dir is not None:
                shutil.rmtree(self._temp_dir, ignore_errors=True)
        return status

    def _loop(self) -> int:
        restarts = 0
        local_start = 0
        while True:
            result = self._attempt(local_start)
            local_start += 1
            final = self._decide(result, restarts)
            if final is not None:
                if final == EXIT_PREEMPTED and self.options.requeue:
                    self._requeue()
                self._event("finish", status=final, outcome=result.outcome)
                return final
            delay = restart_delay(self.options, restarts)
            restarts += 1
            log.warning("Restarting the command in %.1f s (restart %d of %d) after attempt %d ended with %s.",
                        delay, restarts, self.options.max_restarts, result.number, result.outcome)
            self._event("restart", delay=delay, restart=restarts, max_restarts=self.options.max_restarts,
                        reason=result.outcome)
            if self._wait_or_signal(delay):
                log.warning("A %s arrived before the restart; exiting %d so the job is restarted later from "
                            "its latest complete checkpoint.", self._stop_signal, EXIT_PREEMPTED)
                if self.options.requeue:
                    self._requeue()
                self._event("finish", status=EXIT_PREEMPTED, outcome="stopped before restart")
                return EXIT_PREEMPTED

    def _requeue(self) -> None:
        """Requeue the SLURM job from the first node's launcher; status 75 stays either way."""
        job = SlurmJob.from_env()
        if job is None:
            log.warning("--requeue has no effect outside a SLURM job (SLURM_JOB_ID is not set).")
            return
        if job.node_id != 0:
            return
        accepted = slurm_requeue(job)
        self._event("requeue", target=job.requeue_target, accepted=accepted)

    def _decide(self, result: AttemptResult, restarts: int) -> int | None:
        """Return the launcher's exit status, or None to start the command again."""
        if result.outcome == "success":
            return 0
        if result.outcome in ("preempted", "stopped during start-up"):
            return EXIT_PREEMPTED
        if result.outcome == "not started":
            return result.status  # a missing or non-executable command stays so on every restart
        if result.stopped_by is not None:
            return result.status
        if result.outcome == "crash" and self._second_startup_failure(result):
            log.error("The command failed before its first training step in two attempts in a row (the last "
                      "exited %d). This is a start-up failure, not a preemption: fix the error above, then run "
                      "again. No further restarts.", result.status)
            self._event("startup_failure", status=result.status)
            return result.status
        if restarts < self.options.max_restarts:
            return None
        if self.options.max_restarts:
            log.error("The restart budget of %d is spent; exiting with status %d.", self.options.max_restarts,
                      result.status)
        return result.status

    def _second_startup_failure(self, result: AttemptResult) -> bool:
        if result.reached_step:
            return False
        finished = [record for record in self.attempts.records() if record.get("status") is not None]
        earlier = [record for record in finished if record.get("attempt") != result.number]
        if not earlier:
            return False
        previous = earlier[-1]
        return previous.get("outcome") == "crash" and not previous.get("reached_step")

    def _wait_or_signal(self, seconds: float) -> bool:
        """Sleep ``seconds``; return True early when a stop signal arrives."""
        deadline = self._clock() + seconds
        while self._clock() < deadline:
            if self._pending:
                self._stop_signal = signal.Signals(self._pending[0]).name
                self._event("signal", signal=self._stop_signal, relayed_to=[])
                return True
            self._sleep(min(self.options.poll_interval, max(0.0, deadline - self._clock())))
        return False

    # -- one attempt ---------------------------------------------------------------

    def _attempt_dir(self, number: int) -> Path:
        directory = self.state_dir / f"attempt-{number:06d}" / f"{socket.gethostname()}-{os.getpid()}"
        directory.mkdir(parents=True, exist_ok=True)
        old = sorted(self.state_dir.glob("attempt-*"))[:-KEEP_ATTEMPT_DIRS]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        return directory

    def _environment(self, number: int, attempt_dir: Path) -> dict[str, str]:
        options = self.options
        env = dict(os.environ)
        env[ATTEMPT_ENV] = str(number)
        env[LAUNCHER_DIR_ENV] = str(attempt_dir)
        if options.ckpt_dir is not None:
            env[CKPT_DIR_ENV] = str(options.ckpt_dir)
        if options.hang_timeout is not None:
            env[HEARTBEAT_INTERVAL_ENV] = f"{min(1.0, options.hang_timeout / 5):.3f}"
        names = [sig.name for sig in options.signals]
        # Workers record every relayed signal except SIGINT, whose Python handler raises KeyboardInterrupt.
        env.setdefault(SIGNALS_ENV, ",".join(name for name in names if name != "SIGINT") or "SIGTERM")
        # torchrun handles only TERM, INT, HUP and QUIT unless its --signals-to-handle (read from
        # PET_SIGNALS_TO_HANDLE) names more. A USR1 it does not handle kills it and orphans the workers.
        # Its own SIGKILL deadline for the workers must come after ours.
        env.setdefault("PET_SIGNALS_TO_HANDLE", ",".join(dict.fromkeys([*_TORCHRUN_SIGNALS, *names])))
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(options.grace) + 10))
        return env

    def _attempt(self, local_start: int) -> AttemptResult:
        number = self._number = self.attempts.begin(default_key(local_start))
        attempt_dir = self._attempt_dir(number)
        try:
            tree = ProcessTree(self.options.command, self._environment(number, attempt_dir))
        except OSError as err:
            status = EXIT_NOT_FOUND if isinstance(err, FileNotFoundError) else EXIT_NOT_EXECUTABLE
            log.error("Cannot start %s: %s", self.options.command[0], err)
            self._event("exit", status=status, outcome="not started", error=str(err))
            self.attempts.finish(number, status, False, "not started")
            return AttemptResult(number, status, "not started", False, None)
        started = self._clock()
        log.info("Attempt %d: started %s as pid %d.", number, " ".join(self.options.command), tree.pid)
        self._event("start", command=list(self.options.command), child_pid=tree.pid, restart=local_start)

        supervised = self._supervise(tree, Watchdog(attempt_dir, self.options.hang_timeout))
        records = read_heartbeats(attempt_dir)
        # A command without resilient's Supervisor writes no heartbeats; for it, lasting a minute counts as started.
        stepped = reached_step(records) if records else self._clock() - started >= STARTED_AFTER_SECONDS
        outcome, status = self._classify(supervised, records, stepped)
        log.log(logging.INFO if outcome in ("success", "preempted") else logging.WARNING,
                "Attempt %d ended: %s, status %d.", number, outcome, status)
        self._event("exit", status=status, outcome=outcome, command_status=supervised.command_status,
                    reached_step=stepped)
        self.attempts.finish(number, status, stepped, outcome)
        return AttemptResult(number, status, outcome, stepped, self._stop_signal)

    def _classify(self, supervised: "_Supervised", records: list[dict], stepped: bool) -> tuple[str, int]:
        """Name the attempt's outcome and the launcher's status for it."""
        status = supervised.command_status
        if supervised.outcome == "hang":
            return "hang", EXIT_HUNG
        if all_preempted(records) and not supervised.launcher_stopped_orphans:
            # Every rank committed its preemption checkpoint. A wrapper may have turned 75 into 1 (torchrun)
            # or 0 (a shell whose last command succeeded), and a straggler may have needed the grace kill.
            return "preempted", EXIT_PREEMPTED
        if supervised.outcome == "killed":
            return "killed", EXIT_KILLED
        if status == 0:
            return "success", 0
        if status == EXIT_PREEMPTED and not supervised.launcher_stopped_orphans:
            return "preempted", EXIT_PREEMPTED
        if self._stop_signal is not None and not stepped:
            # Stopped while starting (the workers had no handlers yet): nothing was lost, so run it again later.
            return "stopped during start-up", EXIT_PREEMPTED
        return "crash", status

    def _supervise(self, tree: ProcessTree, watchdog: Watchdog) -> "_Supervised":
        """Wait for the tree to exit, relaying signals and enforcing the deadlines."""
        result = _Supervised()
        stop_deadline: float | None = None
        orphan_deadline: float | None = None
        next_watch = self._clock() + 1.0
        while not tree.empty():
            now = self._clock()
            stop_deadline, kill_now = self._relay_pending(tree, stop_deadline)
            if kill_now:
                result.outcome = "killed"
                break
            if tree.root_exited and stop_deadline is None and orphan_deadline is None:
                orphan_deadline = self._stop_orphans(tree)
                result.launcher_stopped_orphans = tree.root_status != 0
            if stop_deadline is not None and now >= stop_deadline:
                self._kill(tree, f"still running {self.options.grace:g} s after the stop signal")
                result.outcome = "killed"
                break
            if orphan_deadline is not None and now >= orphan_deadline:
                self._kill(tree, f"left running {self.options.grace:g} s after the command exited")
                break
            if stop_deadline is None and orphan_deadline is None and now >= next_watch:
                next_watch = now + 1.0
                report = watchdog.check()
                if report is not None:
                    self._on_hang(tree, watchdog, report)
                    result.outcome = "hang"
                    break
            self._sleep(self.options.poll_interval)
        self._wait_empty(tree)
        result.command_status = _exit_code(tree.root_status if tree.root_status is not None else -signal.SIGKILL)
        return result

    def _relay_pending(self, tree: ProcessTree, deadline: float | None) -> tuple[float | None, bool]:
        """Relay recorded signals; return the grace deadline and whether to kill the tree at once."""
        while self._pending:
            signum = self._pending.pop(0)
            name = signal.Signals(signum).name
            if signum == signal.SIGINT and self._stop_signal == "SIGINT":
                self._kill(tree, "a second SIGINT requested an immediate stop")
                return deadline, True
            if self._stop_signal is None:
                self._stop_signal = name
            if deadline is None:
                deadline = self._clock() + self.options.grace
            # A first Ctrl-C requests a checkpoint and a stop, so the tree gets SIGTERM, which
            # resilient's workers save on, instead of a KeyboardInterrupt that loses the step.
            relayed = signal.SIGTERM if signum == signal.SIGINT else signum
            sent = tree.relay(relayed)
            log.info("Received %s; relayed %s to %s. Waiting up to %g s for the command to exit.", name,
                     signal.Signals(relayed).name, ", ".join(info.describe() for info in sent) or "no process",
                     self.options.grace)
            self._event("signal", signal=name, relayed_as=signal.Signals(relayed).name,
                        relayed_to=[info.pid for info in sent])
        return deadline, False

    def _stop_orphans(self, tree: ProcessTree) -> float | None:
        left = tree.processes()
        if not left:
            return None
        log.warning("The command exited with status %s but left %s running; sending SIGTERM and waiting up to "
                    "%g s.", _exit_code(tree.root_status or 0), ", ".join(str(process.pid) for process in left),
                    self.options.grace)
        sent = tree.relay(signal.SIGTERM)
        self._event("signal", signal="SIGTERM", reason="processes left running after the command exited",
                    relayed_to=[info.pid for info in sent])
        return self._clock() + self.options.grace

    def _kill(self, tree: ProcessTree, reason: str) -> None:
        killed = tree.kill_all()
        if not killed:
            return
        log.error("SIGKILLed %d processes %s: %s", len(killed), reason,
                  "; ".join(info.describe() for info in killed))
        self._event("kill", why=reason, processes=[{"pid": info.pid, "command": info.command} for info in killed])

    def _on_hang(self, tree: ProcessTree, watchdog: Watchdog, report: HangReport) -> None:
        pids = {process.pid for process in tree.processes()}
        watchdog.dump_stacks(report, pids)
        log.error("No rank completed a step for %.0f s (hang timeout %.0f s); last steps by rank: %s.",
                  report.idle_seconds, self.options.hang_timeout, report.last_steps)
        for pid in report.stopped:
            log.error("pid %d was stopped (SIGSTOP or a debugger); it was continued to dump its stack.", pid)
        for rank, stack in sorted(report.stacks.items()):
            log.error("Python stacks of rank %d:\n%s", rank, stack.rstrip())
        if report.missing:
            log.error("No stack arrived from ranks %s.", report.missing)
        self._event("hang", idle_seconds=round(report.idle_seconds, 1), last_steps=report.last_steps,
                    stacks_dir=str(watchdog.directory), ranks_with_stacks=sorted(report.stacks),
                    stopped_pids=report.stopped, missing=report.missing)
        self._kill(tree, "after a hang")

    def _wait_empty(self, tree: ProcessTree) -> None:
        # Everything left was just SIGKILLed; it disappears as soon as it is reaped.
        deadline = self._clock() + 10.0
        while not tree.empty() and self._clock() < deadline:
            self._sleep(0.05)
