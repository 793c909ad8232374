"""Random SIGKILLs during the saves of a real 2-rank torchrun job.

Every trial starts ``scripts/torture_job.py`` in the same checkpoint
directory. The job resumes, saves after every step with ``keep=KEEP``, and is
killed with SIGKILL: torchrun and both ranks, each of which leads a process
group of its own. Most trials wait for the n-th save of the attempt to create
its ``step_N.tmp-<nonce>`` staging directory. Then they kill either at a
random delay into the save cycle or as soon as a chosen file of the save
appears (a shard, DCP's metadata, the marker, the final directory, a
retention rename). So kills land while DCP writes the shards, while the ranks
fsync and checksum them, while the marker is written or renamed, and during
retention. The other trials kill at a random time after the start, which
also hits start-up and resume.

After every kill, the test checks with resilient's own discovery, checksum
verification and ``resilient verify``:

- the checkpoint that resume would pick is complete, lists files of both
  ranks and verifies;
- every checkpoint that was complete before the trial is still there, with
  the same manifest, and verifies, unless retention was allowed to remove it
  (at least KEEP newer complete checkpoints exist);
- every directory that discovery reports as complete verifies, and no
  directory was set aside as corrupt or superseded.

The next trial resumes from what the kill left. Its ranks rebuild the state of
the step they resumed from and compare it bit for bit, and the test checks
that they resumed the step that discovery picked.

``RESILIENT_TORTURE_TRIALS`` sets the number of trials (default
``DEFAULT_TRIALS``; the long mode is 200 or more). ``RESILIENT_TORTURE_SEED``
fixes the seed of the kill schedule, which is random otherwise. Every
failure message names the seed and the trial. The seed reproduces the
schedule (which save, how far into it), not the exact instant a kill lands,
because that depends on the machine's load.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import psutil
import pytest

from jobs import Job, job_env, torchrun_command
from resilient import cli
from resilient.checkpoint.discovery import COMPLETE, iter_complete_newest_first, scan
from resilient.checkpoint.layout import (
    MARKER_NAME,
    ManifestError,
    checkpoint_name,
    parse_dir_name,
    read_manifest,
    read_run_id,
)
from resilient.checkpoint.load import verify_checksums

pytestmark = pytest.mark.integration

TORTURE_JOB = Path(__file__).parent / "scripts" / "torture_job.py"
TRIALS_ENV = "RESILIENT_TORTURE_TRIALS"
SEED_ENV = "RESILIENT_TORTURE_SEED"
#: A trial took about 5 s on an idle 2-core machine and 10 to 16 s next to other torchrun jobs, so the
#: default keeps this test at one to two minutes.
DEFAULT_TRIALS = 8
KEEP = 3
#: Share of trials that kill at a random time instead of during a chosen save.
RANDOM_TIME_SHARE = 0.25
#: Share of trials that kill as soon as a chosen file or directory of a save appears.
EVENT_SHARE = 0.4
#: What an event trial waits for. The first five are files in the staging directory, matched by these tests.
STAGING_EVENTS = {
    "the first shard": lambda name: name.endswith(".distcp"),
    "the temporary DCP metadata": lambda name: name == ".metadata.tmp",
    "the DCP metadata": lambda name: name == ".metadata",
    "the temporary marker": lambda name: name.startswith(f".{MARKER_NAME}.tmp-"),
    "the marker": lambda name: name == MARKER_NAME,
}
EVENTS = (*STAGING_EVENTS, "final directory", "retention")
#: Highest save of an attempt that a trial waits for before it kills.
MAX_TARGET_SAVE = 8
#: Seconds one attempt may take to reach its kill before the trial fails.
ATTEMPT_TIMEOUT = 180.0
TAG_ENV = "RESILIENT_TORTURE_TAG"
#: Much larger than any attempt gets to, so the job only ends when it is killed.
MAX_STEPS = 1_000_000

RESUME_LINE = re.compile(r"^torture-resume rank (\d) step (\d+) (.*)$", re.MULTILINE)
PID_LINE = re.compile(r"^torture-pid rank (\d) pid (\d+)$", re.MULTILINE)


@dataclass
class Timings:
    """Observed durations that size the random kill offsets."""

    #: Seconds between the staging directories of two consecutive saves: one save, its retention and one step.
    save_cycles: list[float] = field(default_factory=list)
    #: Seconds from the start of an attempt to its first staging directory.
    first_saves: list[float] = field(default_factory=list)

    def cycle(self) -> float:
        return statistics.median(self.save_cycles[-50:]) if self.save_cycles else 0.05

    def first_save(self) -> float:
        return statistics.median(self.first_saves[-20:]) if self.first_saves else 5.0


@dataclass(frozen=True)
class Snapshot:
    """The complete checkpoints of the run before a trial, by directory name, with their manifest text."""

    manifests: dict[str, str]
    newest_step: int


class Trial:
    """One attempt of the job: start it, kill it at the scheduled moment, and describe what was hit."""

    def __init__(self, ckpt: Path, label: str, rng: random.Random) -> None:
        self.ckpt = ckpt
        draw = rng.random()
        if draw < RANDOM_TIME_SHARE:
            self.kind = "time"
        elif draw < 1 - EVENT_SHARE:
            self.kind = "offset"
        else:
            self.kind = "event"
        self.target_save = rng.randint(1, MAX_TARGET_SAVE)
        self.fraction = rng.random()
        self.event = rng.choice(EVENTS)
        #: Seed, trial number and schedule, for every failure message.
        self.context = f"{label} {self.describe_schedule()}"
        self.tag = uuid.uuid4().hex
        self.names_before = set(list_names(ckpt))
        self.job: Job | None = None

    def describe_schedule(self) -> str:
        if self.kind == "time":
            return f"kill at a random time, {self.fraction:.2f} of (time to the first save + 0.5 s) after the start"
        if self.kind == "offset":
            return f"kill {self.fraction:.2f} of a save cycle into save {self.target_save} of the attempt"
        return f"kill when {self.event} appears in save {self.target_save} of the attempt"

    def run(self, timings: Timings) -> None:
        command = torchrun_command(TORTURE_JOB, str(self.ckpt), str(KEEP), str(MAX_STEPS))
        started = time.monotonic()
        self.job = Job.start(command, job_env(**{TAG_ENV: self.tag}))
        try:
            if self.kind == "time":
                self._wait_until(started + self.fraction * (timings.first_save() + 0.5))
                return
            staging = self._wait_for_save(started, timings)
            if self.kind == "offset":
                self._wait_until(time.monotonic() + self.fraction * timings.cycle())
            else:
                self._wait_for_event(staging)
        finally:
            self._kill()

    def _wait_until(self, moment: float) -> None:
        assert self.job is not None
        while time.monotonic() < moment:
            self._fail_if_exited("before the scheduled kill")
            time.sleep(0.001)

    def _wait_for_save(self, started: float, timings: Timings) -> str:
        """Wait until save ``target_save`` of this attempt creates its staging directory; return its name."""
        assert self.job is not None
        seen: set[str] = set()
        last_seen_at: float | None = None
        while True:
            self._fail_if_exited(f"before save {self.target_save} of the attempt started")
            now = time.monotonic()
            if now - started > ATTEMPT_TIMEOUT:
                raise AssertionError(f"{self.context}: no save {self.target_save} within {ATTEMPT_TIMEOUT:.0f} s "
                                     f"of the start:\n{self.job.output[-4000:]}")
            staging = {name for name in names_of_kind(list_names(self.ckpt), "tmp")
                       if name not in self.names_before and name not in seen}
            if staging:
                seen |= staging
                if last_seen_at is None:
                    timings.first_saves.append(now - started)
                else:
                    timings.save_cycles.append((now - last_seen_at) / len(staging))
                last_seen_at = now
                if len(seen) >= self.target_save:
                    return max(staging, key=lambda name: parse_dir_name(name)[0])
            time.sleep(0.001)

    def _wait_for_event(self, staging: str) -> None:
        """Return as soon as ``event`` shows in the save of ``staging``, or when the next save starts."""
        step = parse_dir_name(staging)[0]
        final = checkpoint_name(step)
        given_up_at = time.monotonic() + ATTEMPT_TIMEOUT
        while time.monotonic() < given_up_at:
            # No sleep, because a save takes tens of milliseconds and the marker is written in less than one.
            self._fail_if_exited(f"before {self.event} appeared")
            names = list_names(self.ckpt)
            if self.event == "final directory" and final in names:
                return
            if self.event == "retention" and set(names_of_kind(names, "deleting")) - self.names_before:
                return
            if any(parse_dir_name(name)[0] > step for name in names_of_kind(names, "tmp")):
                return  # the event was missed or does not happen in this save
            try:
                files = os.listdir(self.ckpt / staging)
            except FileNotFoundError:
                files = []
            matches = STAGING_EVENTS.get(self.event)
            if matches is not None and any(matches(name) for name in files):
                return
        raise AssertionError(f"{self.context}: the save of {staging} did not end within {ATTEMPT_TIMEOUT:.0f} s")

    def _fail_if_exited(self, when: str) -> None:
        assert self.job is not None
        if self.job.process.poll() is not None:
            time.sleep(0.2)  # let the reader thread take the last lines
            mismatches = [line for line in self.job.lines if line.startswith("torture-resume") and " ok" not in line]
            cause = f", because the resumed state differs: {''.join(mismatches)}" if mismatches else ""
            raise AssertionError(f"{self.context}: the job exited with status {self.job.process.returncode} "
                                 f"{when}{cause}\njob output:\n{self.job.output[-4000:]}")

    def _kill(self) -> None:
        """SIGKILL torchrun and both ranks at once, then wait until every process of the attempt is gone."""
        assert self.job is not None
        torchrun = self.job.process.pid
        pids = [int(pid) for _rank, pid in PID_LINE.findall(self.job.output) if self._is_ours(int(pid))]
        if len(pids) < 2:
            # The ranks have not announced themselves yet, so find them before torchrun dies.
            with contextlib.suppress(psutil.Error):
                pids += [child.pid for child in psutil.Process(torchrun).children(recursive=True)]
        for pid in [*pids, torchrun]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.job.wait(timeout=60)
        # A rank started while the kill was under way carries the attempt's tag in its environment.
        self._kill_tagged_processes()

    def _is_ours(self, pid: int) -> bool:
        """Return whether ``pid`` is a live process of this attempt, so that a reused pid is never killed."""
        try:
            return psutil.Process(pid).environ().get(TAG_ENV) == self.tag
        except psutil.Error:
            return False

    def _kill_tagged_processes(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            tagged = []
            for process in psutil.process_iter():
                with contextlib.suppress(psutil.Error):
                    if process.environ().get(TAG_ENV) == self.tag:
                        tagged.append(process)
            if not tagged:
                return
            for process in tagged:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            psutil.wait_procs(tagged, timeout=5)
            assert time.monotonic() < deadline, f"{self.context}: processes {tagged} survived SIGKILL"

    def phase_hit(self) -> str:
        """Name the part of a save that the kill interrupted, judged from the directories it left."""
        new = set(list_names(self.ckpt)) - self.names_before
        staging = sorted(names_of_kind(new, "tmp"), key=lambda name: parse_dir_name(name)[0])
        if staging:
            files = set(os.listdir(self.ckpt / staging[-1]))
            if MARKER_NAME in files:
                return "marker written, before the rename"
            if any(name.startswith(f".{MARKER_NAME}.tmp-") for name in files):
                return "writing the marker"
            if ".metadata" in files:
                return "DCP done: fsync, checksums, report"
            if ".metadata.tmp" in files:
                return "DCP writing its metadata"
            if any(name.endswith(".distcp") for name in files):
                return "DCP writing shards"
            return "staging created, shards not yet written"
        if names_of_kind(new, "deleting"):
            return "retention"
        if sum(info.status == COMPLETE for info in scan(self.ckpt, run_id_of(self.ckpt))) > KEEP:
            return "committed, before retention"
        assert self.job is not None
        if not RESUME_LINE.search(self.job.output):
            return "start-up or resume"
        return "between saves"


def list_names(ckpt: Path) -> list[str]:
    try:
        return os.listdir(ckpt)
    except FileNotFoundError:
        return []


def names_of_kind(names: Iterable[str], kind: str) -> list[str]:
    """Return the checkpoint directory names of one kind (``final``, ``tmp``, ``deleting``, ...)."""
    return [name for name in names if (parsed := parse_dir_name(name)) is not None and parsed[1] == kind]


def run_id_of(ckpt: Path) -> str | None:
    return read_run_id(ckpt) if (ckpt / "run.json").exists() else None


def take_snapshot(ckpt: Path) -> Snapshot:
    complete = [info for info in scan(ckpt, run_id_of(ckpt)) if info.status == COMPLETE]
    manifests = {info.path.name: (info.path / MARKER_NAME).read_text() for info in complete}
    return Snapshot(manifests, complete[-1].step if complete else 0)


def cli_verify(path: Path) -> tuple[int, str]:
    """Run ``resilient verify PATH`` through the console script's entry point, in this process."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        status = cli.main(["verify", str(path)])
    return status, output.getvalue()


def check_after_kill(ckpt: Path, before: Snapshot, context: str) -> Snapshot:
    """Check the invariants on what the kill left, and return the new snapshot."""
    run_id = run_id_of(ckpt)
    infos = scan(ckpt, run_id)
    listing = "\n".join(f"  {info.path.name}: {info.status}" + (f" ({info.problem})" if info.problem else "")
                        for info in infos)
    where = f"{context}\ndirectories:\n{listing}"
    complete = [info for info in infos if info.status == COMPLETE]

    set_aside = [info.path.name for info in infos if parse_dir_name(info.path.name)[1] in ("corrupt", "superseded")]
    assert not set_aside, f"{where}\na resume set aside {set_aside}, which only a bad checkpoint would cause"

    for info in complete:
        problems = verify_checksums(info.path, info.manifest)
        assert not problems, f"{where}\n{info.path.name} is listed as complete but fails verification: {problems}"

    picked = next(iter_complete_newest_first(ckpt, run_id, log_skips=False), None)
    if before.manifests:
        assert picked is not None, f"{where}\nno complete checkpoint is left, but {sorted(before.manifests)} were"
    if picked is not None:
        check_picked(picked.path, complete[-1].path, where)

    for name, manifest_text in sorted(before.manifests.items()):
        path = ckpt / name
        step = parse_dir_name(name)[0]
        if path.exists():
            assert (path / MARKER_NAME).read_text() == manifest_text, f"{where}\nthe manifest of {name} changed"
            assert name in {info.path.name for info in complete}, f"{where}\n{name} is no longer complete"
            continue
        newer = [info.path.name for info in complete if info.step > step]
        assert len(newer) >= KEEP, (f"{where}\nthe complete checkpoint {name} is gone, but only {len(newer)} newer "
                                    f"complete checkpoints exist ({newer}), so retention with keep={KEEP} must "
                                    "not have removed it")
    return take_snapshot(ckpt)


def check_picked(path: Path, newest: Path, where: str) -> None:
    """Check the checkpoint resume would load: the newest complete one, both ranks' files, verified by the CLI."""
    assert path == newest, f"{where}\ndiscovery picks {path.name}, but the newest complete checkpoint is {newest.name}"
    try:
        manifest = read_manifest(path)
    except (OSError, ManifestError) as err:
        raise AssertionError(f"{where}\nthe picked {path.name} has no readable manifest: {err}") from None
    assert manifest.world_size == 2, f"{where}\n{path.name} was written by {manifest.world_size} ranks"
    shard_ranks = sorted(entry.rank for entry in manifest.files if entry.path.endswith(".distcp"))
    assert shard_ranks == [0, 1], f"{where}\n{path.name} lists shards of ranks {shard_ranks}, expected [0, 1]"
    listed = {entry.path for entry in manifest.files}
    assert ".metadata" in listed, f"{where}\n{path.name} does not list .metadata"
    on_disk = set(os.listdir(path)) - {MARKER_NAME}
    assert on_disk == listed, f"{where}\n{path.name} holds {sorted(on_disk)}, its manifest lists {sorted(listed)}"
    status, output = cli_verify(path)
    assert status == 0, f"{where}\nresilient verify {path} exited {status}:\n{output}"


def check_resume_lines(output: str, expected_step: int, must_have: bool, context: str) -> bool:
    """Check the ranks' resume lines; return True when both ranks printed one."""
    found = {int(rank): (int(step), verdict) for rank, step, verdict in RESUME_LINE.findall(output)}
    for rank, (step, verdict) in sorted(found.items()):
        assert verdict == "ok", f"{context}\nrank {rank} resumed step {step} with a different state: {verdict}"
        assert step == expected_step, (f"{context}\nrank {rank} resumed step {step}, but discovery picked step "
                                       f"{expected_step} after the previous kill")
    if must_have:
        assert sorted(found) == [0, 1], f"{context}\nthe ranks did not report their resume:\n{output[-4000:]}"
    return sorted(found) == [0, 1]


def trial_count() -> int:
    raw = os.environ.get(TRIALS_ENV, "").strip()
    if not raw:
        return DEFAULT_TRIALS
    try:
        count = int(raw)
    except ValueError:
        raise pytest.UsageError(f"{TRIALS_ENV}={raw!r} is not an integer; set it to the number of trials") from None
    if count < 1:
        raise pytest.UsageError(f"{TRIALS_ENV}={count} must be at least 1")
    return count


def test_random_kills_keep_checkpoints_complete(tmp_path: Path) -> None:
    trials = trial_count()
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    ckpt = tmp_path / "ckpt"
    timings = Timings()
    phases: Counter[str] = Counter()
    resumes_checked = 0
    started = time.monotonic()
    print(f"random-kill test: seed {seed} ({SEED_ENV}={seed} repeats this schedule), {trials} trials")

    snapshot = take_snapshot(ckpt)
    for number in range(1, trials + 1):
        trial = Trial(ckpt, f"[seed {seed}, trial {number} of {trials}]", rng)
        trial.run(timings)
        assert trial.job is not None
        output = trial.job.output
        phase = trial.phase_hit()
        phases[phase] += 1
        context = f"{trial.context}, which hit: {phase}"

        try:
            resumes_checked += check_resume_lines(output, snapshot.newest_step, trial.kind != "time", context)
            snapshot = check_after_kill(ckpt, snapshot, context)
        except AssertionError as err:
            raise AssertionError(f"{err}\njob output:\n{output[-3000:]}") from None
        print(f"{context}; newest complete step {snapshot.newest_step}", flush=True)

    # Run the console script itself once, on what the last kill left.
    final = [sys.executable, "-m", "resilient"]
    listing = subprocess.run([*final, "ls", str(ckpt)], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    if snapshot.manifests:
        newest = max(snapshot.manifests, key=lambda name: parse_dir_name(name)[0])
        verified = subprocess.run([*final, "verify", str(ckpt / newest)], capture_output=True, text=True,
                                  timeout=120)
        assert verified.returncode == 0, f"[seed {seed}] {verified.stdout}{verified.stderr}"

    summary = ", ".join(f"{name}: {count}" for name, count in phases.most_common())
    print(f"random-kill test: seed {seed}, {trials} trials in {time.monotonic() - started:.0f} s, "
          f"{resumes_checked} resumes compared bit for bit, newest step {snapshot.newest_step}, "
          f"median save cycle {timings.cycle() * 1000:.0f} ms; kills hit: {summary}")
    print(listing.stdout)
